"""Finished (seed, ρ_u, method) results, stored as they complete so that a rerun skips them.

``<root>/seed<s>/[rho_u<r>/]<method>-<digest>.json`` (metrics, seconds, notes) and ``….pt`` (the head's
state dict, for methods that start from it). The digest hashes everything the result depends on (data,
split, seed, ρ_u when the method sees unlabeled data, the method's settings with library defaults filled in,
and its start head's digest), so a changed setting is a new file and stored results are never overwritten by
another configuration's. A method that sees only labeled data is stored once per seed (no ρ_u directory):
its head is the same for every ρ_u. The JSON is written after the head, so a JSON marks a complete result.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selmix_dist import atomic


def digest(obj: Any) -> str:
    """16 hex digits of the sha256 of ``obj`` as canonical JSON."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class ResultStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, method: str, seed: int, rho_u: float | None, key: str, suffix: str) -> Path:
        folder = self.root / f"seed{seed}"
        if rho_u is not None:
            folder = folder / f"rho_u{rho_u:g}"
        return folder / f"{method}-{key}{suffix}"

    def get(self, method: str, seed: int, rho_u: float | None, key: str) -> dict | None:
        """The stored record, or None when this exact result was never completed."""
        path = self._path(method, seed, rho_u, key, ".json")
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"stored result {path} is not valid JSON ({e}); move it away to recompute it") from e

    def head(self, method: str, seed: int, rho_u: float | None, key: str) -> nn.Linear:
        """The stored head of a completed result."""
        path = self._path(method, seed, rho_u, key, ".pt")
        if not path.is_file():
            raise FileNotFoundError(f"stored head {path} is missing (its result JSON exists); move the JSON "
                                    "away to recompute it")
        state = torch.load(path, map_location="cpu", weights_only=True)
        k, d = state["weight"].shape
        head = nn.Linear(d, k)
        head.load_state_dict(state)
        return head

    def put(self, method: str, seed: int, rho_u: float | None, key: str, record: dict, head: nn.Linear) -> None:
        state = {name: t.detach().to("cpu", torch.float32) for name, t in head.state_dict().items()}
        atomic.torch_save(state, self._path(method, seed, rho_u, key, ".pt"))
        atomic.write_text(self._path(method, seed, rho_u, key, ".json"), json.dumps(record, indent=1) + "\n")
