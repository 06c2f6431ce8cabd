"""Models larger than one process: build on the meta device, shard, then read only this rank's rows.

``pissa init`` writes OUT/residual (the base checkpoint with every target weight replaced by its
residual) and OUT/adapter. :func:`load_sharded` turns a model built on the meta device (no memory)
into the adapted, FSDP2-sharded model, under torchrun::

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained("OUT/residual"))
    pissa.load_sharded(model, "OUT/residual", "OUT/adapter")   # every rank

1. :func:`pissa.load_adapter` adapts the meta model (the factors are read; the residuals stay meta);
2. the model is sharded (:func:`pissa.runtime.distributed.shard`: one FSDP2 unit per decoder block) and
   materialized empty, each rank allocating its ``1/world`` of every parameter only;
3. each rank reads from the checkpoint's files exactly the rows of every tensor it holds (FSDP2
   shards dim 0, so a shard is one contiguous byte range, read with plain reads, no mmap); the
   adapter's tensors come from the adapter file; buffers that no file holds (rotary tables) are
   recomputed by the model's own initializer;
4. the residual weights are checked against the digests the adapter recorded, each rank hashing a
   share of the layers while streaming it in 16 MiB pieces, so an adapter never runs on another
   checkpoint; then every shard file against the digests ``pissa init`` recorded next to them
   (:data:`~pissa.files.digests.SHARD_DIGESTS`; embeddings and norms too), each rank hashing a share
   of the shards. A residual folder without that record (older) gets the per-layer check only.

No rank ever holds a whole weight it does not own, let alone the whole base. In a single process
(no torchrun) nothing is sharded and the model is filled whole: the same route loads a model
without ever holding a second copy of its weights.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from pissa.adapter.attach import adapted_layers
from pissa.adapter.save_load import load_adapter
from pissa.checkpoints.folder import Checkpoint, open_checkpoint, tensor_key
from pissa.errors import PissaError
from pissa.files.adapter_dir import AdapterFiles
from pissa.files.digests import check_shards, entry_digest
from pissa.files.safetensors import TORCH_DTYPES, Entry, read_into
from pissa.runtime import distributed
from pissa.runtime.devices import resolve_device


def load_sharded(model: nn.Module, checkpoint: str | os.PathLike, adapter: str | os.PathLike,
                 device: str | torch.device = "auto") -> nn.Module:
    """Adapt ``model`` (built on the meta device) with ``adapter``, shard it over the torchrun
    processes and fill this rank's shards from the residual ``checkpoint`` that ``pissa init``
    wrote with that adapter; returns the model, on ``device`` (``auto``: this rank's GPU, else the CPU).

    Under torchrun every rank must call it. Raises PissaError for a model not on the meta device,
    a checkpoint that is not the adapter's residual, or a tensor the checkpoint lacks.
    """
    device = resolve_device(device) if isinstance(device, str) else device
    real = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if not t.is_meta]
    if real:
        raise PissaError(f"load_sharded needs a model built on the meta device ({real[0]} is not): build it under "
                         "`with torch.device('meta'):` from the checkpoint's config")
    ckpt = open_checkpoint(checkpoint)
    files = AdapterFiles(adapter)  # validated and checked against its recorded digests
    load_adapter(model, files)
    model.to("meta")  # the factors too: every tensor is filled below, after sharding
    if distributed.world()[1] > 1:
        distributed.shard(model, device)
    model.to_empty(device=device)
    _check_residuals(ckpt, files.layers)
    check_shards(ckpt.root, ckpt.shards)
    _fill(model, ckpt, files.tensors())
    model.pissa_base = files.doc.get("base_model")  # type: ignore[assignment]
    return model


def _fill(model: nn.Module, ckpt: Checkpoint, adapter: dict[str, Tensor]) -> None:
    """Copy every parameter's and buffer's (local shard of) data from its source."""
    layers = {name for name, _ in adapted_layers(model)}
    keys = set(ckpt.entries)
    persistent = set(model.state_dict())
    recompute: set[str] = set()
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            owner, _, leaf = name.rpartition(".")
            if owner in layers:  # a tensor of the layer's adapter shape
                _local(t).copy_(_rows_of(adapter[name], t))
                continue
            layer, _, part = owner.rpartition(".")
            stored = f"{layer}.{leaf}" if part == "residual" and layer in layers else name  # the residual's weight, bias
            key = tensor_key(stored, keys)
            if key is not None:
                _read_rows(ckpt, ckpt.entries[key], t)
            elif name not in persistent:
                recompute.add(owner)  # a non-persistent buffer (e.g. a rotary table): the model computes it
            else:
                raise PissaError(f"{ckpt.root} has no tensor {stored!r}; pass the residual checkpoint pissa init "
                                 "wrote for this adapter and a model built from its config.json")
    init = getattr(model, "_init_weights", None)
    for owner in sorted(recompute):
        if not callable(init):
            raise PissaError(f"buffers of {owner!r} are in no file and {type(model).__name__} cannot recompute them; "
                             "load this model with from_pretrained instead")
        init(model.get_submodule(owner))


def _local(t: Tensor) -> Tensor:
    """The rows of ``t`` this rank holds (a DTensor's local shard; ``t`` itself otherwise)."""
    return t.to_local() if hasattr(t, "to_local") else t


def _row_range(t: Tensor) -> tuple[int, int]:
    """``[start, stop)`` of dim 0 held here: FSDP2's ``Shard(0)`` gives rank r the rows
    ``[r c, (r + 1) c)`` of ``c = ceil(rows / world)`` (the last ranks fewer, or none)."""
    rows = t.shape[0] if t.dim() else 1
    local = _local(t)
    if local is t:
        return 0, rows
    rank, size = distributed.world()
    chunk = -(-rows // size)
    start, stop = min(rows, rank * chunk), min(rows, (rank + 1) * chunk)
    if (local.shape[0] if local.dim() else 1) != stop - start:
        raise RuntimeError(f"internal error: shard of {tuple(t.shape)} holds {tuple(local.shape)}, not rows {start}:{stop}")
    return start, stop


def _rows_of(whole: Tensor, t: Tensor) -> Tensor:
    start, stop = _row_range(t)
    return whole[start:stop] if whole.dim() else whole


def _read_rows(ckpt: Checkpoint, entry: Entry, t: Tensor) -> None:
    """Fill ``t`` (or its local shard) from ``entry``, reading only the bytes of the rows held here."""
    if entry.dtype not in TORCH_DTYPES:
        raise PissaError(f"a tensor of safetensors dtype {entry.dtype} cannot be read here (shape {list(entry.shape)})")
    if tuple(entry.shape) != tuple(t.shape):
        raise PissaError(f"{ckpt.root}: a tensor of shape {list(entry.shape)} where the model has {list(t.shape)}; "
                         "build the model from the checkpoint's own config.json")
    start, stop = _row_range(t)
    if stop == start:
        return
    row_bytes = (entry.end - entry.start) // max(1, entry.shape[0] if entry.shape else 1)
    data = torch.empty((stop - start) * row_bytes, dtype=torch.uint8)
    with open(ckpt.root / entry.shard, "rb", buffering=0) as f:
        read_into(f, data, entry.start + start * row_bytes)
    rows = data.view(TORCH_DTYPES[entry.dtype]).view(stop - start, *entry.shape[1:]) if entry.shape else data.view(
        TORCH_DTYPES[entry.dtype]).view(())
    _local(t).copy_(rows)


def _check_residuals(ckpt: Checkpoint, layers: dict[str, dict]) -> None:
    """Each rank streams a share of the adapted layers' residual weights through the digest the
    adapter recorded; any mismatch, on any rank, is a PissaError on every rank."""
    keys = set(ckpt.entries)
    names = sorted(layers)
    entries = {}
    for name in names:
        key = tensor_key(f"{name}.weight", keys)
        if key is None:
            raise PissaError(f"{ckpt.root} has no weight for adapted layer {name!r}; pass the residual checkpoint "
                             "pissa init wrote with this adapter")
        entries[name] = ckpt.entries[key]
    owners = distributed.assign([entries[n].end - entries[n].start for n in names], distributed.world()[1])
    rank = distributed.world()[0]
    wrong = [float(owner == rank and entry_digest(ckpt.root / entries[n].shard, entries[n]) != layers[n]["residual_digest"])
             for n, owner in zip(names, owners)]
    first = next((n for n, w in zip(names, distributed.all_sum(wrong)) if w), None)
    if first is not None:
        raise PissaError(f"{ckpt.root} is not the residual checkpoint of this adapter (weights of {first!r} differ); "
                         "pass the OUT/residual that pissa init wrote together with OUT/adapter")
