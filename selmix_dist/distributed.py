"""Everything that talks to torch.distributed / accelerate lives here.

The rest of the package sees plain tensors and these few collectives. Every function works in a
single process without an initialised process group (world size 1), so library code and tests never
branch on "am I distributed?".

Reductions are exact: callers reduce per-rank *sums and counts* (int64 or float64) over disjoint
shards, never averages over padded batches, so the result is the same whatever the world size.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_info() -> tuple[int, int]:
    """(rank, world_size) of this process; (0, 1) without a process group."""
    if is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return world_info()[0] == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous, disjoint slice [start, stop) of range(n) owned by `rank`; slices cover range(n).

    The first n % world ranks get one extra element, so sizes differ by at most one and nothing is padded.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, world={world})")
    if n < 0:
        raise ValueError(f"cannot shard a negative length {n}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _comm_device(tensor: torch.Tensor) -> torch.device:
    # NCCL only moves CUDA tensors; gloo only CPU ones.
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(tensor: torch.Tensor, op) -> torch.Tensor:
    """`op` over ranks, as a new tensor on the input's device (the input is not modified)."""
    if not is_initialized():
        return tensor.clone()
    buf = tensor.detach().to(_comm_device(tensor)).clone()
    dist.all_reduce(buf, op=op)
    return buf.to(tensor.device)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    return _all_reduce(tensor, dist.ReduceOp.SUM)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    return _all_reduce(tensor, dist.ReduceOp.MAX)


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0 the tensors of every rank, in rank order; lengths may differ.

    Shapes beyond dim 0 and dtypes must agree. Used for contiguous shards, so rank order is index order.
    """
    if not is_initialized():
        return tensor.clone()
    device = _comm_device(tensor)
    rank_, world = world_info()
    length = torch.tensor([tensor.shape[0]], device=device, dtype=torch.int64)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    sizes = [int(x.item()) for x in lengths]
    longest = max(sizes)
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=device)
    padded[: tensor.shape[0]] = tensor.detach().to(device)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:s] for g, s in zip(gathered, sizes, strict=True)]).to(tensor.device)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """The object held by rank `src`, on every rank (pickled; for small control data only)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on at least one (e.g. a SIGTERM seen by one rank)."""
    return bool(all_reduce_max(torch.tensor([int(flag)], dtype=torch.int64)).item())


def broadcast_tensor(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank `src`'s tensor on every rank (same shape and dtype everywhere)."""
    if not is_initialized():
        return tensor
    buf = tensor.contiguous().to(_comm_device(tensor))
    dist.broadcast(buf, src=src)
    return buf.to(tensor.device)


def make_accelerator(**kwargs: Any):
    """An `accelerate.Accelerator` for this launch: gloo for multi-process CPU runs.

    DeepSpeed would default to NCCL even without a GPU; naming a backend in a plain single-process run
    would make accelerate try to join a process group, so gloo is named only when several processes run.
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        kwargs.setdefault("kwargs_handlers", []).append(InitProcessGroupKwargs(backend="gloo"))
    return Accelerator(**kwargs)


def set_deepspeed_micro_batch(accelerator, batch_size: int) -> None:
    """DeepSpeed reads the micro-batch size from a prepared DataLoader; the trainer prepares none."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:
        conf = plugin.deepspeed_config
        conf["train_micro_batch_size_per_gpu"] = batch_size
        conf["train_batch_size"] = batch_size * accelerator.num_processes * conf.get("gradient_accumulation_steps", 1)


def unwrap(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under the wrapper `accelerator.prepare` put around it (DDP, DeepSpeed engine).

    accelerate's own `unwrap_model` imports DeepSpeed whenever it is installed (16 MB more private memory
    per rank, and a warning on stdout on CPU machines), so it is used only in DeepSpeed runs.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.unwrap_model(model)
    while isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model
