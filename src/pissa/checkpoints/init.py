"""``pissa init``: adapt a safetensors checkpoint on disk, one tensor at a time; and the reverse,
:func:`merge_checkpoint`: the trained model's merged checkpoint, streamed the same way.

    OUT/residual/   the same architecture and shard layout (config, tokenizer files, shards,
                    index): every target weight replaced by its residual; ``from_pretrained`` loads it
    OUT/adapter/    the save_adapter format, identical to ``attach`` + ``save_adapter`` in memory

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
with plain ``read`` calls into one reused buffer (:class:`_Reader`) and written with plain writes,
and each range read from the input checkpoint is dropped from the page cache once used
(``POSIX_FADV_DONTNEED``: a stream reads it once): the checkpoint adds nothing to RssFile, and the
RSS is the same whether its pages are freshly written, cached or on disk only. The architecture
(target names, Conv1D layouts) is read from config.json by a short-lived child process
(:func:`_architecture`), so this process never carries transformers' ~120 MB of modules.
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
where ``residual = W - s * B0 @ core0 @ A0`` (:func:`~pissa.factors.residual_of`, the bytes attach
gives the residual), or W itself when the checkpoint is the residual checkpoint ``pissa init``
wrote. Mathematically that is ``W + s (B A - B0 A0)``. QPiSSA adapters (residual factors Ar, Br)
give ``W - s * Br @ Ar + s * B @ A``: the *unquantized* merge. ``pissa.merge`` of the 4-bit model
holds ``dq(nf4(W - s Br Ar)) + s B A`` instead, which differs by the residual's quantization
error. Which weights the adapter belongs to is checked against its recorded digests first.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from pissa import options
from pissa.adapter.attach import _matches, adapted_layers, attach, find_targets, layer_ranks, statistics_for
from pissa.adapter.base_layers import is_adaptable, is_conv1d
from pissa.errors import PissaError
from pissa.files.adapter_dir import (
    CONFIG_FILE,
    FORMAT,
    HEAD_FILE,
    TENSORS_FILE,
    adapter_doc,
    atomic_dir,
    base_description,
    layer_entry,
    read_adapter_doc,
)
from pissa.files.digests import weight_digest
from pissa.methods.factors import merged_weight, residual_of
from pissa.methods.nf4 import check_quantizable
from pissa.runtime import distributed
from pissa.runtime.devices import resolve_device
from pissa.training.config import AdapterConfig, InitConfig

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DECOMPOSABLE = ("F64", "F32", "BF16", "F16")
"""safetensors dtypes a target weight may have."""
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "C64": 8,
}
"""Bytes per element of the safetensors dtypes whose sizes a header is checked against (others: sub-byte types)."""
TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
"""The safetensors dtypes read as torch tensors (targets, adapter and head tensors)."""
SAFETENSORS_DTYPES = {t: name for name, t in TORCH_DTYPES.items()}
CHUNK = 1 << 24
"""Bytes per read when a tensor is copied unchanged (16 MiB): the copy buffer's size."""
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


def _read_header(path: Path, fix: str | None = None) -> tuple[bytes, dict[str, Any]]:
    """A safetensors file's header: its raw bytes (length prefix and JSON, as stored) and the parsed JSON.

    A file without a readable header raises PissaError with ``fix`` (a message with one ``{}`` for the reason).
    """
    fix = fix or f"shard {path.name} in {path.parent} is truncated or corrupt ({{}}); re-download or re-save the checkpoint"
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if not 0 < n <= size - 8:
            raise PissaError(fix.format("no valid header"))
        text = f.read(n)
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PissaError(fix.format("unreadable header")) from None
    if not isinstance(header, dict):
        raise PissaError(fix.format("unreadable header"))
    return raw + text, header


def _shard_entries(path: Path, fix: str | None = None) -> dict[str, Entry]:
    """Parse and check a safetensors file's header as safetensors does (known dtypes, byte sizes that
    match the shapes, ranges that tile the data exactly); a truncated or corrupt file raises PissaError."""
    fix = fix or f"shard {path.name} in {path.parent} is truncated or corrupt ({{}}); re-download or re-save the checkpoint"
    raw, header = _read_header(path, fix)
    base, size = len(raw), path.stat().st_size
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
            dtype = str(info["dtype"])
        except (KeyError, TypeError, ValueError):
            raise PissaError(fix.format(f"malformed header entry {key!r}")) from None
        if dtype in DTYPE_BYTES and end - begin != torch.Size(shape).numel() * DTYPE_BYTES[dtype]:
            raise PissaError(fix.format(f"{key!r} is {dtype} {list(shape)} but spans {end - begin} bytes"))
        entries[key] = Entry(path.name, dtype, shape, base + begin, base + end)
    at = base
    for e in sorted(entries.values(), key=lambda e: (e.start, e.end)):
        if e.start != at or e.end < e.start:
            raise PissaError(fix.format("tensor byte ranges overlap or leave gaps"))
        at = e.end
    if at != size:
        raise PissaError(fix.format(f"{size} bytes, its header needs {at}"))
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


