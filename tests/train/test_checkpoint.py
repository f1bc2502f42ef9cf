"""Checkpoint files: atomic replacement, latest-valid discovery, identity checks."""

from __future__ import annotations

import pytest
import torch

from selmix_dist import atomic
from selmix_dist.train import checkpoint as ckpt


def _state(step: int) -> dict:
    return {"format_version": ckpt.FORMAT_VERSION, "step": step, "identity": {"objective": "min_recall"},
            "head": {"weight": torch.full((2, 3), float(step))}, "optimizer": {}, "scheduler": {},
            "objective": {}, "refresh": {}, "progress": {}}


def test_latest_valid_skips_corrupt_and_keeps_it(tmp_path):
    for step in (10, 20):
        atomic.torch_save(_state(step), ckpt.step_path(tmp_path, step))
    broken = ckpt.step_path(tmp_path, 30)
    broken.write_bytes(ckpt.step_path(tmp_path, 20).read_bytes()[:100])  # a torn write
    with pytest.warns(UserWarning, match="step_00000030"):
        path, state = ckpt.latest_valid_checkpoint(tmp_path)
    assert path.name == "step_00000020.pt" and state["step"] == 20
    assert broken.exists()  # never deleted


def test_atomic_save_leaves_previous_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "x.pt"
    atomic.torch_save(_state(1), path)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        atomic.torch_save(_state(2), path)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]  # no temporary left behind


def test_missing_keys_and_identity(tmp_path):
    path = tmp_path / "step_00000001.pt"
    torch.save({"step": 1}, path)
    with pytest.raises(ValueError, match="lacks"):
        ckpt.load_checkpoint(path)
    with pytest.raises(ValueError, match="objective='min_recall'.*objective='h_mean'"):
        ckpt.check_identity(path, {"objective": "min_recall"}, {"objective": "h_mean"})


def test_prune_keeps_newest(tmp_path):
    for step in (1, 2, 3, 4):
        atomic.torch_save(_state(step), ckpt.step_path(tmp_path, step))
    ckpt.prune(tmp_path, 2)
    assert [s for s, _ in ckpt.list_step_checkpoints(tmp_path)] == [4, 3]
