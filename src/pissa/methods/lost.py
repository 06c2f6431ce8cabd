"""LOST (arXiv 2508.02668): a weight as a trainable low-rank part plus a trainable channel-wise sparse part, both
cut from the SVD of the weight it replaces (at pre-training init: a randomly initialised one).

With ``W = U S V^T`` (out x in), rank ``r`` and ``k`` kept input channels::

    B = U[:, :r] sqrt(S[:r])             (out, r)
    A = sqrt(S[:r]) V[:, :r]^T           (r, in)
    R = W - B A = U[:, r:] S[r:] V[:, r:]^T   (out, in): the remaining singular components
    index = the k columns j of R with the largest ||R[:, j]||_2, ascending   (k,) int64
    values = R[:, index]                 (out, k)
    W_lost = B A + scatter(values, index)  (the sparse part: ``values`` in the columns ``index``, zero elsewhere)

so ``k = in`` rebuilds ``W`` exactly and ``k = 0`` is the rank-r truncation (Eckart-Young). The layer computes
``y = (x A^T) B^T + x[..., index] values^T = x W_lost^T``: the sparse part costs one gather and an (out, k) matmul.

The channel rule: a column of ``R`` is what input channel ``j`` contributes to the output beyond the low-rank part;
keeping the columns of largest norm keeps most of ``||R||_F^2`` (their sum of squares) that any k columns can, so
``||W - W_lost||_F`` is the smallest a choice of k whole input channels allows. Input channels (columns) rather than
output rows: a gathered slice of the input is what a channel-sparse matmul reads, and every output still gets
the kept channels' full residual.

Numerics: the SVD runs in float32 (float64 for a float64 ``W``) and the factors are cast back to ``W``'s dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from pissa.errors import PissaError


@dataclass(frozen=True)
class LostFactors:
    """The parts of :func:`lost_decompose`: ``B`` (out, r), ``A`` (r, in), ``index`` (k,) int64 ascending,
    ``values`` (out, k)."""

    B: Tensor
    A: Tensor
    index: Tensor
    values: Tensor


def channel_count(channels: float, in_features: int) -> int:
    """Input channels a layer of ``in_features`` keeps for ``channels``: a fraction in [0, 1] of ``in_features``
    (rounded to the nearest channel), or a whole count > 1 (at most ``in_features``). PissaError otherwise."""
    if isinstance(channels, bool) or not isinstance(channels, (int, float)) or not math.isfinite(channels):
        raise PissaError(f"`sparse_channels` must be a fraction in [0, 1] or a whole count > 1, got {channels!r}")
    if 0 <= channels <= 1:
        return round(channels * in_features)
    if channels < 0 or channels != int(channels):
        raise PissaError(f"`sparse_channels` must be a fraction in [0, 1] or a whole count > 1, got {channels!r}")
    if channels > in_features:
        raise PissaError(f"`sparse_channels` {int(channels)} is more than the {in_features} input channels of a layer")
    return int(channels)


def select_channels(residual: Tensor, k: int) -> Tensor:
    """The ``k`` columns of ``residual`` (out, in) with the largest L2 norms, as ascending int64 indices (k,);
    ties broken towards the lower index."""
    norms = torch.linalg.vector_norm(residual.double(), dim=0)
    order = torch.sort(-norms, stable=True).indices  # stable: equal norms keep index order
    return order[:k].sort().values


def lost_decompose(weight: Tensor, rank: int, k: int) -> LostFactors:
    """``weight`` (out, in) as LOST's low-rank factors and ``k`` sparse input channels (module docstring).

    ``0 < rank < min(out, in)`` and ``0 <= k <= in``, else PissaError."""
    out_features, in_features = weight.shape
    if not 0 < rank < min(out_features, in_features):
        raise PissaError(f"`rank` must be between 1 and {min(out_features, in_features) - 1} (below the smaller side of "
                         f"a {out_features}x{in_features} weight), got {rank}")
    if not 0 <= k <= in_features:
        raise PissaError(f"`sparse_channels` {k} is outside 0..{in_features} input channels")
    w = weight if weight.dtype == torch.float64 else weight.float()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:rank].sqrt()
    b = u[:, :rank] * root
    a = root[:, None] * vh[:rank]
    residual = w - b @ a
    index = select_channels(residual, k)
    return LostFactors(b.to(weight.dtype), a.to(weight.dtype), index, residual[:, index].to(weight.dtype))


def lost_weight(f: LostFactors) -> Tensor:
    """The dense (out, in) weight ``B A + scatter(values, index)`` that the factors compute."""
    w = f.B @ f.A
    return w.index_add(1, f.index.to(w.device), f.values)


def lost_forward(x: Tensor, f: LostFactors) -> Tensor:
    """``y = (x A^T) B^T + x[..., index] values^T`` for ``x`` (..., in): equals ``x @ lost_weight(f)^T`` (..., out)."""
    y = (x @ f.A.T) @ f.B.T
    if f.index.numel():
        y = y + x.index_select(-1, f.index.to(x.device)) @ f.values.T
    return y