# --- plain reads and writes: no file is mapped into memory ------------------------------------


def _drop_cache(f: io.FileIO, start: int, end: int) -> None:
    """Ask the kernel to drop ``[start, end)`` of ``f`` from the page cache (clean pages only; a hint)."""
    if hasattr(os, "posix_fadvise") and end > start:
        with contextlib.suppress(OSError):
            os.posix_fadvise(f.fileno(), start, end - start, os.POSIX_FADV_DONTNEED)


def _read_into(f: io.FileIO, data: Tensor, offset: int) -> None:
    """Fill the contiguous uint8 tensor ``data`` with the bytes of ``f`` from ``offset``."""
    view, done = data.numpy().data, 0
    f.seek(offset)
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise PissaError(f"{f.name} ended at byte {offset + done}, before the tensor bytes its header lists; re-save it")
        done += n


def _write_all(f: io.FileIO, data: memoryview | bytes) -> None:
    view, done = memoryview(data).cast("B"), 0
    while done < len(view):
        done += f.write(view[done:]) or 0


def _raw(t: Tensor) -> memoryview:
    """A tensor's bytes in memory order (no copy for a contiguous tensor)."""
    return t.contiguous().view(-1).view(torch.uint8).numpy().data


def _as_tensor(data: Tensor, entry: Entry) -> Tensor:
    """The uint8 bytes ``data`` of ``entry`` viewed as its dtype and shape."""
    if entry.dtype not in TORCH_DTYPES:
        raise PissaError(f"a tensor of safetensors dtype {entry.dtype} cannot be read here (shape {list(entry.shape)})")
    return data.view(TORCH_DTYPES[entry.dtype]).view(entry.shape)


def _read_tensor(f: io.FileIO, entry: Entry) -> Tensor:
    """``entry``'s tensor in memory of its own (small tensors: adapter factors, head parameters)."""
    data = torch.empty(entry.end - entry.start, dtype=torch.uint8)
    _read_into(f, data, entry.start)
    return _as_tensor(data, entry)


class _Reader:
    """Reads tensors and copies byte ranges through one reused buffer, with plain reads (no mmap).

    The buffer grows to the largest tensor read; a tensor read is a view of it, valid until the next read.
    """

    def __init__(self) -> None:
        self._buf = torch.empty(0, dtype=torch.uint8)

    def _buffer(self, n: int) -> Tensor:
        if self._buf.numel() < n:
            self._buf = torch.empty(0, dtype=torch.uint8)  # free the old buffer before allocating the new one
            self._buf = torch.empty(n, dtype=torch.uint8)
        return self._buf[:n]

    def tensor(self, f: io.FileIO, entry: Entry, *, drop: bool = False) -> Tensor:
        """``entry``'s tensor from file ``f`` (a view of the buffer); ``drop``: then evict its bytes from the page cache."""
        data = self._buffer(entry.end - entry.start)
        _read_into(f, data, entry.start)
        if drop:
            _drop_cache(f, entry.start, entry.end)
        return _as_tensor(data, entry)

    def copy(self, src: io.FileIO, dst: io.FileIO, start: int, end: int, *, drop: bool = False) -> None:
        """Append bytes ``[start, end)`` of ``src`` to ``dst``, ``CHUNK`` bytes at a time."""
        buf = self._buffer(min(CHUNK, end - start))
        for at in range(start, end, CHUNK):
            part = buf[: min(CHUNK, end - at)]
            _read_into(src, part, at)
            _write_all(dst, part.numpy().data)
            if drop:
                _drop_cache(src, at, at + part.numel())


def _write_at(path: Path, offset: int, t: Tensor) -> None:
    """Overwrite ``t``'s raw bytes at ``offset`` of file ``path``.

    No fsync: a killed process loses nothing written, and a resume re-verifies every target's
    bytes against its recorded digest anyway.
    """
    with open(path, "r+b", buffering=0) as f:
        f.seek(offset)
        _write_all(f, _raw(t))


