"""``pissa init``: adapt a safetensors checkpoint on disk, one tensor at a time; and the reverse,
:func:`merge_checkpoint`: the trained model's merged checkpoint, streamed the same way.

    OUT/residual/   the same architecture and shard layout (config, tokenizer files, shards,
                    index): every target weight replaced by its residual; ``from_pretrained`` loads it
    OUT/adapter/    the save_adapter format, identical to ``attach`` + ``save_adapter`` in memory
    OUT/residual/residual_digests.json
                    the XXH3-128 of every residual shard file as written
                    (:data:`~pissa.files.digests.SHARD_DIGESTS`): ``load_sharded`` and
                    ``merge_checkpoint`` refuse a shard changed since (an embedding or norm too)

How: a residual has its weight's dtype and shape, so it occupies the same bytes of the same
shard. Each input shard is copied (a kernel copy: no user memory, nothing mapped), then each
target tensor is read alone, adapted by :func:`pissa.attach` on a one-layer stand-in model (the
very code of the in-memory path: same per-layer seed, factors, residual and digests) and its
residual is written over its byte range. Other tensors (embeddings, norms, the head) are never
loaded. Peak memory is one target tensor, its float32 copy and the SVD workspace (a small
multiple of the largest target tensor) plus one layer's factors when the adapter file is
assembled, whatever the checkpoint's size. With ``quantize="nf4"`` the checkpoint holds the
dense residual the 4-bit layer is quantized from (``load_adapter`` quantizes it again).

Memory: no checkpoint file is memory-mapped. ``safe_open`` maps the whole shard and (safetensors
0.8) hands out tensors that are views of that mapping, so every file page a computation touches
counts in the process's RSS (as RssFile) for as long as the tensor lives. Here tensors are read
with plain ``read`` calls into one reused buffer (:class:`Reader`) and written with plain writes,
and each range read from the input checkpoint is dropped from the page cache once used
(``POSIX_FADV_DONTNEED``: a stream reads it once): the checkpoint adds nothing to RssFile, and the
RSS is the same whether its pages are freshly written, cached or on disk only. The architecture
(target names, Conv1D layouts) is read from config.json by a short-lived child process
(:func:`architecture`), so this process never carries transformers' ~120 MB of modules.
``benchmarks/stream_init.py`` measures both cache states.

Resumable: work happens in ``.OUT.tmp-init`` next to OUT. A shard copy counts once renamed from
``*.partial``; a target counts once its record (the layer's adapter tensors plus its digests) is
renamed into ``state/`` and the residual bytes in the shard match the recorded digest. A rerun of
the same command skips what is verified and redoes the rest; the finished folder is renamed to
OUT in one step. Under torchrun the shard copies and the targets are split across ranks
(balanced by size; all ranks write into the same work folder, so several machines need a
shared filesystem); rank 0 writes the adapter and the index.

Merging (:func:`merge_checkpoint` on disk, :func:`merge_state_dict` in memory) gives every
adapted weight W the trained layer's merged weight, computed as :func:`pissa.merge` computes it
in memory, bit for bit: ``residual + s * B @ core @ A`` in the factors' dtype, cast to W's dtype,
where ``residual = W - s * B0 @ core0 @ A0`` (:func:`~pissa.methods.factors.residual_of`, the bytes attach
gives the residual), or W itself when the checkpoint is the residual checkpoint ``pissa init``
wrote. Mathematically that is ``W + s (B A - B0 A0)``. QPiSSA adapters (residual factors Ar, Br)
give ``W - s * Br @ Ar + s * B @ A``: the *unquantized* merge. ``pissa.merge`` of the 4-bit model
holds ``dq(nf4(W - s Br Ar)) + s B A`` instead, which differs by the residual's quantization
error. Which weights the adapter belongs to is checked against its recorded digests first.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from pissa.adapter.attach import adapted_layers, attach, layer_ranks, statistics_for
from pissa.adapter.config import AdapterConfig
from pissa.adapter.save_load import layer_entry
from pissa.adapter.targets import matches
from pissa.checkpoints.architecture import architecture, architecture_name
from pissa.checkpoints.folder import Checkpoint, copy_other_files, open_checkpoint, tensor_key
from pissa.errors import PissaError
from pissa.files.adapter_dir import FORMAT, TENSORS_FILE, adapter_doc, write_config
from pissa.files.atomic import atomic_dir, publish_dir
from pissa.files.digests import file_digest, weight_digest, write_shard_digests
from pissa.files.safetensors import Entry, Reader, concat_safetensors, read_header, write_at
from pissa.methods.quantize import check_quantizable
from pissa.runtime import distributed

DECOMPOSABLE = ("F64", "F32", "BF16", "F16")
"""safetensors dtypes a target weight may have."""


@dataclass(frozen=True)
class Target:
    """A layer to adapt: its module name (the adapter's layer name and seed) and its tensor key."""

    name: str
    key: str
    conv1d: bool
    """Stored (in, out), as Hugging Face Conv1D (GPT-2)."""


# --- plain reads and writes: no file is mapped into memory ------------------------------------


# --- pissa init ---------------------------------------------------------------------------------


def resolve_targets(ckpt: Checkpoint, targets: str | list[str]) -> list[Target]:
    """The layers to adapt, in model order: ``find_targets`` on the config's architecture (built on
    the meta device), or, for an unknown architecture, 2-D ``*.weight`` tensors matching explicit targets."""
    arch = architecture(ckpt.root, targets)
    if arch is not None:
        if "error" in arch:
            raise PissaError(arch["error"])
        found = []
        for name in arch["targets"]:
            key = tensor_key(f"{name}.weight", ckpt.entries, arch["prefix"])
            if key is None:
                raise PissaError(
                    f"{ckpt.root} has no tensor {name}.weight for layer {name!r}; the checkpoint does not match its config.json"
                )
            found.append(Target(name, key, arch["conv1d"][name]))
        return found
    if targets == "all-linear":
        raise PissaError(
            f"unknown architecture {architecture_name(ckpt.root)} in {ckpt.root / 'config.json'}; "
            "pass `targets` with the layer names to adapt (suffixes or regexes, e.g. `targets` q_proj v_proj)"
        )
    names = [k.removesuffix(".weight") for k, e in ckpt.entries.items() if k.endswith(".weight") and len(e.shape) == 2]
    chosen = [Target(n, f"{n}.weight", False) for n in names if any(matches(n, p) for p in targets)]
    if not chosen:
        raise PissaError(f"targets {targets} match no 2-D weight in {ckpt.root}; e.g. {names[:3]}")
    return chosen


def _check_targets(ckpt: Checkpoint, targets: list[Target], ranks: dict[str, int]) -> None:
    for t in targets:
        rank = ranks[t.name]
        e = ckpt.entries[t.key]
        if e.dtype not in DECOMPOSABLE or len(e.shape) != 2:
            raise PissaError(
                f"{t.key} is {e.dtype} {list(e.shape)}, not a float matrix; it cannot be decomposed (drop it from `targets`)"
            )
        if not 1 <= rank <= min(e.shape):
            raise PissaError(f"rank {rank} does not fit {t.key} of shape {list(e.shape)}; choose 1 <= rank <= {min(e.shape)}")


def _stand_in(name: str, weight: Tensor, conv1d: bool) -> nn.Module:
    """A model holding just one layer at dotted path ``name``: an nn.Linear (or a Conv1D) whose weight is ``weight``."""
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        with torch.device("meta"):
            layer: nn.Module = Conv1D(weight.shape[1], weight.shape[0])
        layer.register_parameter("bias", None)
    else:
        with torch.device("meta"):
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    root = parent = nn.Module()
    *path, leaf = name.split(".")
    for part in path:
        if not hasattr(parent, part):
            parent.add_module(part, nn.Module())
        parent = getattr(parent, part)
    parent.add_module(leaf, layer)
    return root


def adapt_tensor(weight: Tensor, target: Target, cfg: AdapterConfig,
                 device: torch.device | None = None) -> tuple[Tensor, dict[str, Tensor], dict[str, Any]]:
    """Adapt one stored weight exactly as ``attach`` does in memory, on ``device`` (default: where it is).

    Returns the dense residual in the stored layout and dtype, and the layer's adapter tensors and
    ``layers`` entry (:func:`pissa.layer_entry`). With ``cfg.quantize`` the checkpoint gets the
    dense residual that the 4-bit layer was quantized from (``load_adapter`` quantizes it again).
    """
    weight = weight.to(device)
    model = _stand_in(target.name, weight, target.conv1d)
    with distributed.local():
        attach(model, dataclasses.replace(cfg, targets=[re.escape(target.name)]))
    (name, layer), = adapted_layers(model)
    tensors, meta = layer_entry(name, layer)
    if cfg.quantize is None:
        residual = layer.weight.detach().cpu()  # the residual module's weight, as stored
    else:  # the 4-bit layer keeps no dense copy: the same formula on the same inputs gives it bit-exactly
        # QPiSSA: from the residual factors (Ar, Br), saved in the adapter too
        dense = layer.shape.residual(weight.T if target.conv1d else weight, layer.tensors(), layer.scaling)
        residual = (dense.T.contiguous() if target.conv1d else dense).cpu()
    if weight_digest(residual) != meta["residual_digest"]:
        raise RuntimeError(f"internal error: the residual of {name} does not match its digest")
    return residual, tensors, meta


def _record_path(state: Path, target: Target) -> Path:
    return state / f"{target.name}.safetensors"


def _record_meta(record: Path) -> dict[str, Any]:
    """The ``layers`` entry stored in a record's metadata."""
    return json.loads(read_header(record)[1]["__metadata__"]["layer"])


def verified(state: Path, shard: Path, target: Target, entry: Entry, reader: Reader) -> bool:
    """A record exists and the residual bytes in the shard have the recorded digest."""
    record = _record_path(state, target)
    if not record.is_file() or not shard.is_file():
        return False
    try:
        meta = _record_meta(record)
        with open(shard, "rb", buffering=0) as f:
            return weight_digest(reader.tensor(f, entry)) == meta["residual_digest"]
    except Exception:  # a damaged record or shard: redo the target
        return False


def do_target(ckpt: Checkpoint, target: Target, cfg: AdapterConfig, residual_dir: Path, state: Path, reader: Reader,
               device: torch.device | None = None) -> None:
    """Adapt one target: residual bytes into the copied shard, then its record (renamed into place last)."""
    entry = ckpt.entries[target.key]
    with open(ckpt.root / entry.shard, "rb", buffering=0) as f:
        weight = reader.tensor(f, entry, drop=True)
    residual, tensors, meta = adapt_tensor(weight, target, cfg, device)
    write_at(residual_dir / entry.shard, entry.start, residual)
    record = _record_path(state, target)
    part = record.with_name(record.name + ".partial")
    save_file(tensors, str(part), metadata={"layer": json.dumps(meta)})
    os.replace(part, record)


def _copy_shard(src: Path, dst: Path) -> None:
    """Copy a shard unless a complete copy is there (``*.partial`` until complete).

    ``shutil.copyfile`` copies in the kernel (``sendfile``): no user memory, no page mapped into this process.
    """
    if dst.is_file() and dst.stat().st_size == src.stat().st_size:
        return
    part = dst.with_name(dst.name + ".partial")
    shutil.copyfile(src, part)
    os.replace(part, dst)


def _job(ckpt: Checkpoint, targets: list[Target], cfg: AdapterConfig) -> dict[str, Any]:
    """What a resumable run must agree on: input files (size, mtime), targets and config."""
    files = {s: [(ckpt.root / s).stat().st_size, (ckpt.root / s).stat().st_mtime_ns] for s in ckpt.shards}
    return {"model": str(ckpt.root.resolve()), "files": files, "targets": [t.name for t in targets], "config": cfg.to_dict()}


def _prepare(work: Path, job: dict[str, Any]) -> None:
    """Keep ``work`` if it belongs to the same job, else start it afresh."""
    job_file = work / "state" / "job.json"
    if job_file.is_file():
        try:
            if json.loads(job_file.read_text()) == job:
                return
        except json.JSONDecodeError:
            pass
    if work.exists():
        shutil.rmtree(work)
    (work / "state").mkdir(parents=True)
    (work / "residual").mkdir()
    job_file.write_text(json.dumps(job))


def _finish(ckpt: Checkpoint, targets: list[Target], cfg: AdapterConfig, work: Path, out: Path,
            shard_digests: dict[str, str]) -> None:
    """Rank 0: the adapter from the records (one in memory at a time), the index and non-weight files, the rename to ``out``."""
    records = [_record_path(work / "state", t) for t in targets]
    meta = {t.name: _record_meta(record) for t, record in zip(targets, records)}
    with atomic_dir(work / "adapter") as tmp:
        concat_safetensors(tmp / TENSORS_FILE, records, {"format": FORMAT}, Reader())
        write_config(tmp, adapter_doc(cfg.to_dict(), meta))
    copy_other_files(ckpt.root, work / "residual")
    write_shard_digests(work / "residual", shard_digests)
    shutil.rmtree(work / "state")
    if out.exists():
        raise PissaError(f"{out} appeared while initializing; the result is in {work}, rename it yourself")
    publish_dir(work, out, exist_ok=False)


def init_checkpoint(model_dir: str | os.PathLike, out: str | os.PathLike, cfg: AdapterConfig, *, progress: bool = True,
                    device: torch.device | None = None) -> Path:
    """Write ``out/residual`` and ``out/adapter`` for the checkpoint in ``model_dir`` (see the module docstring);
    each weight is decomposed on ``device`` (default: the CPU) and its residual written back from there.

    Call it on every rank under torchrun; each decomposes its share of the targets.
    """
    out = Path(out)
    if out.exists():
        raise PissaError(f"{out} already exists; choose a new `out` or remove it")
    ckpt = open_checkpoint(model_dir)
    targets = resolve_targets(ckpt, cfg.targets)
    calibration, _ = statistics_for(cfg)  # per-layer ranks fixed here, from every target (EVA's allocation)
    cfg, ranks = layer_ranks(cfg, {t.name: tuple(ckpt.entries[t.key].shape) for t in targets}, calibration)
    targets = [t for t in targets if ranks[t.name] > 0]
    if not targets:
        raise PissaError("every target has rank 0 (rank_pattern); nothing to decompose")
    _check_targets(ckpt, targets, ranks)
    if cfg.quantize is not None:
        check_quantizable(cfg.quantize)
    work = out.parent / f".{out.name}.tmp-init"
    rank, size = distributed.world()
    if rank == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        _prepare(work, _job(ckpt, targets, cfg))
    distributed.barrier()
    shard_sizes = [(ckpt.root / s).stat().st_size for s in ckpt.shards]
    for shard, owner in zip(ckpt.shards, distributed.assign(shard_sizes, size)):
        if owner == rank:
            _copy_shard(ckpt.root / shard, work / "residual" / shard)
    distributed.barrier()
    costs = [float(torch.Size(ckpt.entries[t.key].shape).numel()) for t in targets]
    mine = [t for t, owner in zip(targets, distributed.assign(costs, size)) if owner == rank]
    state, residual_dir, reader = work / "state", work / "residual", Reader()
    todo = [t for t in mine if not verified(state, residual_dir / ckpt.entries[t.key].shard, t, ckpt.entries[t.key], reader)]
    bar = tqdm(
        total=len(mine), initial=len(mine) - len(todo), desc="decomposing", unit="tensor", disable=not progress or rank != 0
    )
    try:
        for t in todo:
            bar.set_postfix_str(t.name, refresh=False)
            do_target(ckpt, t, cfg, residual_dir, state, reader, device)
            bar.update(1)
    except PissaError:  # bad input found on the way (a NaN weight): nothing worth resuming
        shutil.rmtree(work, ignore_errors=True)
        raise
    bar.close()
    distributed.barrier()
    shard_digests = dict(distributed.shared_map(ckpt.shards, lambda s: file_digest(residual_dir / s), shard_sizes))
    if rank == 0:
        _finish(ckpt, targets, cfg, work, out, shard_digests)
    distributed.barrier()
    return out


# --- merging ------------------------------------------------------------------------------------
