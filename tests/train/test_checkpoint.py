"""Checkpoint files: latest-valid discovery, content checksum, non-finite refusal, pruning, resume rules."""

from __future__ import annotations

import pytest
import torch

from selmix_dist import atomic
from selmix_dist.config import load_config, resume_changes
from selmix_dist.train import checkpointer as ckpt


def _state(step: int, value: float | None = None) -> dict:
    state = {"format_version": ckpt.FORMAT_VERSION, "step": step, "identity": {"num_classes": 2},
             "config": {"objective.name": "min_recall"},
             "head": {"weight": torch.full((2, 3), float(step if value is None else value))},
             "optimizer": {}, "scheduler": {}, "objective": {}, "refresh": None, "progress": {}}
    return {**state, "checksum": ckpt.content_checksum(state)}


def test_latest_valid_skips_corrupt_and_keeps_it(run_dir, caplog):
    c = ckpt.Checkpointer(run_dir, keep=5)
    for step in (10, 20):
        atomic.torch_save(_state(step), ckpt.step_path(c.dir, step))
    broken = ckpt.step_path(c.dir, 30)
    broken.write_bytes(ckpt.step_path(c.dir, 20).read_bytes()[:100])  # a torn write
    path, state = c.latest()
    assert path.name == "step_00000020.pt" and state["step"] == 20
    assert "step_00000030" in caplog.text and "skipping" in caplog.text  # the reason is reported
    assert broken.exists()  # never deleted


def test_checksum_catches_a_bit_flip_that_still_unpickles(tmp_path):
    path = tmp_path / "step_00000001.pt"
    atomic.torch_save(_state(1, value=0.5), path)
    raw = bytearray(path.read_bytes())
    # flip one bit inside the stored float32 0.5 (bytes 00 00 00 3f): the zip container stays readable
    at = raw.find(bytes.fromhex("0000003f"))
    raw[at + 1] ^= 0x01
    path.write_bytes(bytes(raw))
    assert torch.load(path, weights_only=True)["head"]["weight"][0, 0] != 0.5  # still loads, silently wrong
    with pytest.raises(ValueError, match="checksum"):
        ckpt.load_checkpoint(path)


def test_checksum_is_independent_of_key_order_and_sensitive_to_values():
    a = {"x": torch.arange(3), "y": {"b": 1, "a": [1.0, 2.0]}}
    b = {"y": {"a": [1.0, 2.0], "b": 1}, "x": torch.arange(3)}
    assert ckpt.content_checksum(a) == ckpt.content_checksum(b)
    assert ckpt.content_checksum(a) != ckpt.content_checksum({**a, "x": torch.tensor([0, 1, 3])})
    assert ckpt.content_checksum(a) != ckpt.content_checksum({**a, "x": torch.arange(3).to(torch.int32)})


def test_non_finite_head_is_never_written_and_never_loaded(run_dir, tmp_path):
    c = ckpt.Checkpointer(run_dir, keep=2)
    bad = _state(5)
    bad["head"]["weight"][0, 0] = float("nan")
    with pytest.raises(ckpt.NonFiniteStateError, match="step 5"):
        c.write(bad)
    assert not c.any_present()
    path = tmp_path / "nan.pt"
    torch.save({**bad, "checksum": ckpt.content_checksum(bad)}, path)  # written by something else
    with pytest.raises(ValueError, match="non-finite"):
        ckpt.load_checkpoint(path)


def test_prune_keeps_the_newest_valid_ones(run_dir):
    c = ckpt.Checkpointer(run_dir, keep=2)
    for step in (1, 2, 3):
        c.write(_state(step))
    ckpt.step_path(c.dir, 3).write_bytes(b"garbage")  # the newest is unreadable
    c.write(_state(4))
    # 4 and 2 are the newest valid ones; the unreadable 3 between them stays (never the only fallback)
    assert [s for s, _ in ckpt.list_step_checkpoints(c.dir)] == [4, 3, 2]
    listed = run_dir.manifest()["artifacts"]
    assert "checkpoints/step_00000001.pt" not in listed and "checkpoints/step_00000004.pt" in listed


def test_format_1_checkpoints_migrate(tmp_path):
    old = {"format_version": 1, "step": 3, "identity": {"objective": "min_recall", "num_classes": 2,
                                                       "setting": "semi", "num_features": 3},
           "head": {"weight": torch.zeros(2, 3)}, "optimizer": {}, "scheduler": {}, "objective": {},
           "refresh": {}, "progress": {}}
    path = tmp_path / "step_00000003.pt"
    torch.save(old, path)
    state = ckpt.load_checkpoint(path)
    assert state["config"] == {"objective.name": "min_recall", "selmix.setting": "semi"}
    assert state["identity"] == {"num_classes": 2, "num_features": 3}


def test_resume_rules_name_every_result_changing_key(tmp_path):
    from selmix_dist.config import flatten

    saved = flatten(load_config(None, [f"run.dir={tmp_path}", f"data.features={tmp_path}/feats"]))
    cfg = load_config(None, [f"run.dir={tmp_path}", f"data.features={tmp_path}/sub/../feats",
                             "optim.lr=0.1", "objective.params={omega: 3}", "log.log_every=7",
                             "run.steps=20000"])
    refused, allowed = resume_changes(saved, cfg)
    assert set(refused) == {"optim.lr", "objective.params", "run.steps"}
    assert refused["optim.lr"] == (3e-4, 0.1)
    # the same data through another path, and logging, may change
    assert set(allowed) == {"log.log_every", "data.features"}
    extended = load_config(None, [f"run.dir={tmp_path}", f"data.features={tmp_path}/feats", "run.steps=20000",
                                  "run.extend_steps=true"])
    refused, allowed = resume_changes(saved, extended)
    assert not refused and allowed == {"run.steps": (10000, 20000), "run.extend_steps": (False, True)}
