"""torch.distributed helpers: who does which share of the work, and how results reach every rank.

Everything here degrades to the single-process case: without an initialized process group
``world()`` is ``(0, 1)``, ``assign`` gives everything to rank 0, ``barrier`` does nothing and
``shared_map`` computes every item locally. Under ``torchrun`` (``WORLD_SIZE > 1``)
``init_from_env`` creates the process group (gloo on the CPU, NCCL on GPUs) and registers
:func:`shutdown` to tear it down at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import gc
import heapq
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import TypeVar, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from pissa.errors import PissaError

T = TypeVar("T")
R = TypeVar("R")

TIMEOUT = datetime.timedelta(hours=6)
"""Collective timeout: ranks may wait long at a barrier while the slowest finishes its share."""

_local_only = False


def init_from_env() -> bool:
    """Create the default process group if launched by torchrun with ``WORLD_SIZE > 1``; True if distributed.

    Also registers :func:`shutdown` with :mod:`atexit`, so the group is torn down while the
    interpreter is still whole, whatever way the program ends.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=TIMEOUT)
    atexit.unregister(_at_exit)  # at most once, however often a process group is created
    atexit.register(_at_exit)
    return True


def shutdown(wait: bool = True) -> None:
    """Destroy the default process group (and every other one); a no-op when there is none.

    With ``wait``, a barrier first: every rank has finished every collective (gloo's barrier also
    waits for this rank's queued asynchronous work) before any rank tears its connections down.
    Skip it (``wait=False``) on an error path, where the other ranks may never reach the barrier.

    Torch does not do this by itself. Left alone, the group is destroyed by the garbage collector
    in the middle of interpreter finalization, or never if something (FSDP2 state) still holds
    it, so gloo's C++ threads are joined, or still running, while Python is being dismantled; a
    worker can then abort with "terminate called without an active exception" after all its
    work succeeded. :func:`init_from_env` registers this to run at exit, while Python is whole.

    Destroying the group only unregisters it: the C++ group (and its threads) lives as long as
    something holds it. FSDP2 leaves it in DTensor's sharding caches (specs -> device mesh ->
    group), which :func:`_release_groups` clears; a sharded model the program still holds (a
    module-level global) keeps it too, so drop such a model before the program ends.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if wait and dist.get_world_size() > 1:
            dist.barrier()
    finally:
        dist.destroy_process_group()
        _release_groups()


def _release_groups() -> None:
    """Clear DTensor's sharding-propagation and redistribution caches (which hold device meshes,
    hence process groups) and collect garbage, so that destroyed groups are freed, and their gloo
    threads joined, now rather than during interpreter finalization."""
    from torch.distributed.tensor import _redistribute, debug

    debug._clear_sharding_prop_cache()
    _redistribute._gen_transform_infos.cache_clear()
    gc.collect()


def _at_exit() -> None:
    """The :mod:`atexit` teardown: :func:`shutdown`, with the barrier only if no exception is
    propagating out of the program (the interpreter records an uncaught one in ``sys.last_value``
    before exit handlers run), since a failed rank's peers may never reach the barrier."""
    shutdown(wait=getattr(sys, "last_value", None) is None and getattr(sys, "last_exc", None) is None)


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
        yield item, cast(R, box[0])  # the owner's result, received by every rank


# --- data-parallel training ----------------------------------------------------------------------


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``python -m pissa ARGV`` under torchrun with ``nproc`` processes on this machine; its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "pissa", *argv]
    return subprocess.call(cmd)


