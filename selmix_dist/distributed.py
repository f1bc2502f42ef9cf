"""Everything that talks to torch.distributed / accelerate lives here.

The rest of the package sees plain tensors and these few collectives. Every function works in a
single process without an initialised process group (world size 1), so library code and tests never
branch on "am I distributed?".

Reductions are exact: callers reduce per-rank *sums and counts* (int64 or float64) over disjoint
shards, never averages over padded batches, so the result is the same whatever the world size.
"""

from __future__ import annotations

import gc
import importlib
import logging
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
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
    """An `accelerate.Accelerator` for this launch: gloo and multi-CPU data parallelism for CPU ranks.

    DeepSpeed would default to NCCL even without a GPU; naming a backend in a plain single-process run
    would make accelerate try to join a process group, so gloo is named only when several processes run.
    Without `cpu=True` (or ACCELERATE_USE_CPU=1, which `accelerate launch` users had to remember) accelerate
    joins the ranks' process group but does not wrap the head for data parallelism on a machine without a
    GPU: every rank trained its own head. DeepSpeed keeps its own engine (cpu=True would replace it).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        kwargs.setdefault("kwargs_handlers", []).append(InitProcessGroupKwargs(backend="gloo"))
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
            kwargs.setdefault("cpu", True)
    accelerator = Accelerator(**kwargs)
    if accelerator.num_processes > 1 and accelerator.distributed_type == DistributedType.NO:
        raise RuntimeError(f"{accelerator.num_processes} ranks, but accelerate chose no data parallelism; the "
                           "ranks would train different heads")
    return accelerator


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


def launch_forked(rank_main: Callable[..., int], nprocs: int, *args: Any, nnodes: int = 1, node_rank: int = 0,
                  master: str = "") -> int:
    """Run `rank_main(*args)` on `nprocs` ranks of this node, forked from this process; the run's exit code.

    Several nodes: call it on each with the same `nnodes` and `master` ("host:port", where node 0 listens)
    and that node's `node_rank`; node r's ranks are r·nprocs … (r+1)·nprocs − 1 (static rendezvous, as
    torchrun's --node-rank). One node: rendezvous on a free local port, `master` unused.

    Why fork: a rank started by `accelerate launch` or torchrun is a new interpreter that imports torch and
    the package again, about 0.5 GB of its own memory each with this torch build (docs/benchmarks.md). A
    forked rank shares those pages with this process and its sibling ranks until it writes them, so a node
    holds the runtime about once. The caller imports what the ranks use before calling, and runs no
    multi-threaded torch work first: GNU OpenMP's thread pool does not survive a fork, and a rank then hangs
    in its first parallel operation (seen after one 800 × 800 product in the parent). This freezes the
    garbage collector's view of the imported objects, so that collections in the ranks do not copy them.

    torch elastic's agent runs here (every rank's RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
    MASTER_ADDR/PORT set as torchrun does), in a thread of its own: a signal to this process (SIGTERM,
    SIGUSR1, SIGINT, SIGHUP, SIGQUIT) is forwarded to the ranks by this call's handler, and this returns
    128 + the first one's number once they have exited; on SIGTERM, SIGUSR1 or SIGINT a rank in its training
    loop saves the latest step boundary first. (SLURM's `--signal=USR1@T` signals every process of a step, so the
    ranks may get SIGUSR1 twice: the second changes nothing.) Why a thread: the agent's own handler (installed
    only in the main thread) stops polling the ranks, and a rank that returned waits for the agent to have
    read its exit code (an event in torch elastic's wrapper) until the agent SIGKILLs it 30 s later.

    `rank_main` returns its exit code (0: done) or raises. Returns 0 when every rank returned 0, else the
    lowest failed rank's code (1 for a rank that raised, or died by a signal); every failed rank is named
    on stderr.
    """
    if nprocs < 1 or nnodes < 1 or not 0 <= node_rank < nnodes:
        raise ValueError(f"cannot start {nprocs} ranks on node {node_rank} of {nnodes}; need at least 1 rank and "
                         "1 node, and 0 <= node rank < number of nodes")
    host, _, port = master.rpartition(":")
    if nnodes > 1 and not (host and port.isdigit()):
        raise ValueError(f"{nnodes} nodes need the master's address as HOST:PORT (the port node 0 listens on), "
                         f"got {master!r}")
    if "LOCAL_RANK" in os.environ or is_initialized():
        raise ValueError("this process is already a rank of a launched run (accelerate launch / torchrun set "
                         "LOCAL_RANK); start the forked ranks from a plain `python` process")
    if torch.cuda.is_initialized():
        raise RuntimeError("CUDA was initialised before forking the ranks; a forked process cannot use it")
    importlib.import_module("torch._dynamo")  # every rank's optimizer imports it (80 MB): here, it is shared
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    forwarder = _SignalForwarder()
    gc.collect()
    gc.freeze()
    # The agent's per-rank error files go to a directory of this call's own (by default it leaves one in
    # the system's temporary directory per launch).
    logs = tempfile.TemporaryDirectory(prefix="selmix_ranks_")
    outcome: dict[str, Any] = {}

    def agent() -> None:
        rendezvous = (dict(rdzv_backend="static", rdzv_endpoint=master, rdzv_configs={"rank": node_rank})
                      if nnodes > 1 else dict(rdzv_backend="c10d", rdzv_endpoint="localhost:0"))
        # One run id on every node: the static rendezvous keys its store by it.
        config = LaunchConfig(min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=nprocs, run_id="selmix_dist",
                              max_restarts=0, start_method="fork", logs_specs=DefaultLogsSpecs(log_dir=logs.name),
                              **rendezvous)
        try:
            outcome["codes"] = {rank: int(code) for rank, code in elastic_launch(config, rank_main)(*args).items()
                                if code}
        except ChildFailedError as err:  # a rank raised or died
            outcome["codes"] = {rank: failure.exitcode if failure.exitcode > 0 else 1
                                for rank, failure in err.failures.items()}
        except BaseException as err:  # noqa: BLE001 - re-raised in the calling thread below
            outcome["error"] = err

    thread = threading.Thread(target=agent, name="selmix_dist elastic agent")
    # The agent warns that, in a thread, it cannot forward signals and ranks could be orphaned: here they are
    # forwarded (by `forwarder`), so the warning would be wrong.
    agent_log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    agent_log.addFilter(_no_child_thread_warning)
    try:
        forwarder.install()
        thread.start()
        while thread.is_alive():
            thread.join(0.2)  # wakes up for signals: their handler runs in this (the main) thread
    finally:
        forwarder.uninstall()
        agent_log.removeFilter(_no_child_thread_warning)
        logs.cleanup()
        gc.unfreeze()
    if "error" in outcome:
        raise outcome["error"]
    codes = outcome["codes"]
    if codes:
        print("error: " + "; ".join(f"rank {rank} failed with exit code {code}" for rank, code in sorted(codes.items()))
              + " (the output above says why)", file=sys.stderr)
    if forwarder.received:
        print(f"stopped by {forwarder.received[0].name}, forwarded to the ranks", file=sys.stderr)
        return 128 + int(forwarder.received[0])
    return codes[min(codes)] if codes else 0


def _no_child_thread_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Failed to register signal handlers since torchelastic is running")


class _SignalForwarder:
    """The forked launcher's handler of SIGTERM, SIGUSR1, SIGINT, SIGHUP and SIGQUIT: each is sent on to the
    ranks (this process's multiprocessing children). Never escalated to SIGKILL: SLURM sends SIGTERM after
    SIGUSR1, and a rank may still be writing the checkpoint the first signal asked for."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.received: list[signal.Signals] = []
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        # A signal this process ignores (SIGINT of a background job, SIGUSR1 under the SLURM script's trap) stays
        # ignored: whoever started the launcher chose that; the ranks inherit it until they install their own.
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS
                          if signal.getsignal(s) != signal.SIG_IGN}

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, _frame: Any) -> None:
        if os.getpid() != self.pid:
            # A rank forked before it installed handlers of its own: nothing to save yet. Exit with a code the agent
            # reads as a failure (a KeyboardInterrupt would be swallowed by torch elastic's wrapper: exit 0, no
            # result, and the agent would wait for it forever).
            os._exit(128 + signum)
        self.received.append(signal.Signals(signum))
        for child in multiprocessing.active_children():
            try:
                os.kill(child.pid, signum)
            except ProcessLookupError:  # exited meanwhile
                pass
