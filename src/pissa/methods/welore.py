"""WeLore (arXiv 2407.11239): non-uniform low-rank compression from the shape of each matrix's spectrum.

Per matrix ``W (m, n)`` with singular values ``σ`` (descending), the min-max normalised values are

    σ̂ = (σ - σ_min) / (σ_max - σ_min)        (all ones when σ_max = σ_min)

and one global threshold ``τ`` keeps ``r = #{i : σ̂_i >= τ}`` components of every matrix. A matrix is
*low-rank-capable* (an LRCM) when its two factors store fewer numbers than it does, ``r (m + n) < m n``; it
is then stored as ``A (r, n)``, ``B (m, r)``, otherwise it stays dense. Matrices with a heavy-tailed spectrum
(few large σ) get small ranks; flat spectra stay dense. ``τ`` is found by bisection so that the parameters
saved over all matrices reach a requested fraction of their total. The uniform baseline cuts the same
fraction of rank from every matrix (bisection on that common fraction).

Everything here is pure: spectra and shapes in, ranks out; :func:`lowrank_factors` splits an SVD.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pissa.errors import PissaError
from pissa.methods.inputs import InitOptions

BISECTIONS = 60
"""Bisection steps on τ (or on the uniform rank fraction): the interval [0, 1] shrinks to 2^-60."""

Shape = tuple[int, int]


@dataclass(frozen=True)
class Plan:
    """The outcome of a search: ``ranks[i]`` for matrix i (None: it stays dense) and the reduction reached."""

    ranks: list[int | None]
    threshold: float
    """τ for WeLore; the rank fraction cut from every matrix for the uniform plan."""
    requested: float
    reached: float
    """``1 - stored / dense`` over all the matrices (parameters)."""


def normalized(sigma: Tensor) -> Tensor:
    """``σ̂ = (σ - σ_min) / (σ_max - σ_min)`` of a 1-D spectrum (all ones for a flat spectrum)."""
    lo, hi = sigma.min(), sigma.max()
    if hi <= lo:
        return torch.ones_like(sigma)
    return (sigma - lo) / (hi - lo)


def kept_rank(sigma: Tensor, tau: float) -> int:
    """``#{i : σ̂_i >= τ}``: the components of ``sigma`` that survive threshold ``tau`` (at least 1 for τ <= 1)."""
    return int((normalized(sigma) >= tau).sum())


def is_lrcm(shape: Shape, rank: int) -> bool:
    """Low-rank-capable: the factors ``A (r, n)``, ``B (m, r)`` of an ``(m, n)`` matrix hold fewer numbers:
    ``r (m + n) < m n``."""
    m, n = shape
    return rank * (m + n) < m * n


def stored(shape: Shape, rank: int | None) -> int:
    """Parameters a matrix keeps: ``r (m + n)`` as factors (rank not None), else ``m n``."""
    return shape[0] * shape[1] if rank is None else rank * (shape[0] + shape[1])


def reduction(shapes: Sequence[Shape], ranks: Sequence[int | None]) -> float:
    """``1 - Σ stored / Σ m n``: the fraction of the matrices' parameters saved."""
    dense = sum(m * n for m, n in shapes)
    return 1.0 - sum(stored(s, r) for s, r in zip(shapes, ranks, strict=True)) / dense


def _factored(shape: Shape, rank: int) -> int | None:
    return rank if is_lrcm(shape, rank) else None


def uniform_rank(shape: Shape, cut: float) -> int:
    """The rank left when the fraction ``cut`` of ``min(m, n)`` is removed: ``max(1, round((1 - cut) k))``."""
    return max(1, round((1.0 - cut) * min(shape)))


def check_fraction(fraction: float) -> None:
    """PissaError unless ``0 < fraction < 1``."""
    if not 0.0 < fraction < 1.0:
        raise PissaError(f"`reduction` {fraction} must be a fraction in (0, 1), e.g. 0.3 for 30% fewer parameters")


def check_request(shapes: Sequence[Shape], fraction: float) -> None:
    """PissaError unless ``0 < fraction < 1`` and rank 1 everywhere (the most any plan cuts) would save ``fraction``."""
    check_fraction(fraction)
    top = reduction(shapes, [_factored(s, 1) for s in shapes])
    if top < fraction:
        raise PissaError(f"`reduction` {fraction} is out of reach: rank 1 everywhere saves at most {top:.4f}; ask for less")


def _bisect(plan_at: Callable[[float], list[int | None]], shapes: Sequence[Shape], fraction: float, what: str) -> Plan:
    """The smallest ``x`` in [0, 1] whose plan reaches ``fraction`` (reduction grows with x)."""
    check_fraction(fraction)
    top = reduction(shapes, plan_at(1.0))
    if top < fraction:
        raise PissaError(f"`reduction` {fraction} is out of reach: the {what} cut saves at most {top:.4f}; ask for less")
    lo, hi = 0.0, 1.0
    for _ in range(BISECTIONS):
        mid = (lo + hi) / 2
        if reduction(shapes, plan_at(mid)) >= fraction:
            hi = mid
        else:
            lo = mid
    ranks = plan_at(hi)
    return Plan(ranks, hi, fraction, reduction(shapes, ranks))


def welore_plan(spectra: Sequence[Tensor], shapes: Sequence[Shape], fraction: float) -> Plan:
    """WeLore: the smallest τ whose LRCMs save at least ``fraction`` of the parameters of the matrices
    ``shapes[i]`` with spectra ``spectra[i]`` (1-D, descending). The reduction steps with τ, so the reached one
    exceeds the request by at most one matrix's step (one component, or one matrix turning low-rank)."""
    def at(tau: float) -> list[int | None]:
        return [_factored(shape, kept_rank(s, tau)) for s, shape in zip(spectra, shapes, strict=True)]
    return _bisect(at, shapes, fraction, "WeLore")


def uniform_plan(shapes: Sequence[Shape], fraction: float) -> Plan:
    """The baseline: the smallest common fraction ``c`` of rank cut from every matrix (rank
    :func:`uniform_rank`, LRCMs only) whose savings reach ``fraction``."""
    return _bisect(lambda c: [_factored(s, uniform_rank(s, c)) for s in shapes], shapes, fraction, "uniform")


def lowrank_factors(U: Tensor, S: Tensor, Vh: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``A = sqrt(S_r) Vh_r (r, n)`` and ``B = U_r sqrt(S_r) (m, r)`` from ``W = U diag(S) Vh``: ``B A`` is the best
    rank-r approximation of W, with ``sqrt(S)`` on both sides so the two factors have equal norms (PiSSA's split)."""
    root = S[:rank].sqrt()
    return root[:, None] * Vh[:rank], U[:, :rank] * root


def welore_init(W: Tensor, r: int, opt: InitOptions) -> tuple[Tensor, Tensor]:
    """WeLore-COFT has no adapter factors: it trains a compressed model's own (``pissa finetune --method welore``)."""
    raise PissaError("welore fine-tunes a compressed model: run pissa compress first, "
                     "then pissa finetune --model DIR --method welore")
