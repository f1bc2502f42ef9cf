"""Run monitoring from rank 0: the text log, TensorBoard, history.jsonl, the progress bar.

Other ranks get a `Monitor` whose methods do nothing, so the trainer never branches on rank to log.
On resume, TensorBoard's `purge_step` drops the events an interrupted run wrote from its checkpoint's step
on (the resumed run writes them again) and history.jsonl is truncated at the same step, so curves continue
without duplicates or gaps.
The text log is Python `logging` under the `selmix_dist` logger: rank 0 prints INFO to the console (through
the progress bar) and to run.dir/train.log; other ranks print warnings only, prefixed with their rank.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import sys
import threading
from pathlib import Path

import numpy as np
import torch

from selmix_dist import atomic

MAX_IMAGE_CLASSES = 256
HEATMAP_TICK_CLASSES = 20  # up to this many classes every heatmap row and column is labelled
HEATMAP_FIGSIZE, HEATMAP_DPI = (4.8, 4.0), 100  # a 480×400 image: readable in TensorBoard, cheap to render
# P counts as collapsed when its effective number of pairs exp(H(P)) stays below NARROW_SUPPORT this long.
NARROW_SUPPORT = 4.0
NARROW_REFRESHES = 3
log = logging.getLogger(__name__)
LOGGER = "selmix_dist"
_FORMAT = "%(asctime)s %(levelname)s %(message)s"


class _ConsoleHandler(logging.Handler):
    """Writes through tqdm so that log lines never land inside the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never fail the run
            self.handleError(record)


class _RunLogFile(logging.FileHandler):
    """run.dir/train.log. A write the storage refuses (a full disk) is reported once on stderr and the file is
    given up: the log must never fail the run, and the run's next result file reports the disk as its error."""

    given_up = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.given_up:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        err = sys.exc_info()[1]
        if not isinstance(err, OSError):
            super().handleError(record)
        elif not self.given_up:
            self.given_up = True
            sys.stderr.write(f"warning: {self.baseFilename} is no longer written: {err.strerror or err}\n")


