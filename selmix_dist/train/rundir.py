"""The run directory: every path a run writes, its manifest, its lock, and the rules that keep it safe.

Contract (all written by rank 0, atomically):
    run.json            manifest: format, status ('running' | 'complete'), final step, and every artifact
                        this run wrote (relative paths). Only listed files are ever removed by us.
    config.yaml         the resolved config that is running now; config_history.jsonl: every change a
                        resume made to result-neutral keys (step, key, old, new)
    meta.json           class names, train class counts, objective, world size
    history.jsonl       one record per evaluation; train.log: the text log; tb/: TensorBoard events
    checkpoints/        step_XXXXXXXX.pt (resume), best.pt (chosen on validation)
    init_head.pt        the fitted starting head (cached across restarts)
    distribution_{first,last}.pt, report.{json,csv,md}, *.png (written after training by the entry point)
    .lock               exclusive lock (see lock.py)

Rules: a directory that is not empty and holds no manifest is not ours, and a run never starts in it; a
fresh start in our own directory removes exactly the listed artifacts; a complete run is never touched.

Containment (`RunDir.inside`, the one rule every writer goes through): a path the run writes, appends to,
locks or removes must resolve, all symlinks followed, to a place inside run.dir. The fixed layout is checked
when the run opens and every manifest entry before anything is removed, so a planted link (`.lock` →
../victim) or a tampered run.json ("../victim") is refused with an error naming it and nothing is touched.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from selmix_dist import atomic
from selmix_dist.train.lock import RunLock

log = logging.getLogger(__name__)
MANIFEST = "run.json"
FORMAT = "selmix_dist.run/1"
# What the code before the manifest existed wrote; a legacy run is adopted with exactly these files.
_LEGACY_ARTIFACTS = ("config.yaml", "meta.json", "history.jsonl", "init_head.pt", "distribution_first.pt",
                     "distribution_last.pt", "report.json", "report.csv", "report.md", "per_class_recall.png",
                     "distribution.png", "target_metric.png")
# Everything a run opens by a fixed name (files it appends to or locks, folders it creates files in): checked
# for containment when the run opens, before the first write.
_LAYOUT = (MANIFEST, ".lock", "train.log", "history.jsonl", "config_history.jsonl", "checkpoints", "tb",
           *_LEGACY_ARTIFACTS)


class RunDirError(ValueError):
    """The run directory cannot be used as asked (the message says why and what to do)."""


class RunDir:
    def __init__(self, path: str | Path, *, main: bool = True, lock_stale_seconds: float = 600.0):
        if not str(path).strip():
            raise RunDirError("config key 'run.dir' is empty: name a directory for the run")
        self.root = Path(path)
        self.main = main
        self.checkpoints = self.root / "checkpoints"
        self.tensorboard = self.root / "tb"
        self.lock = RunLock(self.root / ".lock", stale_after=lock_stale_seconds)
        self._manifest: dict[str, Any] | None = None

    # ------------------------------------------------------------------ paths
    def __truediv__(self, name: str) -> Path:
        return self.root / name

    def inside(self, path: str | Path) -> Path:
        """`path` itself when it resolves (every symlink followed) to a place inside run.dir, else RunDirError.

        The containment rule of the module doc: every write, append, lock and removal of a run checks here.
        """
        root, resolved = self.root.resolve(), Path(path).resolve()
        if resolved != root and root not in resolved.parents:
            raise RunDirError(f"{path} resolves to {resolved}, outside run.dir {root}: a run writes and removes "
                              "files only inside its own directory; remove that link (or use another run.dir)")
        return Path(path)

    # ------------------------------------------------------------------ manifest
    def manifest(self) -> dict[str, Any] | None:
        """The manifest on disk (None when this is not one of our runs)."""
        if self._manifest is None:
            path = self.root / MANIFEST
            if not path.is_file():
                return None
            try:
                manifest = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise RunDirError(f"{path} is not valid JSON ({err}); it is not safe to write into "
                                  f"{self.root}: inspect it, or use another run.dir") from err
            if manifest.get("format") != FORMAT:
                raise RunDirError(f"{path} is not a {FORMAT} manifest")
            self._manifest = manifest
        return self._manifest

    def is_complete(self) -> bool:
        manifest = self.manifest() if self.root.is_dir() else None
        return bool(manifest and manifest.get("status") == "complete")

    def _save_manifest(self) -> None:
        if self.main:
            atomic.write_text(self.inside(self.root / MANIFEST), json.dumps(self._manifest, indent=1) + "\n")

    def record(self, *paths: Path) -> None:
        """Add files this run wrote to the manifest (rank 0; no-op elsewhere)."""
        if not self.main:
            return
        listed = self._manifest["artifacts"]
        new = [str(self.inside(p).resolve().relative_to(self.root.resolve())) for p in paths]
        new = [n for n in new if n not in listed]
        if new:
            listed.extend(new)
            self._save_manifest()

    def forget(self, *paths: Path) -> None:
        """Drop files this run removed itself (pruned checkpoints) from the manifest."""
        if not self.main:
            return
        gone = {str(Path(p).resolve().relative_to(self.root.resolve())) for p in paths}
        self._manifest["artifacts"] = [a for a in self._manifest["artifacts"] if a not in gone]
        self._save_manifest()

    def mark(self, status: str, **fields: Any) -> None:
        if not self.main:
            return
        self._manifest.update(status=status, **fields)
        self._save_manifest()

    # ------------------------------------------------------------------ opening
    def open(self, *, fresh: bool) -> None:
        """Take the lock and make the directory ours (rank 0). `fresh`: start over (no checkpoint to resume).

        Refuses a non-empty directory without a manifest; on a fresh start in our own directory removes
        exactly the artifacts the manifest lists (an earlier attempt's events, history, snapshots).
        """
        if not self.main:
            return
        with atomic.reported(self.root):
            self.root.mkdir(parents=True, exist_ok=True)
        for name in _LAYOUT:
            self.inside(self.root / name)
        manifest = self.manifest() or self._adopt_legacy()
        # Every listed path is checked before the lock is taken and before anything is removed.
        listed = [self._listed_path(a) for a in (manifest or {}).get("artifacts", [])]
        if manifest is None and any(p.name != ".lock" for p in self.root.iterdir()):
            raise RunDirError(f"run.dir {self.root} is not empty and holds no selmix_dist manifest ({MANIFEST}); "
                              "a run never writes into a directory it did not create: choose a new or empty "
                              "run.dir")
        self.lock.acquire()
        removed = atomic.sweep_stale_temporaries(self.root) + atomic.sweep_stale_temporaries(self.checkpoints)
        if removed:
            log.info("removed %d temporary file(s) of a killed writer: %s", len(removed),
                     ", ".join(p.name for p in removed))
        if manifest is None or fresh:
            self._remove(listed)
            self._manifest = {"format": FORMAT, "status": "running", "artifacts": []}
            self._save_manifest()
        elif manifest.get("status") != "running":
            self.mark("running")

    def _remove(self, listed: list[Path]) -> None:
        """Remove the artifacts of an earlier attempt (`listed`: checked by `_listed_path`)."""
        for path in listed:
            if path.is_file():
                path.unlink()
        for folder in {p.parent for p in listed}:  # folders we filled and emptied again
            if folder != self.root and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        if listed:
            log.info("fresh start: removed %d artifact(s) of the earlier attempt in %s", len(listed), self.root)

    def _listed_path(self, entry: str) -> Path:
        """The file a manifest entry names: a relative path without '..' that resolves inside run.dir."""
        relative = Path(entry)
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            raise RunDirError(f"{self.root / MANIFEST} lists the artifact {entry!r}, which is not a plain relative "
                              "path inside the run directory: the manifest was edited; nothing was removed. Fix "
                              "or delete that entry, or use another run.dir")
        return self.inside(self.root / relative)

    def _adopt_legacy(self) -> dict | None:
        """A run directory written before manifests existed (meta.json + step checkpoints): list its files."""
        if not ((self.root / "meta.json").is_file() and self.checkpoints.is_dir()):
            return None
        files = [self.root / n for n in _LEGACY_ARTIFACTS] + sorted(self.checkpoints.glob("*.pt"))
        files += sorted(self.tensorboard.glob("events.out.tfevents.*")) if self.tensorboard.is_dir() else []
        root = self.root.resolve()
        self._manifest = {"format": FORMAT, "status": "running",
                          "artifacts": [str(self.inside(p).resolve().relative_to(root))
                                        for p in files if p.is_file()]}
        self._save_manifest()
        log.info("adopted %s, written by an earlier version, as a selmix_dist run", self.root)
        return self._manifest

    def close(self) -> None:
        self.lock.release()

    # ------------------------------------------------------------------ small files
    def write_text(self, name: str, text: str) -> Path:
        path = self.inside(self.root / name)
        if self.main:
            atomic.write_text(path, text)
            self.record(path)
        return path

    def write_json(self, name: str, obj: Any) -> Path:
        return self.write_text(name, json.dumps(obj, indent=1) + "\n")

    def torch_save(self, obj: Any, path: Path) -> None:
        if self.main:
            atomic.torch_save(obj, self.inside(path))
            self.record(path)

    def append_config_changes(self, step: int, changes: dict[str, tuple[Any, Any]]) -> None:
        """Append the result-neutral keys a resume changed, so config.yaml's history is complete."""
        if not (self.main and changes):
            return
        path = self.inside(self.root / "config_history.jsonl")
        previous = path.read_text() if path.is_file() else ""
        lines = [json.dumps({"step": step, "key": k, "old": old, "new": new}) for k, (old, new) in changes.items()]
        atomic.write_text(path, previous + "".join(line + "\n" for line in lines))
        self.record(path)