def data_parallel(model: nn.Module) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel when distributed (gradients of the trainable
    parameters are averaged over ranks in backward), else ``model`` itself (also when it is
    already sharded by :func:`shard`, which averages gradients itself).

    Buffers (A0, B0, 4-bit codes) never change, so they are not re-broadcast at every forward.
    """
    if world()[1] == 1 or is_sharded(model):
        return model
    device = _comm_device()
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False)


def shard(model: nn.Module, device: torch.device) -> nn.Module:
    """Shard ``model`` over every rank with FSDP2 (``fully_shard``), in place: each decoder block
    (the classes Hugging Face lists in ``_no_split_modules``) is one unit, the rest of the model
    the root unit. Each rank keeps ``1/world`` of every parameter, frozen residual weights
    included; a block's full weights exist only while it runs (all-gathered before its forward and
    again before its backward, freed after).

    Parameters keep their dtypes (a bfloat16 base with float32 factors all-gathers each in its
    own); gradients are reduce-scattered in float32 and averaged over ranks, as DDP's are.
    Buffers (A0, B0, 4-bit codes, rotary tables) are not sharded: every rank holds them.
    """
    size = world()[1]
    if size == 1:
        raise PissaError("`fsdp` shards the model over processes: add `nproc` N (N >= 2) or launch under torchrun")
    kinds = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in kinds]
    if not blocks:
        raise PissaError(f"`fsdp`: {type(model).__name__} names no decoder blocks to shard (_no_split_modules); "
                         "train it with `nproc` N without `fsdp` (data-parallel)")
    mesh = init_device_mesh(device.type, (size,))
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def is_sharded(model: nn.Module) -> bool:
    """True for a model sharded by :func:`shard` (FSDP2)."""
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def lockstep(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Within the block, each rank may call the sharded ``model`` (:func:`shard`) a different number of times, e.g.
    to score its own share of the test examples; a no-op for a model that is not sharded.

    Every forward of a sharded model is a collective (each block all-gathers its weights), so the ranks must run
    their forwards together. Here each forward is one round: every rank first says whether it has a forward to run
    (:func:`any_rank`, before FSDP's own pre-forward hook); a rank that has finished its work runs a forward of one
    token (its output dropped) in every round until no rank has work left. On exit the root unit's all-gathered
    weights (the root keeps them after a forward, waiting for a backward that no evaluation runs) are freed.
    """
    if not is_sharded(model):
        yield
        return
    def announce(module: nn.Module, args: tuple) -> None:
        any_rank(True)  # this rank runs a forward in this round

    handle = model.register_forward_pre_hook(announce, prepend=True)
    try:
        yield
    finally:
        handle.remove()
    idle = torch.zeros((1, 1), dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        while any_rank(False):  # a round in which another rank runs a forward: join it
            model(input_ids=idle)
    model.train(was_training)
    cast(FSDPModule, model).reshard()


def full(t: Tensor) -> Tensor:
    """The whole tensor of an FSDP2 shard (a collective: every rank must call it, in the same order); ``t`` itself otherwise."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def like(value: Tensor, param: Tensor) -> Tensor:
    """``value`` (a whole tensor of ``param``'s shape) as ``param`` holds it: this rank's shard when
    ``param`` is an FSDP2 DTensor (every rank passes the same ``value``), else ``value`` itself."""
    if not isinstance(param, DTensor):
        return value
    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or ``model``)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def no_sync(model: nn.Module, skip: bool) -> AbstractContextManager[None]:
    """Within the block, backward does not reduce gradients over ranks (gradient accumulation) when
    ``skip`` and ``model`` is DDP or FSDP2 (which then keeps unsharded gradients until the last micro-batch)."""
    if skip and isinstance(model, DistributedDataParallel):
        return model.no_sync()
    if isinstance(model, FSDPModule):
        return _fsdp_sync(model, not skip)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_sync(model: FSDPModule, sync: bool) -> Iterator[None]:
    model.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def my_share(items: Sequence[T]) -> list[T]:
    """This rank's items of a global list: ``items[rank::world_size]``."""
    rank, size = world()
    return list(items[rank::size])


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (``flag`` in a single process)."""
    return all_sum([float(flag)])[0] > 0


def all_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sums over ranks (float64); ``values`` itself in a single process."""
    if world()[1] == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def sum_tensors(tensors: Sequence[Tensor]) -> None:
    """Sum each tensor over ranks in place (every rank passes tensors of the same shapes, in the same
    order); a no-op in a single process. Sent through the communication device and copied back."""
    if world()[1] == 1:
        return
    device = _comm_device()
    for t in tensors:
        buf = t.to(device)
        dist.all_reduce(buf)
        if buf is not t:
            t.copy_(buf)


def _comm_device() -> torch.device:
    """NCCL moves CUDA tensors only; gloo moves CPU tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
