"""Deterministic randomness: every random draw is a pure function of (seed, *keys).

A run never shares a global generator between ranks or steps; instead each consumer derives its own
``torch.Generator`` from the run seed and a tuple of keys such as ``(rank, step)``. Keys are mixed with
splitmix64, so neighbouring keys give unrelated streams.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["derive_seed", "generator"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One splitmix64 output for state ``x`` (a 64-bit bijective mixer)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _key_to_int(key: object, position: int) -> int:
    # bool is an int subclass; accept it as 0/1. Strings are hashed so names ("train", "val") can be keys.
    if isinstance(key, int):
        return key & _MASK64
    if isinstance(key, str):
        return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")
    raise ValueError(f"rng key #{position} must be an int or str, got {type(key).__name__}")


def derive_seed(seed: int, *keys: int | str) -> int:
    """Mix ``seed`` and ``keys`` into one 64-bit seed in ``[0, 2**64)``.

    Different key tuples (including different lengths, e.g. ``(1,)`` vs ``(1, 0)``) give different seeds
    with overwhelming probability; the same tuple always gives the same seed.
    """
    state = _splitmix64(_key_to_int(seed, 0))
    for position, key in enumerate(keys, start=1):
        # advance the state before absorbing the key: (seed, key) order matters, unlike a plain XOR
        # of mixed values, which would make (seed=0, rank=1) collide with (seed=1, rank=0)
        state = _splitmix64(_splitmix64(state) ^ _key_to_int(key, position))
    return state


def generator(seed: int, *keys: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded with ``derive_seed(seed, *keys)``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, *keys))
    return gen
