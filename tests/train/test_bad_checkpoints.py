"""Unreadable heads and checkpoints: one error naming the file and what is wrong with it, no code from the file
run (issue 19; before the fix a malicious model.init_head printed a full traceback, a 0-byte checkpoint was
skipped with an empty reason, "cannot be read: ", and a truncated one with only a miniz/iostream message)."""

from __future__ import annotations

import logging
import os
import pickle
import re
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "train"))
from test_containment import cache as cache  # noqa: E402,F401 - the module fixture, shared
from test_containment import one_error_line, train  # noqa: E402

from selmix_dist.heads.start import read_head  # noqa: E402
from selmix_dist.train.checkpointer import latest_valid_checkpoint, load_checkpoint  # noqa: E402


class _RunsCode:
    """Unpickling this calls os.system: a file that would run a command if loaded without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, the words its error must contain)."""
    good = folder / "good.pt"
    torch.save({"weight": torch.zeros(3, 4), "bias": torch.zeros(3)}, good)
    data = good.read_bytes()
    files = {"empty": (b"", "is empty (0 bytes)"),
             "truncated": (data[: len(data) // 2], f"is truncated ({len(data) // 2} bytes"),
             "text": (b"weight,bias\n1,2\n", "is not a torch.save file of tensors (16 bytes; Unsupported operand"),
             "pickle": (pickle.dumps(_RunsCode(folder / "ran")), "is not a torch.save file of tensors ("),
             "code": (None, "holds objects other than tensors, numbers, strings and containers (Trying to load "
                            "unsupported GLOBAL posix.system")}
    out = {}
    for name, (content, words) in files.items():
        if content is None:  # a torch.save zip whose pickle calls os.system
            torch.save(_RunsCode(folder / "ran"), folder / f"{name}.pt")
        else:
            (folder / f"{name}.pt").write_bytes(content)
        out[name] = (folder / f"{name}.pt", words)
    return out


@pytest.mark.parametrize("name", ["empty", "truncated", "text", "pickle", "code"])
def test_read_head_names_what_is_wrong_with_the_file(tmp_path, name):
    path, words = bad_files(tmp_path)[name]
    with pytest.raises(ValueError) as raised:
        read_head(path, 4, 3)
    assert str(raised.value).startswith(f"head file {path} {words}"), str(raised.value)
    assert "PyTorch 2.6" not in str(raised.value)  # torch's advice to load with weights_only=False is dropped
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("state", [{"weight": "a string", "bias": torch.zeros(3)}, [1, 2, 3], torch.zeros(3, 4)])
def test_read_head_refuses_files_that_hold_no_head(tmp_path, state):
    path = tmp_path / "not_a_head.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=f"head file {path} does not fit a Linear\\(4, 3\\)"):
        read_head(path, 4, 3)


@pytest.mark.parametrize("name", ["empty", "truncated"])
def test_a_broken_step_checkpoint_is_skipped_with_its_reason(tmp_path, name, caplog):
    path, words = bad_files(tmp_path)[name]
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    step = folder / "step_00000010.pt"
    path.rename(step)
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {step} {words}")):
        load_checkpoint(step)
    with caplog.at_level(logging.WARNING):
        assert latest_valid_checkpoint(folder) is None
    assert f"skipping unusable checkpoint: checkpoint {step} {words}" in caplog.text


def test_a_malicious_init_head_is_one_error_line_and_runs_nothing(cache, tmp_path):
    path, words = bad_files(tmp_path)["code"]
    line = one_error_line(train(cache, tmp_path / "run", f"model.init_head={path}"))
    assert line.startswith(f"error: head file {path} {words}"), line
    assert not (tmp_path / "ran").exists()
