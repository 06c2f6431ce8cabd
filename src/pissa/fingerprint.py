"""Fingerprints of base weights, so an adapter is never applied to the wrong model."""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor


def weight_digest(W: Tensor) -> str:
    """sha256 (hex, first 32 chars) of a tensor's dtype, shape and raw bytes in its stored layout.

    Any changed element, dtype or shape gives a different digest; ~1 GB/s on one CPU core.
    """
    t = W.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}:".encode())
    if t.numel():
        h.update(memoryview(t.view(-1).view(torch.uint8).numpy()))
    return h.hexdigest()[:32]


def model_fingerprint(digests: dict[str, str]) -> str:
    """One digest for a whole model from its per-layer digests (order-independent)."""
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(f"{name}={digests[name]};".encode())
    return h.hexdigest()[:32]