def _header_bytes(header: dict[str, Any]) -> bytes:
    """A safetensors header (length prefix and JSON padded to 8 bytes) for ``header``."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _write_safetensors(path: Path, records: list[Path], metadata: dict[str, str], reader: _Reader) -> None:
    """Concatenate the tensors of several safetensors files into one, copying their bytes (keys sorted per file)."""
    parts = [(record, sorted(_shard_entries(record).items())) for record in records]
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for _, entries in parts:
        for key, e in entries:
            header[key] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.end - e.start]}
            offset += e.end - e.start
    with open(path, "wb", buffering=0) as out:
        _write_all(out, _header_bytes(header))
        for record, entries in parts:
            with open(record, "rb", buffering=0) as f:
                for _, e in entries:
                    reader.copy(f, out, e.start, e.end)


# --- pissa init ---------------------------------------------------------------------------------


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


def _describe(root: Path, targets: str | list[str] | None = None) -> dict[str, Any] | None:
    """What the architecture in ``root``'s config.json says, as JSON-able data: ``{"prefix": its
    base_model_prefix, "conv1d": {name: stored (in, out)} for every Linear / Conv1D layer, "targets":
    find_targets(model, targets)}`` (``"error"``: find_targets' message instead); None if transformers
    cannot build it."""
    model = _meta_model(root)
    if model is None:
        return None
    found: dict[str, Any] = {
        "prefix": getattr(model, "base_model_prefix", ""),
        "conv1d": {n: is_conv1d(m) for n, m in model.named_modules() if n and is_adaptable(m)},
    }
    if targets is not None:
        try:
            found["targets"] = find_targets(model, targets)
        except PissaError as e:
            found["error"] = str(e)
    return found


DESCRIBE = (
    "import json, sys; from pathlib import Path; from pissa.checkpoints.init import _describe; "
    "print(json.dumps(_describe(Path(sys.argv[1]), json.loads(sys.argv[2]))))"
)


def _describe_in_child(root: Path, targets: str | list[str] | None = None) -> dict[str, Any] | None:
    """:func:`_describe` run by a short-lived Python process (same interpreter and import path); OSError if it fails."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    cmd = [sys.executable, "-c", DESCRIBE, str(root), json.dumps(targets)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode == 0:
            return json.loads(proc.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, json.JSONDecodeError, IndexError) as e:
        raise OSError(f"describing {root} in a child process failed: {e}") from None
    raise OSError(f"describing {root} in a child process failed: {proc.stderr.strip()[-500:]}")


def _architecture(root: Path, targets: str | list[str] | None = None) -> dict[str, Any] | None:
    """:func:`_describe`, computed in a child process unless this one has imported transformers already.

    Importing transformers and reading a config adds about 120 MB of modules to a process for good
    (5% of a 2.5 GB checkpoint, as much as the largest tensor's SVD), while the streaming run that
    follows never needs them: a child that exits frees them before the first tensor is read.
    """
    if "transformers" not in sys.modules and sys.executable:
        try:
            return _describe_in_child(root, targets)
        except OSError:
            pass  # no usable interpreter or import path in a child: pay for the import here
    return _describe(root, targets)


def _describe_architecture(root: Path) -> str:
    try:
        config = json.loads((root / "config.json").read_text())
    except json.JSONDecodeError:
        return "an unreadable config.json"
    return f"{(config.get('architectures') or [None])[0] or config.get('model_type')!r}"


def _tensor_key(name: str, keys: dict[str, Any] | set[str], prefix: str | None = None) -> str | None:
    """The key holding parameter ``name`` (e.g. ``model.layers.0.mlp.up_proj.weight``): the name itself,
    else the name without the model's ``base_model_prefix`` (a checkpoint saved from the bare base model;
    ``prefix`` None: without its first component); None if neither is there."""
    if name in keys:
        return name
    head, _, rest = name.partition(".")
    if rest and (prefix is None or head == prefix) and rest in keys:
        return rest
    return None


def resolve_targets(ckpt: Checkpoint, targets: str | list[str]) -> list[Target]:
    """The layers to adapt, in model order: ``find_targets`` on the config's architecture (built on
    the meta device), or, for an unknown architecture, 2-D ``*.weight`` tensors matching explicit targets."""
    arch = _architecture(ckpt.root, targets)
    if arch is not None:
        if "error" in arch:
            raise PissaError(arch["error"])
        found = []
        for name in arch["targets"]:
            key = _tensor_key(f"{name}.weight", ckpt.entries, arch["prefix"])
            if key is None:
                raise PissaError(
                    f"{ckpt.root} has no tensor {name}.weight for layer {name!r}; the checkpoint does not match its config.json"
                )
            found.append(Target(name, key, arch["conv1d"][name]))
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


def _check_targets(ckpt: Checkpoint, targets: list[Target], ranks: dict[str, int]) -> None:
    for t in targets:
        rank = ranks[t.name]
        e = ckpt.entries[t.key]
        if e.dtype not in DECOMPOSABLE or len(e.shape) != 2:
            raise PissaError(
                f"{t.key} is {e.dtype} {list(e.shape)}, not a float matrix; it cannot be decomposed (drop it from --targets)"
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
    ``layers`` entry (:func:`pissa.io.layer_entry`). With ``cfg.quantize`` the checkpoint gets the
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
        A, B, core = layer.residual_factors()  # QPiSSA: the residual factors (Ar, Br), saved in the adapter too
        dense = residual_of(weight.T if target.conv1d else weight, A, B, layer.scaling, core)
        residual = (dense.T.contiguous() if target.conv1d else dense).cpu()
    if weight_digest(residual) != meta["residual_digest"]:
        raise RuntimeError(f"internal error: the residual of {name} does not match its digest")
    return residual, tensors, meta


def _record_path(state: Path, target: Target) -> Path:
    return state / f"{target.name}.safetensors"


def _record_meta(record: Path) -> dict[str, Any]:
    """The ``layers`` entry stored in a record's metadata."""
    return json.loads(_read_header(record)[1]["__metadata__"]["layer"])


def _verified(state: Path, shard: Path, target: Target, entry: Entry, reader: _Reader) -> bool:
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


def _do_target(ckpt: Checkpoint, target: Target, cfg: AdapterConfig, residual_dir: Path, state: Path, reader: _Reader,
               device: torch.device | None = None) -> None:
    """Adapt one target: residual bytes into the copied shard, then its record (renamed into place last)."""
    entry = ckpt.entries[target.key]
    with open(ckpt.root / entry.shard, "rb", buffering=0) as f:
        weight = reader.tensor(f, entry, drop=True)
    residual, tensors, meta = adapt_tensor(weight, target, cfg, device)
    _write_at(residual_dir / entry.shard, entry.start, residual)
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


def _not_copied(folder: str | os.PathLike, names: list[str]) -> list[str]:
    """Names never copied to OUT/residual: hidden files and weight files (a ``shutil.copytree`` ignore)."""
    return [n for n in names if n.startswith(".") or n.endswith(WEIGHT_SUFFIXES)]


def _copy_other_files(src: Path, dst: Path) -> None:
    """Copy a checkpoint folder's files besides the weights: config, index, tokenizer, generation config,
    folders such as 1_Pooling/ (weight files inside them too are left out)."""
    for path in src.iterdir():
        if not _not_copied(path.parent, [path.name]):
            if path.is_dir():
                shutil.copytree(path, dst / path.name, ignore=_not_copied)
            else:
                shutil.copyfile(path, dst / path.name)


def _finish(ckpt: Checkpoint, targets: list[Target], cfg: AdapterConfig, work: Path, out: Path) -> None:
    """Rank 0: the adapter from the records (one in memory at a time), the index and non-weight files, the rename to ``out``."""
    records = [_record_path(work / "state", t) for t in targets]
    meta = {t.name: _record_meta(record) for t, record in zip(targets, records)}
    with atomic_dir(work / "adapter") as tmp:
        _write_safetensors(tmp / TENSORS_FILE, records, {"format": FORMAT}, _Reader())
        (tmp / CONFIG_FILE).write_text(json.dumps(adapter_doc(cfg, meta), indent=2))
    _copy_other_files(ckpt.root, work / "residual")
    shutil.rmtree(work / "state")
    if out.exists():
        raise PissaError(f"{out} appeared while initializing; the result is in {work}, rename it yourself")
    os.replace(work, out)


def init_checkpoint(model_dir: str | os.PathLike, out: str | os.PathLike, cfg: AdapterConfig, *, progress: bool = True,
                    device: torch.device | None = None) -> Path:
    """Write ``out/residual`` and ``out/adapter`` for the checkpoint in ``model_dir`` (see the module docstring);
    each weight is decomposed on ``device`` (default: the CPU) and its residual written back from there.

    Call it on every rank under torchrun; each decomposes its share of the targets.
    """
    out = Path(out)
    if out.exists():
        raise PissaError(f"{out} already exists; choose a new --out or remove it")
    ckpt = open_checkpoint(model_dir)
    targets = resolve_targets(ckpt, cfg.targets)
    calibration, _ = statistics_for(cfg)  # per-layer ranks fixed here, from every target (EVA's allocation)
    cfg, ranks = layer_ranks(cfg, [t.name for t in targets], calibration)
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
    state, residual_dir, reader = work / "state", work / "residual", _Reader()
    todo = [t for t in mine if not _verified(state, residual_dir / ckpt.entries[t.key].shard, t, ckpt.entries[t.key], reader)]
    bar = tqdm(
        total=len(mine), initial=len(mine) - len(todo), desc="decomposing", unit="tensor", disable=not progress or rank != 0
    )
    try:
        for t in todo:
            bar.set_postfix_str(t.name, refresh=False)
            _do_target(ckpt, t, cfg, residual_dir, state, reader, device)
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


# --- merging ------------------------------------------------------------------------------------

FACTOR_PARTS = ("lora_A", "lora_B", "A0", "B0", "lora_core", "core0", "Ar", "Br")
"""The per-layer tensors of an adapter file (``{name}.{part}``); the first four are always there."""


class _Adapter:
    """An adapter directory opened for streaming: its validated document; tensors read on demand."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.doc = read_adapter_doc(self.path)
        self.config = AdapterConfig.from_dict(self.doc["config"])
        self.layers: dict[str, dict[str, Any]] = self.doc["layers"]
        tensors = self.path / TENSORS_FILE
        self.entries = _shard_entries(tensors, f"{tensors} cannot be read ({{}}); re-save the adapter")
        for name in self.layers:
            missing = [p for p in FACTOR_PARTS[:4] if f"{name}.{p}" not in self.entries]
            if missing:
                raise PissaError(f"{self.path / TENSORS_FILE} lacks {name}.{missing[0]}; re-save the adapter")
        self.head_names: list[str] = list(self.doc.get("head") or [])
        self.head_entries: dict[str, Entry] = {}
        if self.head_names:
            head_file = self.path / HEAD_FILE
            if not head_file.is_file():
                raise PissaError(f"{head_file} is missing (the adapter lists head parameters); re-save the adapter")
            self.head_entries = _shard_entries(head_file, f"{head_file} cannot be read ({{}}); re-save the adapter")
            if missing := [n for n in self.head_names if n not in self.head_entries]:
                raise PissaError(f"{head_file} lacks the head parameter {missing[0]!r}; re-save the adapter")

    def factors(self, name: str) -> dict[str, Tensor]:
        """Layer ``name``'s tensors by part (:data:`FACTOR_PARTS`), read from the file now."""
        with open(self.path / TENSORS_FILE, "rb", buffering=0) as f:
            return {p: _read_tensor(f, self.entries[k]) for p in FACTOR_PARTS if (k := f"{name}.{p}") in self.entries}

    def head(self) -> dict[str, Tensor]:
        """The saved head parameters (a classifier head: small)."""
        if not self.head_names:
            return {}
        with open(self.path / HEAD_FILE, "rb", buffering=0) as f:
            return {n: _read_tensor(f, self.head_entries[n]) for n in self.head_names}

    def wrong_base(self, name: str) -> PissaError:
        return PissaError(
            f"adapter at {self.path} was made from a different base model (weights of {name!r} differ from both its "
            f"base and its residual digests); merge it onto {base_description(self.doc)}"
        )


def _layer_keys(adapter: _Adapter, keys: dict[str, Any], where: str, prefix: str | None = None) -> dict[str, str]:
    """``{layer name: weight key}`` for every adapted layer (see :func:`_tensor_key`); PissaError naming a missing one."""
    found = {}
    for name in adapter.layers:
        key = _tensor_key(f"{name}.weight", keys, prefix)
        if key is None:
            raise PissaError(
                f"adapter at {adapter.path} was made for another model: {where} has no weight {name}.weight for layer {name!r}"
            )
        found[name] = key
    return found


def _layouts(adapter: _Adapter, shapes: dict[str, tuple[int, ...]], conv1d: bool | dict[str, bool] | None) -> dict[str, bool]:
    """Whether each layer's weight is stored (in, out) (Hugging Face Conv1D) rather than (out, in).

    ``conv1d``: True/False for every layer, or per layer (from the model's modules); otherwise the
    stored shape tells unless the weight is square, and a square one follows the others (Conv1D if
    any layer is, the usual nn.Linear otherwise).
    """
    known: dict[str, bool] = {}
    for name, meta in adapter.layers.items():
        shape, dense = shapes[name], (meta["out"], meta["in"])
        if len(shape) != 2 or shape not in (dense, dense[::-1]):
            raise PissaError(
                f"adapter at {adapter.path} was made for another model: layer {name!r} has shape {list(shape)}, "
                f"the adapter {list(dense)}"
            )
        if isinstance(conv1d, bool):
            known[name] = conv1d
        elif isinstance(conv1d, dict) and name in conv1d:
            known[name] = conv1d[name]
        elif dense[0] != dense[1]:
            known[name] = shape != dense
    square = any(known.values())
    layouts = {name: known.get(name, square) for name in adapter.layers}
    for name, meta in adapter.layers.items():
        if shapes[name] != ((meta["in"], meta["out"]) if layouts[name] else (meta["out"], meta["in"])):
            raise PissaError(
                f"adapter at {adapter.path} was made for another model: layer {name!r} has shape {list(shapes[name])}"
            )
    return layouts


def _merged_weight(
    stored: Tensor, conv1d: bool, factors: dict[str, Tensor], scaling: float, base_digest: str, residual_digest: str
) -> Tensor | None:
    """The trained layer's merged weight in ``stored``'s layout and dtype (see the module docstring);
    None when ``stored`` has neither digest (not the weight the adapter was made from).

    ``stored`` may be the base weight W or the residual ``pissa init`` wrote in its place. The
    residual is the one attach or load_adapter builds (:func:`~pissa.factors.residual_of`) and the
    merge :func:`~pissa.factors.merged_weight`, as in :meth:`pissa.layer.PissaLinear.merged`, so the
    result is bit-identical to ``pissa.merge``.
    """
    digest = weight_digest(stored)
    W = stored.T if conv1d else stored
    parts = {k: t.to(W.device) for k, t in factors.items()}
    if digest == residual_digest:
        residual = W
    elif digest == base_digest:
        if "Ar" in parts and "Br" in parts:  # QPiSSA: the dense residual its 4-bit one is quantized from
            residual = residual_of(W, parts["Ar"], parts["Br"], scaling)
        else:
            residual = residual_of(W, parts["A0"], parts["B0"], scaling, parts.get("core0"))
    else:
        return None
    merged = merged_weight(residual, parts["lora_A"], parts["lora_B"], scaling, parts.get("lora_core"))
    return merged.T.contiguous() if conv1d else merged


def _merge_layer(adapter: _Adapter, name: str, stored: Tensor, conv1d: bool) -> Tensor:
    """The merged weight of layer ``name``, in ``stored``'s dtype. An adapter made on a base of
    another dtype (a bfloat16 run on a float32 checkpoint) merges the weight rounded to that dtype,
    as the trained model held it, and the result is stored back in the checkpoint's dtype."""
    meta = adapter.layers[name]
    made_on = getattr(torch, meta.get("base_dtype", "float32"))
    scaling = adapter.config.scaling_for(adapter.entries[f"{name}.A0"].shape[0])  # alpha / the layer's rank
    merged = _merged_weight(stored.to(made_on), conv1d, adapter.factors(name), scaling, meta["base_digest"],
                            meta["residual_digest"])
    if merged is None:
        raise adapter.wrong_base(name)
    return merged.to(stored.dtype)


def _head_plan(
    adapter: _Adapter, keys: dict[str, Any], shapes: dict[str, tuple[int, ...]], prefix: str | None = None
) -> tuple[dict[str, str], list[str]]:
    """Where the head parameters go: ``({key: name} replacing a tensor of the base, [names added])``."""
    replace, add = {}, []
    for name in adapter.head_names:
        key = _tensor_key(name, keys, prefix)
        if key is None:
            add.append(name)
            continue
        saved = adapter.head_entries[name].shape
        if tuple(shapes[key]) != saved:
            raise PissaError(
                f"adapter at {adapter.path} has a head parameter {name!r} of shape {list(saved)}, the model's {key} is "
                f"{list(shapes[key])}; merge onto a model with the same head (num_labels {adapter.doc.get('num_labels')})"
            )
        replace[key] = name
    return replace, add


def merge_state_dict(
    state_dict: dict[str, Tensor], adapter_dir: str | os.PathLike, *, conv1d: bool | None = None
) -> dict[str, Tensor]:
    """The trained model's state dict: ``state_dict`` (the base model's, or the residual model's that
    ``pissa init`` wrote) with the adapter at ``adapter_dir`` merged in; ``state_dict`` is left unchanged.

    Each adapted layer's weight becomes its merged weight (see the module docstring; the same
    tensors as :func:`pissa.merge`), in the weight's dtype, device and stored layout; the adapter's
    head parameters (a trained classifier) replace the ones in ``state_dict`` (cast to their dtype)
    or are added under their names. Every other entry is the same tensor object as in
    ``state_dict``. The weights must be the ones the adapter was made from (its recorded digests),
    else PissaError. ``conv1d``: whether the weights are stored (in, out) as Hugging Face Conv1D
    (GPT-2); None: told by the shapes (only an adapter whose weights are all square needs it).
    """
    adapter = _Adapter(adapter_dir)
    keys = _layer_keys(adapter, state_dict, "the state dict")
    layouts = _layouts(adapter, {n: tuple(state_dict[k].shape) for n, k in keys.items()}, conv1d)
    replace, add = _head_plan(adapter, state_dict, {k: tuple(t.shape) for k, t in state_dict.items()})
    out = dict(state_dict)
    with torch.no_grad():
        for name, key in keys.items():
            out[key] = _merge_layer(adapter, name, state_dict[key].detach(), layouts[name])
        head = adapter.head()
        for key, name in replace.items():
            out[key] = head[name].to(device=state_dict[key].device, dtype=state_dict[key].dtype)
        for name in add:
            out[name] = head[name]
    return out


def _merge_shard(
    src: Path,
    dst: Path,
    entries: dict[str, Entry],
    work: dict[str, Callable[[Tensor], Tensor] | Tensor],
    added: dict[str, Tensor],
    reader: _Reader,
    bar: tqdm,
) -> int:
    """Write shard ``src`` (its tensors: ``entries``) to ``dst`` tensor by tensor: ``work[key]`` maps a
    tensor to what replaces it, or is the replacement; ``added`` tensors are appended. Returns the bytes added."""
    raw, header = _read_header(src)
    data = src.stat().st_size - len(raw)
    grown = 0
    if added:
        header, at = dict(header), data
        for key, t in added.items():
            n = t.numel() * t.element_size()
            header[key] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + n]}
            at, grown = at + n, grown + n
        raw = _header_bytes(header)
    with open(src, "rb", buffering=0) as fin, open(dst, "wb", buffering=0) as fout:
        _write_all(fout, raw)
        for key, e in sorted(entries.items(), key=lambda kv: kv[1].start):
            job = work.get(key)
            if job is None:
                reader.copy(fin, fout, e.start, e.end, drop=True)
            else:
                new = job if isinstance(job, Tensor) else job(reader.tensor(fin, e, drop=True))
                if new.dtype != TORCH_DTYPES.get(e.dtype) or tuple(new.shape) != e.shape:
                    raise RuntimeError(f"internal error: {key} would change from {e.dtype} {list(e.shape)}")
                _write_all(fout, _raw(new))
                del new
            bar.update(e.end - e.start)
        for t in added.values():
            _write_all(fout, _raw(t))
    if dst.stat().st_size != len(raw) + data + grown:
        raise RuntimeError(f"internal error: {dst.name} has the wrong size")
    return grown


