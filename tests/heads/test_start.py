"""The start head: one seed gives one head whatever the caller's thread count or launcher."""

from __future__ import annotations

import torch

from selmix_dist.heads.selftrain import self_train_head
from selmix_dist.heads.start import fit_start_head, read_head, zero_head


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1500, 256, generator=g)
    y = torch.randint(0, 10, (1500,), generator=g)
    u = torch.randn(2000, 256, generator=g)
    return x, y, u


def test_fitted_start_head_ignores_the_callers_thread_count():
    x, y, u = _data()
    heads, plain = [], []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            heads.append(fit_start_head("fixmatch_la", x, y, 10, unlabeled=u, weight_decay=5e-4, steps=60, seed=0))
            # the same self-training without the fixed thread count: float32 reductions follow the threads
            la = fit_start_head("la", x, y, 10, unlabeled=None, weight_decay=5e-4, steps=60, seed=0)
            plain.append(self_train_head(la, x, y, u, steps=60, seed=0))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(heads[0].weight, heads[1].weight) and torch.equal(heads[0].bias, heads[1].bias)
    assert torch.get_num_threads() == before
    # why the rule exists: where the thread count differs, so does the self-trained head
    assert not torch.equal(plain[0].weight, plain[1].weight)


def test_read_head_accepts_state_dicts_and_checkpoints(tmp_path):
    head = zero_head(4, 3)
    torch.save(head.state_dict(), tmp_path / "h.pt")
    torch.save({"head": head.state_dict(), "step": 5}, tmp_path / "c.pt")
    for name in ("h.pt", "c.pt"):
        assert torch.equal(read_head(tmp_path / name, 4, 3).weight, head.weight)
    import pytest

    with pytest.raises(ValueError, match="does not fit a Linear"):
        read_head(tmp_path / "h.pt", 5, 3)
    with pytest.raises(ValueError, match="neither one of"):
        read_head(tmp_path / "missing.pt", 4, 3)
