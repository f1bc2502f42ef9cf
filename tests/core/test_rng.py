from __future__ import annotations

import pytest
import torch

from selmix_dist.core.rng import _splitmix64, derive_seed, generator


def test_splitmix64_reference_values() -> None:
    # the published splitmix64 sequence for state 0 (Vigna's reference implementation)
    assert _splitmix64(0) == 0xE220A8397B1DCDAF
    assert _splitmix64(0x9E3779B97F4A7C15) == 0x6E789E6AA1B965F4


def test_derive_seed_is_a_pure_function_of_its_keys() -> None:
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2)
    seeds = {derive_seed(s, r, t) for s in range(3) for r in range(4) for t in range(50)}
    assert len(seeds) == 3 * 4 * 50
    assert derive_seed(5, 1) != derive_seed(5, 1, 0) != derive_seed(5)
    assert derive_seed(5, "train") != derive_seed(5, "val")
    assert all(0 <= s < 2**64 for s in seeds)
    assert derive_seed(-1, -2) == derive_seed(2**64 - 1, 2**64 - 2)  # keys taken modulo 2^64


def test_generator_streams() -> None:
    a = torch.rand(8, generator=generator(3, 0, 7))
    b = torch.rand(8, generator=generator(3, 0, 7))
    c = torch.rand(8, generator=generator(3, 1, 7))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="key #2"):
        derive_seed(0, 1, 2.5)
