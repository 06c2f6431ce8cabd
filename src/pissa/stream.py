"""``pissa init``: adapt a safetensors checkpoint on disk, one tensor at a time.

    OUT/residual/   the same architecture and shard layout (config, tokenizer files, shards,
                    index): every target weight replaced by its residual; ``from_pretrained`` loads it
    OUT/adapter/    the save_adapter format, identical to ``attach`` + ``save_adapter`` in memory

How: a residual has its weight's dtype and shape, so it occupies the same bytes of the same
shard. Each input shard is copied (a kernel copy, no user memory), then each target tensor is
read alone (``safe_open``), adapted by :func:`pissa.attach` on a one-layer stand-in model (the
very code of the in-memory path: same per-layer seed, factors, residual and digests) and its
residual is written over its byte range. Other tensors (embeddings, norms, the head) are never
loaded. Peak memory is one target tensor, its float32 copy and the SVD workspace (a small
multiple of the largest target tensor) plus one layer's factors when the adapter file is
assembled, whatever the checkpoint's size. With ``quantize="nf4"`` the checkpoint holds the
dense residual the 4-bit layer is quantized from (``load_adapter`` quantizes it again).

Resumable: work happens in ``.OUT.tmp-init`` next to OUT. A shard copy counts once renamed from
``*.partial``; a target counts once its record (the layer's adapter tensors plus its digests) is
renamed into ``state/`` and the residual bytes in the shard match the recorded digest. A rerun of
the same command skips what is verified and redoes the rest; the finished folder is renamed to
OUT in one step. Under torchrun the shard copies and the targets are split across ranks
(balanced by size; all ranks write into the same work folder, so several machines need a
shared filesystem); rank 0 writes the adapter and the index.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import distributed, options
from .config import AdapterConfig, InitConfig
from .decompose import METHODS
from .factors import residual_of
from .errors import PissaError
from .fingerprint import weight_digest
from .io import CONFIG_FILE, FORMAT, TENSORS_FILE, adapter_doc, atomic_dir, layer_entry
from .modules import is_conv1d
from .nf4 import check_quantizable
from .model import _matches, adapted_layers, attach, find_targets

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DECOMPOSABLE = ("F64", "F32", "BF16", "F16")
"""safetensors dtypes a target weight may have."""
DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
"""Bytes per element of the safetensors dtypes an adapter may hold."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
"""Files never copied to OUT/residual besides the residual shards (other copies of the base weights)."""


@dataclass(frozen=True)
class Entry:
    """One tensor of a checkpoint: its shard, safetensors dtype, shape and absolute byte range in the file."""

    shard: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class Checkpoint:
    """A Hugging Face safetensors checkpoint folder, validated: every shard present and complete."""

    root: Path
    shards: list[str]
    entries: dict[str, Entry]
    indexed: bool


@dataclass(frozen=True)
class Target:
    """A layer to adapt: its module name (the adapter's layer name and seed) and its tensor key."""

    name: str
    key: str
    conv1d: bool
    """Stored (in, out), as Hugging Face Conv1D (GPT-2)."""


def _shard_entries(path: Path) -> dict[str, Entry]:
    """Parse a shard's header; a truncated or corrupt file raises PissaError."""
    fix = f"shard {path.name} in {path.parent} is truncated or corrupt ({{}}); re-download or re-save the checkpoint"
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if not 0 < n <= size - 8:
            raise PissaError(fix.format("no valid header"))
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise PissaError(fix.format("unreadable header")) from None
    header.pop("__metadata__", None)
    base = 8 + n
    entries = {}
    for key, info in header.items():
        begin, end = info["data_offsets"]
        entries[key] = Entry(path.name, info["dtype"], tuple(info["shape"]), base + begin, base + end)
    need = max((e.end for e in entries.values()), default=base)
    if need != size:
        raise PissaError(fix.format(f"{size} bytes, its header needs {need}"))
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as e:  # safetensors raises its own error types
        raise PissaError(fix.format(str(e).splitlines()[0])) from None
    return entries


