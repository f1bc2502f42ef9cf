"""Run monitoring from rank 0: TensorBoard scalars/histograms/images, history.jsonl, tqdm.

Other ranks get a `Monitor` whose methods do nothing, so the trainer never branches on rank to log.
On resume, TensorBoard's `purge_step` drops events the interrupted run wrote after its checkpoint and
history.jsonl is truncated to the same step, so curves continue without duplicates.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from selmix_dist import atomic

MAX_IMAGE_CLASSES = 256


def heatmap_image(matrix: torch.Tensor, order: torch.Tensor | None = None) -> np.ndarray:
    """A K×K matrix as an RGB uint8 image [3, H, W] (viridis), pooled to ≤ 256×256 for large K.

    `order` permutes classes first (e.g. by train frequency) so that pooling merges similar classes.
    """
    from matplotlib import colormaps

    m = matrix.detach().to(torch.float64).cpu()
    if order is not None:
        m = m[order][:, order]
    k = m.shape[0]
    if k > MAX_IMAGE_CLASSES:
        m = torch.nn.functional.adaptive_avg_pool2d(m[None, None], MAX_IMAGE_CLASSES)[0, 0]
    lo, hi = float(m.min()), float(m.max())
    scaled = (m - lo) / (hi - lo) if hi > lo else torch.zeros_like(m)
    rgb = colormaps["viridis"](scaled.numpy())[..., :3]
    return (rgb.transpose(2, 0, 1) * 255).astype(np.uint8)


class Monitor:
    """Rank-0 logging sink. `enabled=False` makes every call a no-op (other ranks)."""

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, start_step: int,
                 total_steps: int, progress: bool):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        self.history_path = run_dir / "history.jsonl"
        if not enabled:
            return
        _truncate_history(self.history_path, start_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step if start_step > 0 else None)
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="selmix", dynamic_ncols=True)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        if self.writer is not None and values.numel() > 0:
            self.writer.add_histogram(tag, values.detach().cpu().to(torch.float64), step)

    def per_class(self, tag: str, values: torch.Tensor, step: int, max_scalars: int = 32) -> None:
        """Per-class values: individual scalars for small K, a histogram always."""
        if self.writer is None:
            return
        if values.numel() <= max_scalars:
            for k, v in enumerate(values.tolist()):
                self.writer.add_scalar(f"{tag}/class_{k:03d}", v, step)
        self.histogram(tag, values, step)

    def image(self, tag: str, matrix: torch.Tensor, step: int, order: torch.Tensor | None = None) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, heatmap_image(matrix, order), step, dataformats="CHW")

    def evaluation(self, step: int, split: str, metrics: dict[str, float], per_class_recall: torch.Tensor) -> None:
        """One line of history.jsonl plus the matching TensorBoard scalars."""
        if not self.enabled:
            return
        record = {"step": step, "split": split, "metrics": _finite(metrics),
                  "per_class_recall": per_class_recall.tolist()}
        with open(self.history_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        self.scalars({f"{split}/{k}": v for k, v in metrics.items()}, step)
        self.per_class(f"{split}/per_class_recall", per_class_recall, step)

    def progress(self, step: int, postfix: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
            self.bar.update(0)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise AssertionError(f"non-finite metrics {bad}: the metrics module must never return NaN")
    return metrics


def _truncate_history(path: Path, start_step: int) -> None:
    """Keep only complete records up to `start_step` (a killed run may have written past its checkpoint)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", math.inf) < start_step:
            kept.append(line)
    atomic.write_text(path, "".join(k + "\n" for k in kept))
