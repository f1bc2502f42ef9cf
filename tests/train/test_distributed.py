"""selmix_dist.distributed: shard bounds, and the collectives on a real 2-process gloo group."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from selmix_dist import distributed as dist


@pytest.mark.parametrize("n, world", [(10, 3), (2, 4), (0, 2), (7, 1), (100, 8)])
def test_shard_bounds_partition_the_range(n, world):
    bounds = [dist.shard_bounds(n, r, world) for r in range(world)]
    covered = [i for a, b in bounds for i in range(a, b)]
    assert covered == list(range(n))  # contiguous, disjoint, in rank order, nothing padded
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_shard_bounds_by_hand_and_errors():
    assert [dist.shard_bounds(10, r, 3) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    with pytest.raises(ValueError, match="rank 3"):
        dist.shard_bounds(10, 3, 3)


def test_single_process_collectives_are_identities():
    t = torch.arange(6.0).view(3, 2)
    assert dist.world_info() == (0, 1) and dist.is_main_process()
    for out in (dist.all_reduce_sum(t), dist.all_gather_cat(t), dist.broadcast_tensor(t)):
        assert torch.equal(out, t)
    assert dist.broadcast_object({"a": 1}) == {"a": 1} and dist.any_rank(True) and not dist.any_rank(False)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        local = torch.arange(3 + rank, dtype=torch.int64) + 10 * rank  # ranks hold 3 and 4 rows
        result = {
            "gather": dist.all_gather_cat(local),
            "sum": dist.all_reduce_sum(torch.tensor([1.5, float(rank)], dtype=torch.float64)),
            "max": dist.all_reduce_max(torch.tensor([rank])),
            "bcast": dist.broadcast_tensor(torch.full((2,), float(rank + 7))),
            "obj": dist.broadcast_object({"rank": rank}),
            "any": dist.any_rank(rank == 1),
        }
        torch.save(result, f"{out}.{rank}")
    finally:
        tdist.destroy_process_group()


def test_collectives_on_two_gloo_processes(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path / "r")), nprocs=2, join=True)
    for rank in (0, 1):
        r = torch.load(tmp_path / f"r.{rank}", weights_only=True)
        assert r["gather"].tolist() == [0, 1, 2, 10, 11, 12, 13]
        assert r["sum"].tolist() == [3.0, 1.0] and r["max"].tolist() == [1]
        assert r["bcast"].tolist() == [7.0, 7.0] and r["obj"] == {"rank": 0}
        assert r["any"] is True
