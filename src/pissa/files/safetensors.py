"""Raw safetensors I/O with plain reads and writes (no memory mapping): headers parsed and checked as safetensors
does, tensors read into one reused buffer, byte ranges copied, files concatenated.

A mapped file counts in the process's RSS for as long as a tensor viewing it lives; plain ``read`` calls into a
reused buffer, and ranges dropped from the page cache once a stream has read them, keep a checkpoint out of RSS.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pissa.errors import PissaError

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


@dataclass(frozen=True)
class Entry:
    """One tensor of a checkpoint: its shard, safetensors dtype, shape and absolute byte range in the file."""

    shard: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(path: Path, fix: str | None = None) -> tuple[bytes, dict[str, Any]]:
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


def shard_entries(path: Path, fix: str | None = None) -> dict[str, Entry]:
    """Parse and check a safetensors file's header as safetensors does (known dtypes, byte sizes that
    match the shapes, ranges that tile the data exactly); a truncated or corrupt file raises PissaError."""
    fix = fix or f"shard {path.name} in {path.parent} is truncated or corrupt ({{}}); re-download or re-save the checkpoint"
    raw, header = read_header(path, fix)
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


def drop_cache(f: io.FileIO, start: int, end: int) -> None:
    """Ask the kernel to drop ``[start, end)`` of ``f`` from the page cache (clean pages only; a hint)."""
    if hasattr(os, "posix_fadvise") and end > start:
        with contextlib.suppress(OSError):
            os.posix_fadvise(f.fileno(), start, end - start, os.POSIX_FADV_DONTNEED)


def read_into(f: io.FileIO, data: Tensor, offset: int) -> None:
    """Fill the contiguous uint8 tensor ``data`` with the bytes of ``f`` from ``offset``."""
    view, done = data.numpy().data, 0
    f.seek(offset)
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise PissaError(f"{f.name} ended at byte {offset + done}, before the tensor bytes its header lists; re-save it")
        done += n


def write_all(f: io.FileIO, data: memoryview | bytes) -> None:
    view, done = memoryview(data).cast("B"), 0
    while done < len(view):
        done += f.write(view[done:]) or 0


def raw_bytes(t: Tensor) -> memoryview:
    """A tensor's bytes in memory order (no copy for a contiguous tensor)."""
    return t.contiguous().view(-1).view(torch.uint8).numpy().data


def as_tensor(data: Tensor, entry: Entry) -> Tensor:
    """The uint8 bytes ``data`` of ``entry`` viewed as its dtype and shape."""
    if entry.dtype not in TORCH_DTYPES:
        raise PissaError(f"a tensor of safetensors dtype {entry.dtype} cannot be read here (shape {list(entry.shape)})")
    return data.view(TORCH_DTYPES[entry.dtype]).view(entry.shape)


def read_tensor(f: io.FileIO, entry: Entry) -> Tensor:
    """``entry``'s tensor in memory of its own (small tensors: adapter factors, head parameters)."""
    data = torch.empty(entry.end - entry.start, dtype=torch.uint8)
    read_into(f, data, entry.start)
    return as_tensor(data, entry)


class Reader:
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
        read_into(f, data, entry.start)
        if drop:
            drop_cache(f, entry.start, entry.end)
        return as_tensor(data, entry)

    def copy(self, src: io.FileIO, dst: io.FileIO, start: int, end: int, *, drop: bool = False) -> None:
        """Append bytes ``[start, end)`` of ``src`` to ``dst``, ``CHUNK`` bytes at a time."""
        buf = self._buffer(min(CHUNK, end - start))
        for at in range(start, end, CHUNK):
            part = buf[: min(CHUNK, end - at)]
            read_into(src, part, at)
            write_all(dst, part.numpy().data)
            if drop:
                drop_cache(src, at, at + part.numel())


def write_at(path: Path, offset: int, t: Tensor) -> None:
    """Overwrite ``t``'s raw bytes at ``offset`` of file ``path``.

    No fsync: a killed process loses nothing written, and a resume re-verifies every target's
    bytes against its recorded digest anyway.
    """
    with open(path, "r+b", buffering=0) as f:
        f.seek(offset)
        write_all(f, raw_bytes(t))


def header_bytes(header: dict[str, Any]) -> bytes:
    """A safetensors header (length prefix and JSON padded to 8 bytes) for ``header``."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def concat_safetensors(path: Path, records: list[Path], metadata: dict[str, str], reader: Reader) -> None:
    """Concatenate the tensors of several safetensors files into one, copying their bytes (keys sorted per file)."""
    write_safetensors(path, [(record, sorted(shard_entries(record).items())) for record in records], metadata, reader)


def write_safetensors(path: Path, parts: list[tuple[Path, list[tuple[str, Entry]]]], metadata: dict[str, str],
                      reader: Reader) -> None:
    """One safetensors file of the tensors ``(key, entry)`` listed for each source file, in that order, their
    bytes copied through ``reader`` (one buffer: memory stays one :data:`CHUNK`)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for _, entries in parts:
        for key, e in entries:
            header[key] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.end - e.start]}
            offset += e.end - e.start
    with open(path, "wb", buffering=0) as out:
        write_all(out, header_bytes(header))
        for source, entries in parts:
            with open(source, "rb", buffering=0) as f:
                for _, e in entries:
                    reader.copy(f, out, e.start, e.end)