def _classifier_config(config: dict[str, Any], adapter: _Adapter) -> dict[str, Any]:
    """config.json for a merged model whose adapter trained a classifier head: its labels and architecture."""
    num_labels, kind = adapter.doc.get("num_labels"), (adapter.doc.get("base_model") or {}).get("kind")
    config = dict(config)
    if num_labels and len(config.get("id2label") or {}) != num_labels:
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
        config["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
    arch = _sequence_classifier(config.get("model_type")) if kind == "seq-cls" else None
    if arch is not None:
        config["architectures"] = [arch]
    return config


def _sequence_classifier(model_type: str | None) -> str | None:
    """transformers' sequence-classification class name for ``model_type`` (e.g. LlamaForSequenceClassification)."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    except ImportError:
        return None
    return MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(model_type) if model_type else None


def merge_checkpoint(
    model_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, *, progress: bool = True
) -> Path:
    """Write the trained model's merged checkpoint to ``out_dir``, streaming ``model_dir`` shard by shard.

    ``model_dir``: the safetensors checkpoint the adapter was made from (single file or shards plus
    index), or the residual checkpoint ``pissa init`` wrote. ``out_dir`` gets the same layout
    (shard names, index, config, tokenizer and other non-weight files): every adapted weight merged
    as :func:`merge_state_dict` merges it (bit-identical to :func:`pissa.merge` in memory), every
    other tensor copied byte for byte, the adapter's head parameters written over the base's or,
    if the base lacks them, appended to the last shard (config.json then gets the head's labels).

    Memory: one adapted weight and its merge arithmetic plus a 16 MiB copy buffer, whatever the
    checkpoint's size; nothing is memory-mapped and every range read is dropped from the page cache
    once used (see the module docstring). All-or-nothing: the result is written in
    ``.OUT.tmp-merge`` next to ``out_dir`` and renamed into place at the end; on any error (a weight
    that is not the adapter's base: PissaError) that folder is removed. ``out_dir`` must not exist.
    """
    out = Path(out_dir)
    if out.exists():
        raise PissaError(f"{out} already exists; choose a new output folder or remove it")
    ckpt = open_checkpoint(model_dir)
    adapter = _Adapter(adapter_dir)
    arch = _architecture(ckpt.root)
    prefix = arch["prefix"] if arch is not None else None
    keys = _layer_keys(adapter, ckpt.entries, str(ckpt.root), prefix)
    for key in keys.values():
        e = ckpt.entries[key]
        if e.dtype not in DECOMPOSABLE:
            raise PissaError(
                f"adapter at {adapter.path} was made for another model: {key} in {ckpt.root} is {e.dtype}, not a float matrix"
            )
    known = {n: arch["conv1d"][n] for n in adapter.layers if arch is not None and n in arch["conv1d"]}
    layouts = _layouts(adapter, {n: ckpt.entries[k].shape for n, k in keys.items()}, known)
    replace, add = _head_plan(adapter, ckpt.entries, {k: e.shape for k, e in ckpt.entries.items()}, prefix)
    head = adapter.head()
    work: dict[str, Callable[[Tensor], Tensor] | Tensor] = {
        key: functools.partial(_merge_layer, adapter, name, conv1d=layouts[name]) for name, key in keys.items()
    }
    work.update({key: head[name].to(TORCH_DTYPES[ckpt.entries[key].dtype]) for key, name in replace.items()})
    added = {name: head[name].contiguous() for name in add}

    tmp = out.parent / f".{out.name}.tmp-merge"
    out.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)  # a killed earlier merge: nothing there is worth keeping
    tmp.mkdir()
    try:
        reader = _Reader()
        total = sum(e.end - e.start for e in ckpt.entries.values())
        with torch.no_grad(), tqdm(total=total, desc="merging", unit="B", unit_scale=True, disable=not progress) as bar:
            grown = 0
            for shard in ckpt.shards:
                last = shard == ckpt.shards[-1]
                entries = {k: e for k, e in ckpt.entries.items() if e.shard == shard}
                grown += _merge_shard(ckpt.root / shard, tmp / shard, entries, work, added if last else {}, reader, bar)
        _copy_other_files(ckpt.root, tmp)
        if added and ckpt.indexed:
            index = json.loads((ckpt.root / INDEX).read_text())
            index["weight_map"].update({name: ckpt.shards[-1] for name in added})
            if isinstance(index.get("metadata"), dict) and "total_size" in index["metadata"]:
                index["metadata"]["total_size"] += grown
            (tmp / INDEX).write_text(json.dumps(index, indent=2))
        if adapter.head_names:
            config = json.loads((ckpt.root / "config.json").read_text())
            (tmp / "config.json").write_text(json.dumps(_classifier_config(config, adapter), indent=2))
        if out.exists():
            raise PissaError(f"{out} appeared while merging; choose a new output folder or remove it")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def command_init(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """``pissa init --model DIR --out OUT [adapter options]``: OUT/residual and OUT/adapter."""
    options.add_options(parser, InitConfig)

    def run(args: argparse.Namespace) -> int:
        cfg, _ = options.resolve(InitConfig, args)
        distributed.init_from_env()
        out = init_checkpoint(cfg.model, cfg.out, cfg.adapter, progress=cfg.progress, device=resolve_device(cfg.device))
        if distributed.is_main():
            print(f"wrote {out}/residual and {out}/adapter")
        return 0

    return run
