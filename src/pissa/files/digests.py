"""Fingerprints of base weights, so an adapter is never applied to the wrong model."""

from __future__ import annotations

import hashlib

import torch
import xxhash
from torch import Tensor


def weight_digest(W: Tensor) -> str:
    """XXH3-128 (hex) of a tensor's dtype, shape and raw bytes in its stored layout.

    Any changed element, dtype or shape gives a different digest. The digest guards against
    applying an adapter to the wrong base by accident (it sits in the adapter's own JSON, so it
    is no defence against tampering and needs no cryptographic hash); XXH3 hashes SmolLM2's
    424 MB of projections in 0.02 s here, sha256 in 0.24 s.
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