def open_checkpoint(root: str | os.PathLike) -> Checkpoint:
    """Validate a checkpoint folder (config.json, one model.safetensors or shards + index) and read its headers."""
    root = Path(root)
    if not root.is_dir():
        raise PissaError(f"{root} is not a folder; pass a Hugging Face model folder with config.json and *.safetensors")
    if not (root / "config.json").is_file():
        raise PissaError(f"{root} has no config.json; pass a Hugging Face model folder (save_pretrained writes one)")
    if (root / INDEX).is_file():
        try:
            weight_map: dict[str, str] = json.loads((root / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise PissaError(f"{root / INDEX} is not a valid safetensors index; re-save the checkpoint") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (root / s).is_file()]
        if missing:
            raise PissaError(f"{root} lacks shard {missing[0]} named in {INDEX}; copy or re-download it")
    elif (root / SINGLE).is_file():
        weight_map, shards = {}, [SINGLE]
    else:
        found = sorted(p.name for p in root.glob("*.safetensors"))
        hint = f" (found {', '.join(found[:3])} but no {INDEX})" if found else ""
        raise PissaError(
            f"{root} has no {SINGLE} or {INDEX}{hint}; save the model with save_pretrained(..., safe_serialization=True)"
        )
    entries: dict[str, Entry] = {}
    for shard in shards:
        entries.update(_shard_entries(root / shard))
    for key, shard in weight_map.items():
        if key not in entries or entries[key].shard != shard:
            raise PissaError(f"{INDEX} places {key} in {shard}, which does not hold it; re-save the checkpoint")
    return Checkpoint(root, shards, entries, bool(weight_map))


def _meta_model(root: Path) -> nn.Module | None:
    """The architecture named by config.json, built on the meta device (no memory); None if unknown."""
    try:
        import transformers
    except ImportError:
        return None
    try:
        config = transformers.AutoConfig.from_pretrained(str(root))
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        with torch.device("meta"):
            return cls(config) if cls is not None else transformers.AutoModel.from_config(config)
    except Exception:  # unknown model_type / architecture, or a config transformers cannot build
        return None


def _describe_architecture(root: Path) -> str:
    try:
        config = json.loads((root / "config.json").read_text())
    except json.JSONDecodeError:
        return "an unreadable config.json"
    return f"{(config.get('architectures') or [None])[0] or config.get('model_type')!r}"


def resolve_targets(ckpt: Checkpoint, targets: str | list[str]) -> list[Target]:
    """The layers to adapt, in model order: ``find_targets`` on the config's architecture (built on
    the meta device), or, for an unknown architecture, 2-D ``*.weight`` tensors matching explicit targets."""
    model = _meta_model(ckpt.root)
    if model is not None:
        prefix = getattr(model, "base_model_prefix", "") + "."
        found = []
        for name in find_targets(model, targets):
            keys = [f"{name}.weight", f"{name.removeprefix(prefix)}.weight"]
            key = next((k for k in keys if k in ckpt.entries), None)
            if key is None:
                raise PissaError(f"{ckpt.root} has no tensor {keys[0]} for layer {name!r}; the checkpoint does not match its config.json")
            found.append(Target(name, key, is_conv1d(model.get_submodule(name))))
        return found
    if targets == "all-linear":
        raise PissaError(
            f"unknown architecture {_describe_architecture(ckpt.root)} in {ckpt.root / 'config.json'}; "
            "pass --targets with the layer names to adapt (suffixes or regexes, e.g. --targets q_proj v_proj)"
        )
    names = [k.removesuffix(".weight") for k, e in ckpt.entries.items() if k.endswith(".weight") and len(e.shape) == 2]
    chosen = [Target(n, f"{n}.weight", False) for n in names if any(_matches(n, p) for p in targets)]
    if not chosen:
        raise PissaError(f"targets {targets} match no 2-D weight in {ckpt.root}; e.g. {names[:3]}")
    return chosen


def _check_targets(ckpt: Checkpoint, targets: list[Target], rank: int) -> None:
    for t in targets:
        e = ckpt.entries[t.key]
        if e.dtype not in DECOMPOSABLE or len(e.shape) != 2:
            raise PissaError(f"{t.key} is {e.dtype} {list(e.shape)}, not a float matrix; it cannot be decomposed (drop it from --targets)")
        if not 1 <= rank <= min(e.shape):
            raise PissaError(f"rank {rank} does not fit {t.key} of shape {list(e.shape)}; choose 1 <= rank <= {min(e.shape)}")


def _stand_in(name: str, weight: Tensor, conv1d: bool) -> nn.Module:
    """A model holding just one layer at dotted path ``name``: an nn.Linear (or a Conv1D) whose weight is ``weight``."""
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        with torch.device("meta"):
            layer: nn.Module = Conv1D(weight.shape[1], weight.shape[0])
        layer.bias = None
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


def adapt_tensor(weight: Tensor, target: Target, cfg: AdapterConfig) -> tuple[Tensor, dict[str, Tensor], dict[str, Any]]:
    """Adapt one stored weight exactly as ``attach`` does in memory.

    Returns the dense residual in the stored layout and dtype, and the layer's adapter tensors and
    ``layers`` entry (:func:`pissa.io.layer_entry`). With ``cfg.quantize`` the checkpoint gets the
    dense residual that the 4-bit layer was quantized from (``load_adapter`` quantizes it again).
    """
    model = _stand_in(target.name, weight, target.conv1d)
    with distributed.local():
        attach(model, dataclasses.replace(cfg, targets=[re.escape(target.name)]))
    (name, layer), = adapted_layers(model)
    tensors, meta = layer_entry(name, layer)
    if cfg.quantize is None:
        residual = layer.residual.weight.detach()
    else:  # the 4-bit layer keeps no dense copy: the same formula on the same inputs gives it bit-exactly
        A, B, core = layer.residual_factors()  # QPiSSA: the residual factors (Ar, Br), saved in the adapter too
        dense = residual_of(weight.T if target.conv1d else weight, A, B, layer.scaling, core)
        residual = dense.T.contiguous() if target.conv1d else dense
    if weight_digest(residual) != meta["residual_digest"]:
        raise RuntimeError(f"internal error: the residual of {name} does not match its digest")
    return residual, tensors, meta


def _raw(t: Tensor) -> memoryview:
    """A tensor's bytes in memory order (no copy for a contiguous tensor)."""
    return memoryview(t.contiguous().view(-1).view(torch.uint8).numpy())


def _write_at(path: Path, offset: int, t: Tensor) -> None:
    """Overwrite ``t``'s raw bytes at ``offset`` of file ``path``.

    No fsync: a killed process loses nothing written, and a resume re-verifies every target's
    bytes against its recorded digest anyway.
    """
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(_raw(t))


def _write_safetensors(path: Path, records: list[Path], metadata: dict[str, str]) -> None:
    """Concatenate the tensors of several safetensors files into one, one source file in memory at a time."""
    specs = []
    for record in records:
        with safe_open(str(record), framework="pt") as f:
            specs += [(key, f.get_slice(key)) for key in sorted(f.keys())]
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for key, sl in specs:
        size = torch.Size(sl.get_shape()).numel() * DTYPE_BYTES[sl.get_dtype()]
        header[key] = {"dtype": sl.get_dtype(), "shape": sl.get_shape(), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        for record in records:
            for _, t in sorted(load_file(str(record)).items()):
                out.write(_raw(t))


def _read(path: Path, key: str) -> Tensor:
    with safe_open(str(path), framework="pt") as f:  # closing unmaps the file: memory stays one tensor
        return f.get_tensor(key)


def _record_path(state: Path, target: Target) -> Path:
    return state / f"{target.name}.safetensors"


def _verified(state: Path, shard: Path, target: Target) -> bool:
    """A record exists and the residual bytes in the shard have the recorded digest."""
    record = _record_path(state, target)
    if not record.is_file() or not shard.is_file():
        return False
    try:
        with safe_open(str(record), framework="pt") as f:
            meta = json.loads(f.metadata()["layer"])
        return weight_digest(_read(shard, target.key)) == meta["residual_digest"]
    except Exception:  # a damaged record or shard: redo the target
        return False


def _do_target(ckpt: Checkpoint, target: Target, cfg: AdapterConfig, residual_dir: Path, state: Path) -> None:
    """Adapt one target: residual bytes into the copied shard, then its record (renamed into place last)."""
    entry = ckpt.entries[target.key]
    residual, tensors, meta = adapt_tensor(_read(ckpt.root / entry.shard, target.key), target, cfg)
    _write_at(residual_dir / entry.shard, entry.start, residual)
    record = _record_path(state, target)
    part = record.with_name(record.name + ".partial")
    save_file(tensors, str(part), metadata={"layer": json.dumps(meta)})
    os.replace(part, record)


def _copy_shard(src: Path, dst: Path) -> None:
    """Copy a shard unless a complete copy is there (``*.partial`` until complete)."""
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


def _not_copied(folder: str | os.PathLike, names: list[str]) -> list[str]:
    """Names never copied to OUT/residual: hidden files and weight files (a ``shutil.copytree`` ignore)."""
    return [n for n in names if n.startswith(".") or n.endswith(WEIGHT_SUFFIXES)]


def _finish(ckpt: Checkpoint, targets: list[Target], cfg: AdapterConfig, work: Path, out: Path) -> None:
    """Rank 0: the adapter from the records (one in memory at a time), the index and non-weight files, the rename to ``out``."""
    records = [_record_path(work / "state", t) for t in targets]
    meta: dict[str, dict[str, Any]] = {}
    for t, record in zip(targets, records):
        with safe_open(str(record), framework="pt") as f:
            meta[t.name] = json.loads(f.metadata()["layer"])
    with atomic_dir(work / "adapter") as tmp:
        _write_safetensors(tmp / TENSORS_FILE, records, {"format": FORMAT})
        (tmp / CONFIG_FILE).write_text(json.dumps(adapter_doc(cfg, meta), indent=2))
    for src in ckpt.root.iterdir():  # config, index, tokenizer, generation config, folders such as 1_Pooling/
        if not _not_copied(src.parent, [src.name]):
            if src.is_dir():
                shutil.copytree(src, work / "residual" / src.name, ignore=_not_copied)
            else:
                shutil.copyfile(src, work / "residual" / src.name)
    shutil.rmtree(work / "state")
    if out.exists():
        raise PissaError(f"{out} appeared while initializing; the result is in {work}, rename it yourself")
    os.replace(work, out)


def init_checkpoint(model_dir: str | os.PathLike, out: str | os.PathLike, cfg: AdapterConfig, *, progress: bool = True) -> Path:
    """Write ``out/residual`` and ``out/adapter`` for the checkpoint in ``model_dir`` (see the module docstring).

    Call it on every rank under torchrun; each decomposes its share of the targets.
    """
    out = Path(out)
    if out.exists():
        raise PissaError(f"{out} already exists; choose a new --out or remove it")
    ckpt = open_checkpoint(model_dir)
    targets = resolve_targets(ckpt, cfg.targets)
    _check_targets(ckpt, targets, cfg.rank)
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
    state, residual_dir = work / "state", work / "residual"
    todo = [t for t in mine if not _verified(state, residual_dir / ckpt.entries[t.key].shard, t)]
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc="decomposing", unit="tensor", disable=not progress or rank != 0)
    try:
        for t in todo:
            bar.set_postfix_str(t.name, refresh=False)
            _do_target(ckpt, t, cfg, residual_dir, state)
            bar.update(1)
    except PissaError:  # bad input found on the way (a NaN weight): nothing worth resuming
        shutil.rmtree(work, ignore_errors=True)
        raise
    bar.close()
    distributed.barrier()
    if rank == 0:
        _finish(ckpt, targets, cfg, work, out)
    distributed.barrier()
    return out


def command_init(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """``pissa init --model DIR --out OUT [adapter options]``: OUT/residual and OUT/adapter."""
    options.add_options(parser, InitConfig)

    def run(args: argparse.Namespace) -> int:
        cfg, _ = options.resolve(InitConfig, args)
        distributed.init_from_env()
        out = init_checkpoint(cfg.model, cfg.out, cfg.adapter, progress=cfg.progress)
        if distributed.is_main():
            print(f"wrote {out}/residual and {out}/adapter")
        return 0

    return run
