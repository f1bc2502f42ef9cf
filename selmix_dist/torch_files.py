"""Reading a `torch.save` file as plain tensors and containers, with one error that says what is wrong with it.

`torch.load(weights_only=True)` never runs code from the file, but its errors are poor reasons: an empty file
raises EOFError with an empty message, a truncated one a miniz or iostream error, a pickle of arbitrary
objects a page about PyTorch 2.6 defaults. `load_tensors` names the file and the cause instead.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6 is a zip archive


def load_tensors(path: str | Path, what: str) -> Any:
    """`torch.load(path, map_location="cpu", weights_only=True)`; a file that cannot be loaded raises
    ValueError("<what> <path> <reason>"), e.g. "checkpoint runs/x/step_00000020.pt is empty (0 bytes): ..."."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated or foreign files raise many kinds of errors
        raise ValueError(f"{what} {path} {unreadable_reason(path, err)}") from err


def unreadable_reason(path: Path, err: BaseException) -> str:
    """Why `path` failed to load with `err`, in words (never empty)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            magic = fh.read(len(ZIP_MAGIC))
    except OSError as os_err:
        return f"cannot be read: {os_err.strerror or os_err}"
    if size == 0:
        return "is empty (0 bytes): its write never completed (a crash, or a full disk)"
    if isinstance(err, pickle.UnpicklingError):  # the weights-only unpickler's own reason, without torch's advice
        paragraphs = [p.strip() for p in str(err).split("\n\n") if p.strip()]
        reasons = [p for p in paragraphs if not p.startswith(("Weights only load failed", "Check the documentation"))]
        why = reasons[-1] if reasons else ""
        if "GLOBAL" in why:  # a callable the pickle would have called
            return (f"holds objects other than tensors, numbers, strings and containers ({why}); no code from it "
                    "ran: it is not a head or checkpoint we wrote")
        return f"is not a torch.save file of tensors ({size} bytes; {why or 'not a pickle'}); no code from it ran"
    if magic == ZIP_MAGIC and not zipfile.is_zipfile(path):
        return (f"is truncated ({size} bytes; its zip archive has no end): the write or copy was cut short, "
                "or the disk was full")
    text = str(err).strip().splitlines()
    return f"is not a readable torch.save file ({size} bytes; {type(err).__name__}{f': {text[0]}' if text else ''})"
