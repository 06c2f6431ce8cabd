"""Digests of what pissa reads and writes: fingerprints of base weights (so an adapter is never applied to the
wrong model), of the tensors of a safetensors file, of a whole file and of a JSON document (so a file changed or
damaged after pissa wrote it is refused).

All are XXH3-128 in hex (``ALGORITHM``). Files are hashed as they are stored, in ``CHUNK`` (16 MiB) pieces read
into one buffer, so a large file is never held in memory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import xxhash
from torch import Tensor

from pissa.errors import PissaError
from pissa.files.safetensors import CHUNK, TORCH_DTYPES, Entry, read_into
from pissa.runtime import distributed

ALGORITHM = "xxh3-128"
"""The name recorded next to every digest of a file or document."""


def weight_digest(W: Tensor) -> str:
    """XXH3-128 (hex) of a tensor's dtype, shape and raw bytes in its stored layout.

    Any changed element, dtype or shape gives a different digest. The digest guards against
    applying an adapter to the wrong base by accident (it sits in the adapter's own JSON, so it
    is no defence against tampering and needs no cryptographic hash): XXH3, an order of magnitude
    faster than sha256 on model-sized inputs.
    """
    t = W.detach().contiguous().cpu()
    h = digest_hasher(t.dtype, tuple(t.shape))
    if t.numel():
        h.update(t.view(-1).view(torch.uint8).numpy().data)  # the array's bytes as a memoryview
    return h.hexdigest()


def digest_hasher(dtype: torch.dtype, shape: tuple[int, ...]) -> xxhash.xxh3_128:
    """The hasher of :func:`weight_digest` before any data: ``update`` it with a tensor's raw bytes,
    in pieces if need be, and ``hexdigest()`` equals ``weight_digest`` of that tensor."""
    return xxhash.xxh3_128(f"{dtype}:{shape}:".encode())


def model_fingerprint(digests: dict[str, str]) -> str:
    """One digest for a whole model from its per-layer digests (order-independent)."""
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(f"{name}={digests[name]};".encode())
    return h.hexdigest()[:32]


def entry_digest(path: Path, entry: Entry) -> str:
    """:func:`weight_digest` of ``entry``'s tensor in the safetensors file ``path``, read in ``CHUNK`` pieces."""
    h = digest_hasher(TORCH_DTYPES[entry.dtype], tuple(entry.shape))
    buf = torch.empty(min(CHUNK, entry.end - entry.start), dtype=torch.uint8)
    with open(path, "rb", buffering=0) as f:
        for at in range(entry.start, entry.end, CHUNK):
            part = buf[: min(CHUNK, entry.end - at)]
            read_into(f, part, at)
            h.update(part.numpy().data)
    return h.hexdigest()


def tensors_digest(path: Path, entries: dict[str, Entry]) -> str:
    """One digest of every tensor of a safetensors file (``entries``, its parsed header): XXH3-128 of
    ``name=weight_digest;`` in sorted name order, so it covers each tensor's name, dtype, shape and bytes (not
    the header's metadata or layout). A tensor of a dtype torch cannot read raises PissaError."""
    h = xxhash.xxh3_128()
    for name in sorted(entries):
        if entries[name].dtype not in TORCH_DTYPES:
            raise PissaError(f"{path} holds {name!r} of safetensors dtype {entries[name].dtype}, which pissa does not write")
        h.update(f"{name}={entry_digest(path, entries[name])};".encode())
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """XXH3-128 of a file's bytes, read in ``CHUNK`` pieces."""
    h = xxhash.xxh3_128()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def doc_digest(doc: dict[str, Any]) -> str:
    """XXH3-128 of a JSON document's canonical form (sorted keys, no spaces, ASCII): the same before it is
    written and after it is read back, whatever its indentation."""
    return xxhash.xxh3_128(json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()).hexdigest()


SHARD_DIGESTS = "residual_digests.json"
"""The record ``pissa init`` writes into OUT/residual: ``{"format": "pissa-residual-digests", "version": 1,
"algorithm": "xxh3-128", "shards": {shard file name: file_digest}}``."""


def write_shard_digests(folder: Path, digests: dict[str, str]) -> None:
    """Write the :data:`SHARD_DIGESTS` record of the shard files ``digests`` into ``folder``."""
    doc = {"format": "pissa-residual-digests", "version": 1, "algorithm": ALGORITHM, "shards": dict(sorted(digests.items()))}
    (folder / SHARD_DIGESTS).write_text(json.dumps(doc, indent=2))


def check_shards(root: Path, shards: list[str]) -> None:
    """Refuse a residual checkpoint whose shard files differ from its :data:`SHARD_DIGESTS` record: under
    torch.distributed each rank hashes a share of the shards (in ``CHUNK`` pieces) and a mismatch is a PissaError
    on every rank naming the first such shard. A folder without the record (not written by ``pissa init``, or
    before the record existed) is not checked."""
    if not (root / SHARD_DIGESTS).is_file():
        return
    try:
        recorded = json.loads((root / SHARD_DIGESTS).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        recorded = None
    recorded = recorded.get("shards") if isinstance(recorded, dict) else None
    if not isinstance(recorded, dict):
        raise PissaError(f"{SHARD_DIGESTS} in {root} is not valid; restore it or run pissa init again")
    if sorted(recorded) != sorted(shards):
        raise PissaError(f"{root} holds the shards {sorted(shards)}, its {SHARD_DIGESTS} records {sorted(recorded)}; "
                         "pass the OUT/residual folder that pissa init wrote, unchanged")
    rank, size = distributed.world()
    owners = distributed.assign([float((root / s).stat().st_size) for s in shards], size)
    wrong = [float(owner == rank and file_digest(root / s) != recorded[s]) for s, owner in zip(shards, owners)]
    first = next((s for s, w in zip(shards, distributed.all_sum(wrong)) if w), None)
    if first is not None:
        raise PissaError(f"shard {first} in {root} does not match the digest its {SHARD_DIGESTS} records (changed or "
                         "damaged after pissa init wrote it); restore the file or run pissa init again")
