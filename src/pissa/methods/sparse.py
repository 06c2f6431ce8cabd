"""SaRA (Hu et al., 2024, arXiv 2409.06633): the smallest-magnitude entries of each weight train in place.

The mask of a weight ``W (out, in)`` is the set of its entries of least magnitude: the ``k = round(fraction * out
* in)`` smallest ``|w|`` (ties broken by position), or every entry with ``|w| < threshold``. The adapter is the
sparse set of those entries' values (the sparse shape, :mod:`pissa.adapter.shapes.sparse`); the residual holds
exact zeros there and W everywhere else, so ``residual + scatter(values) == W`` at the start.

Each matrix also records its threshold ``tau``: the given one, or with a fraction the smallest ``|w|`` left out of
the mask (so every masked entry has ``|w| <= tau``); SaRA's progressive step keeps the entries still below it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pissa.errors import PissaError
from pissa.methods.factors import Init
from pissa.methods.inputs import InitOptions


def check_fraction(fraction: float) -> None:
    """A PissaError unless ``0 < fraction < 1``."""
    if not (isinstance(fraction, (int, float)) and 0 < fraction < 1):
        raise PissaError(f"sparse_fraction must be in (0, 1) (the share of each weight's entries that train), got {fraction!r}")


def sparse_mask(W: Tensor, fraction: float, threshold: float | None = None) -> tuple[Tensor, Tensor]:
    """The masks of a batch ``W (L, out, in)``: flat indices ``(L, k)`` into each ``(out, in)`` matrix (int64,
    ascending) and the thresholds ``tau (L,)`` (module docstring). With ``threshold`` every matrix of the batch must
    have the same count k below it (attach gives such a rule's layers a batch each); else k from ``fraction``."""
    flat = W.flatten(1).abs()
    n = flat.shape[1]
    if threshold is None:
        check_fraction(fraction)
        k = min(n - 1, max(1, round(fraction * n)))
        order = torch.sort(flat, dim=1, stable=True).indices  # stable: ties by position, the same on every machine
        index = order[:, :k].sort(dim=1).values
        return index, flat.gather(1, order[:, k : k + 1]).squeeze(1)
    below = flat < threshold
    counts = below.sum(1)
    if int(counts.min()) == 0:
        raise PissaError(f"sparse_threshold {threshold:g} selects no entry of a {tuple(W.shape[1:])} weight; raise it "
                         "or leave it unset to use sparse_fraction")
    if int(counts.max()) != int(counts.min()):
        raise PissaError("sparse_threshold selects a different count in each matrix of one batch; "
                         "initialize such weights one at a time")
    index = torch.nonzero(below)[:, 1].reshape(len(W), -1)  # row-major: ascending within each matrix
    return index, torch.full((len(W),), float(threshold), dtype=W.dtype, device=W.device)


def sara_init(W: Tensor, r: int, opt: InitOptions) -> Init:
    """SaRA's init of ``W (L, out, in)``: the sparse shape's ``sparse_index (L, k)``, ``sparse_values (L, k)`` (the
    masked entries of W, trainable), ``sparse_threshold (L, 1)`` and ``sparse_size (L, 2)`` ``[out, in]``. ``r`` is not
    used (the count comes from ``opt.fraction`` / ``opt.threshold``)."""
    index, tau = sparse_mask(W, opt.fraction, opt.threshold)
    tau = tau.unsqueeze(1)  # (L, 1): every tensor of a layer has a dim
    values = W.flatten(1).gather(1, index)
    size = torch.tensor(W.shape[1:], dtype=torch.int64, device=W.device).expand(len(W), 2).clone()
    return Init("sparse", {"sparse_index": index, "sparse_values": values, "sparse_threshold": tau, "sparse_size": size},
                ("sparse_values",), {}, rank=r)
