"""torch.distributed helpers: who does which share of the work, and how results reach every rank.

Everything here degrades to the single-process case: without an initialized process group
``world()`` is ``(0, 1)``, ``assign`` gives everything to rank 0, ``barrier`` does nothing and
``shared_map`` computes every item locally. Under ``torchrun`` (``WORLD_SIZE > 1``)
``init_from_env`` creates the process group (gloo on the CPU, NCCL on GPUs).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import heapq
import os
import subprocess
import sys
from typing import Callable, ContextManager, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")
R = TypeVar("R")

TIMEOUT = datetime.timedelta(hours=6)
"""Collective timeout: ranks may wait long at a barrier while the slowest finishes its share."""

_local_only = False


def init_from_env() -> bool:
    """Create the default process group if launched by torchrun with ``WORLD_SIZE > 1``; True if distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=TIMEOUT)
    return True


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when not distributed or inside :func:`local`."""
    if _local_only or not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return world()[0] == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if world()[1] > 1:
        dist.barrier()


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Within the block, behave as a single process (for work a caller already split across ranks)."""
    global _local_only
    previous, _local_only = _local_only, True
    try:
        yield
    finally:
        _local_only = previous


def assign(costs: Sequence[float], world_size: int) -> list[int]:
    """The owner rank of each item: greedy longest-processing-time balancing of ``costs``.

    Deterministic (ties broken by index and rank), so every rank computes the same assignment.
    The largest rank's load is at most 4/3 of the optimum.
    """
    owners = [0] * len(costs)
    loads = [(0.0, r) for r in range(world_size)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, r = heapq.heappop(loads)
        owners[i] = r
        heapq.heappush(loads, (load + costs[i], r))
    return owners


def shared_map(items: Sequence[T], compute: Callable[[T], R], costs: Sequence[float]) -> Iterator[tuple[T, R]]:
    """``(item, compute(item))`` for every item, in order, on every rank.

    Distributed: each rank computes its :func:`assign` share first (so the ranks work in
    parallel), then every result is broadcast from its owner (``broadcast_object_list``: results
    are small, e.g. adapter factors), so all ranks end with identical results. Single process:
    computed lazily, one item at a time.
    """
    rank, size = world()
    if size == 1:
        for item in items:
            yield item, compute(item)
        return
    owners = assign(costs, size)
    mine = {i: compute(item) for i, item in enumerate(items) if owners[i] == rank}
    for i, item in enumerate(items):
        box = [mine.pop(i, None)]
        dist.broadcast_object_list(box, src=owners[i])
        yield item, box[0]


# --- data-parallel training ----------------------------------------------------------------------


def command_line(parser: argparse.ArgumentParser, args: argparse.Namespace, drop: set[str]) -> list[str]:
    """The sub-command of ``parser`` and the options of ``args`` that differ from their defaults (minus ``drop``), as argv."""
    argv = [parser.prog.split()[-1]]
    for action in parser._actions:
        value = getattr(args, action.dest, action.default)
        if not action.option_strings or action.dest in drop or action.dest == "help" or value == action.default:
            continue
        option = next(o for o in action.option_strings if o.startswith("--"))
        if action.nargs == 0:  # a flag
            argv.append(option)
        else:
            argv += [option, *map(str, value if isinstance(value, list) else [value])]
    return argv


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``python -m pissa ARGV`` under torchrun with ``nproc`` processes on this machine; its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "pissa", *argv]
    return subprocess.call(cmd)


def data_parallel(model: nn.Module) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel when distributed (gradients of the trainable
    parameters are averaged over ranks in backward), else ``model`` itself.

    Buffers (A0, B0, 4-bit codes) never change, so they are not re-broadcast at every forward.
    """
    if world()[1] == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = _comm_device()
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or ``model``)."""
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model


def no_sync(model: nn.Module, skip: bool) -> ContextManager:
    """Within the block, backward does not all-reduce (gradient accumulation) when ``skip`` and ``model`` is DDP."""
    return model.no_sync() if skip and unwrap(model) is not model else contextlib.nullcontext()


def my_share(items: Sequence[T]) -> list[T]:
    """This rank's items of a global list: ``items[rank::world_size]``."""
    rank, size = world()
    return list(items[rank::size])


def all_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sums over ranks (float64); ``values`` itself in a single process."""
    if world()[1] == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def _comm_device() -> torch.device:
    """NCCL moves CUDA tensors only; gloo moves CPU tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