def setup_logging(rank: int, log_file: Path | None = None) -> None:
    """Configure the `selmix_dist` logger for this process (idempotent: replaces handlers it added)."""
    logger = logging.getLogger(LOGGER)
    for h in [h for h in logger.handlers if getattr(h, "_selmix", False)]:
        logger.removeHandler(h)
        h.close()
    console = _ConsoleHandler()
    console.setFormatter(logging.Formatter(_FORMAT if rank == 0 else f"[rank {rank}] {_FORMAT}", "%H:%M:%S"))
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    handlers: list[logging.Handler] = [console]
    if log_file is not None and rank == 0:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file = _RunLogFile(log_file)
        file.setFormatter(logging.Formatter(_FORMAT))
        handlers.append(file)
    for h in handlers:
        h._selmix = True
        logger.addHandler(h)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _tag(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def heatmap_values(matrix: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
    """What `heatmap_image` draws: float64 [B, B], classes permuted by `order` (int64[K]), then average-pooled
    to B = min(K, MAX_IMAGE_CLASSES) bins (pooling merges neighbours in `order`, i.e. classes of similar size)."""
    m = matrix.detach().to(torch.float64).cpu()
    if order is not None:
        m = m[order][:, order]
    if m.shape[0] > MAX_IMAGE_CLASSES:
        m = torch.nn.functional.adaptive_avg_pool2d(m[None, None], MAX_IMAGE_CLASSES)[0, 0]
    return m


def heatmap_image(matrix: torch.Tensor, order: torch.Tensor | None = None,
                  class_names: list[str] | None = None) -> np.ndarray:
    """A K×K class-pair matrix (P or G) rendered as a small figure: RGB uint8 [3, H, W] for TensorBoard.

    Rows are the label class i, columns the partner class j, both in `order` (classes by train frequency, head
    first; None = label order); viridis with a colorbar. For K ≤ HEATMAP_TICK_CLASSES every row and column is
    labelled with its class name (`class_names`, K names) or index; above that the axes count positions in
    `order`. K > MAX_IMAGE_CLASSES is average-pooled (`heatmap_values`). Rendered with matplotlib's Agg canvas
    (no pyplot state, no display), about 0.1 s.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k = matrix.shape[0]
    m = heatmap_values(matrix, order)
    finite = m[torch.isfinite(m)]
    low, high = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
    fig = Figure(figsize=HEATMAP_FIGSIZE, dpi=HEATMAP_DPI, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    # extent in class positions, so that the ticks count classes even when the image is pooled
    shown = ax.imshow(m.numpy(), cmap="viridis", vmin=low, vmax=high, interpolation="nearest",
                      extent=(-0.5, k - 0.5, k - 0.5, -0.5))
    fig.colorbar(shown, ax=ax, shrink=0.9).ax.tick_params(labelsize=7)
    if m.shape[0] < k:
        ax.set_title(f"{k} classes averaged into {m.shape[0]}×{m.shape[0]} bins", fontsize=8)
    ranked = "" if order is None else " (by train frequency, head first)"
    ax.set_ylabel(f"label class i{ranked}", fontsize=8)
    ax.set_xlabel(f"partner class j{ranked}", fontsize=8)
    ax.tick_params(labelsize=7)
    if k <= HEATMAP_TICK_CLASSES:
        classes = range(k) if order is None else order.tolist()
        labels = [class_names[c] if class_names else str(c) for c in classes]
        ax.set_xticks(range(k), labels, rotation=90)
        ax.set_yticks(range(k), labels)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3]
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


class Monitor:
    """Rank-0 logging sink. `enabled=False` makes every call a no-op (other ranks)."""

    def __init__(self, run_dir, *, enabled: bool, tensorboard: bool, start_step: int, total_steps: int,
                 progress: bool, class_names: list[str] | None = None, first_new_step: int | None = None):
        """start_step: where training resumes; first_new_step (default start_step): the first step whose
        records this run writes (earlier ones are kept, later ones dropped as an interrupted run's)."""
        first_new_step = start_step if first_new_step is None else first_new_step
        self.enabled = enabled
        self.writer = None
        self.bar = None
        self.run_dir, self.history_path = run_dir, run_dir / "history.jsonl"
        self.forecast_path = run_dir / "forecast.jsonl"     # the gain's predictions against what followed
        self.class_names = class_names
        self.class_tags = [f"{k:03d}_{_tag(n)}" for k, n in enumerate(class_names)] if class_names else None
        self._narrow, self._warned_narrow = 0, False
        self._snapshot: dict | None = None
        if not enabled:
            return
        for path in (self.history_path, self.forecast_path):
            _truncate_history(path, first_new_step)
            path.touch()
            run_dir.record(path)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir.tensorboard), purge_step=first_new_step or None)
            self.events_path = Path(self.writer.file_writer.event_writer._file_name)
            run_dir.record(self.events_path)
            _quiet_tensorboard_thread_errors()
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="selmix", dynamic_ncols=True)

    def run_config(self, flat_config: dict, config_text: str, metric_tags: list[str]) -> None:
        """The resolved config as text and as hparams (HParams tab: runs compare by config and by metric)."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        values = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in flat_config.items()}
        with self._writing_events():
            self.writer.add_text("config", "```\n" + config_text + "```", 0)
            file_writer = self.writer._get_file_writer()
            for summary in hparams(values, dict.fromkeys(metric_tags, 0.0)):
                file_writer.add_summary(summary)

    def _writing_events(self) -> contextlib.AbstractContextManager:
        """Around every TensorBoard call: a write error of its writer thread (a full disk), raised at the next
        call, becomes one StorageError naming the events file."""
        return atomic.reported(self.events_path)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            with self._writing_events():
                for key, value in values.items():
                    self.writer.add_scalar(key, value, step)

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        if self.writer is not None and values.numel() > 0:
            with self._writing_events():
                self.writer.add_histogram(tag, values.detach().cpu().to(torch.float64), step)

    def per_class(self, tag: str, values: torch.Tensor, step: int, max_scalars: int = 32) -> None:
        """Per-class values: individual scalars for small K, a histogram always."""
        if self.writer is None:
            return
        if values.numel() <= max_scalars:
            with self._writing_events():
                for k, v in enumerate(values.tolist()):
                    name = self.class_tags[k] if self.class_tags else f"class_{k:03d}"
                    self.writer.add_scalar(f"{tag}/{name}", v, step)
        self.histogram(tag, values, step)

    def image(self, tag: str, matrix: torch.Tensor, step: int, order: torch.Tensor | None = None) -> None:
        if self.writer is not None:
            picture = heatmap_image(matrix, order, self.class_names)
            with self._writing_events():
                self.writer.add_image(tag, picture, step, dataformats="CHW")

    def evaluation(self, step: int, split: str, metrics: dict[str, float], per_class_recall: torch.Tensor,
                   head_step: int | None = None) -> None:
        """One line of history.jsonl plus the matching TensorBoard scalars. `head_step`: the step of the head
        that was evaluated when it is not the current one (the best head, split 'test_best')."""
        if not self.enabled:
            return
        record = {"step": step, "split": split, "metrics": _finite(metrics),
                  "per_class_recall": per_class_recall.tolist()}
        if head_step is not None:
            record["head_step"] = head_step
        self._append(self.history_path, record)
        self.scalars({f"{split}/{k}": v for k, v in metrics.items()}, step)
        self.per_class(f"{split}/per_class_recall", per_class_recall, step)

    def _append(self, path: Path, record: dict) -> None:
        with atomic.reported(path), open(self.run_dir.inside(path), "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def refresh(self, record, objective, class_order: torch.Tensor, cfg) -> None:
        """Everything a refresh decided: gain, its forecast against what followed, P's spread, timings,
        multipliers, pseudo-labels, heatmaps."""
        if not self.enabled:
            return
        r, step = record.result, record.step
        support = r.effective_support
        if (f := record.forecast) is not None:
            self._append(self.forecast_path, {"step": f.next_step, "from_step": f.step, "predicted": f.predicted,
                                              "realised": f.realised})
            self.scalars({"selmix/psi_change_predicted": f.predicted, "selmix/psi_change_realised": f.realised},
                         step)
        self.scalars({"selmix/gain_rate": record.gain_rate, "selmix/max_gain": r.max_gain,
                      "selmix/entropy_P": r.entropy, "selmix/effective_support": support,
                      "selmix/temperature": r.temperature,
                      **({"selmix/coverage_floor_raised": record.floor_raised} if cfg.selmix.coverage_floor else {}),
                      **{f"time/refresh_{k}": v for k, v in record.timings.items()}}, step)
        for name, values in objective.multipliers().items():
            self.per_class(f"multipliers/{name}", values.flatten(), step)
        if cfg.selmix.setting == "semi":
            labels = record.partner_labels
            counts = torch.bincount(labels[labels >= 0].to(torch.int64), minlength=objective.num_classes)
            self.per_class("pseudo_labels/count", counts.to(torch.float64), step)
        # P and G for the report, at the first and the latest refresh; the latest is written at close, not at
        # every refresh (two K×K tensors: 530 MB at K = 8142)
        self._snapshot = {"step": step, "P": r.distribution.to(torch.float32).cpu(),
                          "G": r.gain.to(torch.float32).cpu()}
        if not (self.run_dir / "distribution_first.pt").exists():
            self.run_dir.torch_save(self._snapshot, self.run_dir / "distribution_first.pt")
        if (step // cfg.run.refresh_every) % cfg.log.image_every == 0:
            self.image("selmix/P", r.distribution, step, class_order)
            self.image("selmix/G", r.gain, step, class_order)
        t = record.timings
        log.info("refresh at step %d: max gain %.3g, P spread over %.1f effective pairs (T=%.3g); %.2f s "
                 "(eval %.2f, pseudo-labels %.2f, gain %.2f)", step, r.max_gain, support, r.temperature,
                 t["total"], t["eval"], t["pseudo_labels"], t["gain"])
        # Under rule 'support' the spread of P is what the user set (target_support·K pairs): no warning.
        watched = not cfg.selmix.uniform and cfg.selmix.temperature_rule != "support"
        self._narrow = self._narrow + 1 if support < NARROW_SUPPORT and watched else 0
        if self._narrow == NARROW_REFRESHES and not self._warned_narrow:
            self._warned_narrow = True
            log.warning("P has stayed on fewer than %d effective class pairs for %d refreshes: with "
                        "selmix.temperature_rule=%s and T=%g it has collapsed (the gain scales with squared feature "
                        "norms). Use selmix.temperature_rule=support (or relative), or a larger temperature",
                        NARROW_SUPPORT, NARROW_REFRESHES, cfg.selmix.temperature_rule, cfg.selmix.temperature)

    def plugin(self, step: int, record: dict, target: str) -> None:
        """The plug-in step: plugin.json and its target metric on validation (and test) in TensorBoard."""
        if not self.enabled:
            return
        self.run_dir.write_json("plugin.json", record)
        self.scalars({f"plugin/{split}_{target}": record[split][target] for split in ("val", "test")
                      if split in record}, step)
        log.info("plug-in on the head of step %d: validation %s %.4f → %.4f%s", record["head_step"], target,
                 record["start_val_score"][1], record["val_score"][1],
                 f", test {record['test'][target]:.4f}" if "test" in record else "")

    def summary(self, step: int, best: dict, target: str, run_dir) -> None:
        """The end of a run: target metric before → after on each split, best step, where things are."""
        if not self.enabled:
            return
        first, last = {}, {}
        for line in self.history_path.read_text().splitlines():
            record = json.loads(line)
            first.setdefault(record["split"], record)
            last[record["split"]] = record
        for split in (s for s in first if s != "test_best"):
            log.info("%s %s: %.4f at step %d → %.4f at step %d", split, target, first[split]["metrics"][target],
                     first[split]["step"], last[split]["metrics"][target], last[split]["step"])
        log.info("done at step %d; best validation %s %.4f at step %d → %s", step, target, best["metric"],
                 best["step"], run_dir.checkpoints / "best.pt")
        if "test_best" in last:
            log.info("test %s of that best head: %.4f", target, last["test_best"]["metrics"][target])
        log.info("TensorBoard: tensorboard --logdir %s", run_dir.tensorboard)

    def progress(self, step: int, postfix: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
            self.bar.update(0)

    def close(self) -> None:
        """Write the latest P/G snapshot, close the progress bar and TensorBoard (called in the trainer's `finally`).

        While an error is already on its way out (a full disk, a diverged run) the snapshot is not written and
        TensorBoard's own write errors are dropped: they would only bury the first error under more tracebacks.
        """
        failing = sys.exc_info()[1] is not None
        try:
            if self._snapshot is not None and not failing:
                self.run_dir.torch_save(self._snapshot, self.run_dir / "distribution_last.pt")
        finally:
            if self.bar is not None:
                self.bar.close()
            if self.writer is not None:
                with contextlib.suppress(OSError) if failing else self._writing_events():
                    self.writer.flush()
                    self.writer.close()


def _quiet_tensorboard_thread_errors() -> None:
    """Keep tensorboard's writer thread from printing its own traceback when a write fails: the thread stores the
    error and tensorboard raises it again in the main thread at the next call, where it is reported once (see
    `Monitor._writing_events`). Other threads' errors still reach the previous hook. Idempotent."""
    previous = threading.excepthook
    if getattr(previous, "_selmix_quiet", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

        if not (isinstance(args.thread, _AsyncWriterThread) and issubclass(args.exc_type, OSError)):
            previous(args)

    hook._selmix_quiet = True
    threading.excepthook = hook


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise AssertionError(f"non-finite metrics {bad}: the metrics module must never return NaN")
    return metrics


def _truncate_history(path: Path, first_new_step: int) -> None:
    """Keep only the complete records before `first_new_step` (a killed run may have written past its
    checkpoint; this run writes the records from that step on)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", math.inf) < first_new_step:
            kept.append(line)
    atomic.write_text(path, "".join(k + "\n" for k in kept))
