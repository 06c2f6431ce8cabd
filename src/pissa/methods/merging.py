"""Merging the task vectors of several adapters: RMM's reversible basis and the classic single merges.

The math only (pure functions of tensors); the `pissa merge-adapters` command that reads adapters into these
stacks is not built yet.

A *task vector* is what training moved one trainable factor from its initial value, ``X_t - X0`` for task
``t = 1..T`` (the initial value is shared when the adapters come from one base, method, rank and seed).

RMM (Reversible Model Merging, arXiv 2510.14163) keeps, per *position* of a factor (a row of ``B (out, r)``, a
column of ``A (r, in)``: a vector of the rank's ``r`` entries), the stack of the T tasks' vectors
``X (r, T)`` and its SVD ``X = U S V^T``. The p leading left singular vectors ``U_p (r, p)`` are the shared basis
and ``C = S_p V_p^T (p, T)`` the tasks' coefficients (the least-squares projection ``U_p^T X``); task t comes
back as ``U_p C[:, t]``. Eckart-Young: this is the best rank-p fit of X, its Frobenius error is
``sqrt(sum_{k > p} s_k^2)`` (zero once ``p >= rank X``).

The single merges combine the T task vectors ``D (T, ...)`` into one: linear (their mean), TIES (trim each to
its largest ``density`` fraction by magnitude, elect each entry's sign as the sign of the trimmed sum, average
the trimmed values that agree with it) and DARE (drop each entry with probability ``drop``, rescale the rest by
``1 / (1 - drop)``, average; seeded). Everything in float64.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from pissa.errors import PissaError


class Basis(NamedTuple):
    """RMM of a stack of positions: ``basis (n, r, q)``, ``coefficients (n, q, T)``, ``discarded (n,)``.

    ``q = min(p, r, T)`` (no more components exist); ``discarded[i]`` is position i's Frobenius error
    ``||X_i - basis_i @ coefficients_i||_F = sqrt(sum of its discarded singular values squared)``."""

    basis: Tensor
    coefficients: Tensor
    discarded: Tensor


def rmm_basis(stack: Tensor, p: int) -> Basis:
    """The RMM basis of ``stack (n, r, T)`` (n positions, each an ``(r, T)`` matrix of T task vectors) with p
    components; batched SVD in float64 (see the module docstring)."""
    if p < 1:
        raise PissaError(f"`components` must be an integer >= 1, got {p}")
    U, S, Vh = torch.linalg.svd(stack.double(), full_matrices=False)  # (n, r, k), (n, k), (n, k, T)
    q = min(p, S.shape[-1])
    coefficients = S[:, :q, None] * Vh[:, :q, :]
    discarded = S[:, q:].square().sum(-1).sqrt()
    return Basis(U[:, :, :q].contiguous(), coefficients.contiguous(), discarded)


def rmm_task(basis: Tensor, coefficients: Tensor, task: int) -> Tensor:
    """Task ``task``'s vectors ``(n, r)`` from ``basis (n, r, q)`` and ``coefficients (n, q, T)``: ``basis @ c_t``."""
    return (basis @ coefficients[:, :, task : task + 1]).squeeze(-1)


def linear_merge(deltas: Tensor) -> Tensor:
    """The mean of the task vectors ``deltas (T, ...)`` over T."""
    return deltas.double().mean(0)


def ties_merge(deltas: Tensor, density: float) -> Tensor:
    """TIES-merging of ``deltas (T, ...)``: keep each task's ``ceil(density * size)`` largest magnitudes, elect
    each entry's sign ``sign(sum_t trimmed_t)``, and average the kept entries whose sign agrees (0 where none)."""
    if not 0 < density <= 1:
        raise PissaError(f"`density` must be in (0, 1], got {density}")
    d = deltas.double().flatten(1)
    keep = max(1, math.ceil(density * d.shape[1]))
    threshold = d.abs().topk(keep, dim=1).values[:, -1:]
    trimmed = torch.where(d.abs() >= threshold, d, torch.zeros_like(d))
    sign = trimmed.sum(0).sign()
    agree = (trimmed.sign() == sign) & (trimmed != 0)
    total = torch.where(agree, trimmed, torch.zeros_like(trimmed)).sum(0)
    count = agree.sum(0)
    return (total / count.clamp(min=1)).reshape(deltas.shape[1:])


def dare_merge(deltas: Tensor, drop: float, generator: torch.Generator) -> Tensor:
    """DARE of ``deltas (T, ...)``: each entry kept with probability ``1 - drop`` (a Bernoulli draw from
    ``generator``), the kept ones scaled by ``1 / (1 - drop)``, then the mean over T."""
    if not 0 <= drop < 1:
        raise PissaError(f"`drop` must be in [0, 1), got {drop}")
    d = deltas.double()
    keep = torch.rand(d.shape, generator=generator, dtype=torch.float64) >= drop
    return (d * keep / (1 - drop)).mean(0)
