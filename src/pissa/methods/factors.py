"""The factor record of an adapter and its algebra: pure functions on tensors, no model code.

An adapter's update is ``B @ core @ A`` (``B @ A`` without a core): ``A (..., r, in)``,
``B (..., out, r)``, ``core`` None, ``(..., r)`` (a diagonal) or ``(..., r, r)``. The frozen
residual of a weight ``W (out, in)`` is always

    residual = W - s * Br @ Ar      (QPiSSA: residual factors one iteration behind)
    residual = W - s * B @ core @ A (every other method)

so that the adapted layer starts exactly where the base layer was.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

Part = Literal["A", "B", "core"]


@dataclass(frozen=True)
class Factors:
    """An adapter's factors: the update is ``B @ core @ A`` (``B @ A`` without a core).

    Shapes (leading batch dims allowed): ``A (..., r, in)``, ``B (..., out, r)``, ``core`` None,
    ``(..., r)`` (a diagonal) or ``(..., r, r)``. ``train`` names the parts that are trainable;
    ``orthonormal`` marks factors whose columns (B) and rows (A) should stay orthonormal
    (:func:`pissa.regularization` penalizes the drift, as SORSA does). ``Ar (..., r, in)``,
    ``Br (..., out, r)``: residual factors, when the residual is ``W - Br Ar`` rather than
    ``W - B core A`` (QPiSSA, :func:`pissa.methods.qpissa.refine`); None otherwise.
    """

    A: Tensor
    B: Tensor
    core: Tensor | None = None
    train: tuple[Part, ...] = ("A", "B")
    orthonormal: bool = False
    Ar: Tensor | None = None
    Br: Tensor | None = None

    def layer(self, i: int) -> Factors:
        """Matrix ``i`` of a batch."""
        core, Ar, Br = (None if t is None else t[i] for t in (self.core, self.Ar, self.Br))
        return dataclasses.replace(self, A=self.A[i], B=self.B[i], core=core, Ar=Ar, Br=Br)

    def folded(self) -> tuple[Tensor, Tensor]:
        """``(A, B @ core)``: two factors with the same product."""
        return self.A, fold_core(self.B, self.core)

    def to(self, dtype: torch.dtype) -> Factors:
        core, Ar, Br = (None if t is None else t.to(dtype) for t in (self.core, self.Ar, self.Br))
        return dataclasses.replace(self, A=self.A.to(dtype), B=self.B.to(dtype), core=core, Ar=Ar, Br=Br)

    def init(self) -> Init:
        """The factors as the low-rank shape's :class:`Init` (``lora_A``, ``lora_B``[, ``lora_core``][, ``Ar``, ``Br``])."""
        names = {"A": "lora_A", "B": "lora_B", "core": "lora_core"}
        tensors = {names[p]: t for p, t in (("A", self.A), ("B", self.B), ("core", self.core)) if t is not None}
        tensors.update({k: t for k, t in (("Ar", self.Ar), ("Br", self.Br)) if t is not None})
        return Init("lowrank", tensors, tuple(names[p] for p in self.train), {"orthonormal": self.orthonormal},
                    rank=self.A.shape[-2])


@dataclass(frozen=True)
class Init:
    """A method's initial adapter for a batch of L weights, in any shape (see :mod:`pissa.adapter.shapes`).

    ``tensors``: the shape's tensors by name, each with a leading batch dim ``(L, ...)``, holding the values
    the trainable ones start from (the shape adds their frozen initial copies); ``train``: the names that
    train; ``meta``: JSON-able facts of the shape (the same for every matrix of the batch; saved with each
    layer); ``rank``: the rank that sets the scaling ``alpha / rank``. ``ranks``: when the matrices of a batch
    keep different numbers of terms (SoKA), each one's count; every tensor then holds ``max(ranks)`` terms on
    its first dim after the batch dim, and :meth:`layer` keeps matrix i's first ``ranks[i]`` (no padding trains).
    """

    shape: str
    tensors: Mapping[str, Tensor]
    train: tuple[str, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)
    rank: int = 1
    ranks: tuple[int, ...] | None = None

    def layer(self, i: int) -> Init:
        """Matrix ``i`` of the batch (its own terms only when ``ranks`` is set)."""
        keep = slice(None) if self.ranks is None else slice(self.ranks[i])
        return dataclasses.replace(self, tensors={k: t[i][keep] for k, t in self.tensors.items()}, ranks=None)

    def to(self, dtype: torch.dtype) -> Init:
        """Floating-point tensors cast to ``dtype`` (index tensors stay integers)."""
        return dataclasses.replace(
            self, tensors={k: t.to(dtype) if t.is_floating_point() else t for k, t in self.tensors.items()})


def fold_core(B: Tensor, core: Tensor | None) -> Tensor:
    """``B @ core`` (out, r) for a full ``(r, r)`` core, ``B * core`` for a diagonal ``(r,)``, B if None."""
    if core is None:
        return B
    return B * core.unsqueeze(-2) if core.dim() == B.dim() - 1 else B @ core


def as_factors(result: tuple[Tensor, Tensor] | Factors) -> Factors:
    """A low-rank init function's result as :class:`Factors` (a plain ``(A, B)`` pair: both train)."""
    return result if isinstance(result, Factors) else Factors(A=result[0], B=result[1])


def orthonormality(A: Tensor, B: Tensor) -> Tensor:
    """SORSA's regularizer ``||B^T B - I||_F + ||A A^T - I||_F`` for ``A (r, in)``, ``B (out, r)`` (a 0-d tensor)."""
    eye = torch.eye(A.shape[-2], dtype=A.dtype, device=A.device)
    return torch.linalg.matrix_norm(B.mT @ B - eye) + torch.linalg.matrix_norm(A @ A.mT - eye)


def residual_of(weight: Tensor, A: Tensor, B: Tensor, scaling: float = 1.0, core: Tensor | None = None) -> Tensor:
    """``weight - scaling * B @ core @ A`` (no core: ``B @ A``), computed in float32 (float64 if any
    input is) and cast to weight.dtype.

    The one formula for the residual: attach, load_adapter and decompose all call it, so a
    residual rebuilt from the saved initial factors is bit-identical to the one made at attach.
    """
    dtypes = (weight.dtype, A.dtype, B.dtype) + (() if core is None else (core.dtype,))
    dt = torch.float64 if torch.float64 in dtypes else torch.float32
    left = fold_core(B.to(dt), None if core is None else core.to(dt))
    return torch.addmm(weight.to(dt), left, A.to(dt), alpha=-scaling).to(weight.dtype)


def merged_weight(residual: Tensor, A: Tensor, B: Tensor, scaling: float = 1.0, core: Tensor | None = None) -> Tensor:
    """The merged weight ``residual + scaling * B @ core @ A`` (out, in): the one formula of every merge.

    Computed in the factors' dtype (float32 by default), then cast to ``residual``'s dtype; the
    update is formed in place (one (out, in) temporary besides the result).
    """
    update = fold_core(B, core) @ A
    update.mul_(scaling)
    update.add_(residual.to(update.dtype))
    return update.to(residual.dtype)


def truncate(A: Tensor, B: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The best rank-k factors of the product ``B @ A`` (``A (R, in)``, ``B (out, R)``, k <= R).

    Thin QRs ``B = Qb Rb`` and ``A^T = Qa Ra`` reduce the SVD to the small ``Rb Ra^T = U S V^T``
    (R x R), so ``B A = (Qb U) S (Qa V)^T``; returns ``A_k = sqrt(S_k) (Qa V_k)^T (k, in)``,
    ``B_k = Qb U_k sqrt(S_k) (out, k)`` and all R singular values ``S`` of ``B A``: the
    truncation's error is ``||B A - B_k A_k||_F = sqrt(sum_{i > k} S_i^2)`` (Eckart-Young).
    Computed in float64, returned in A's dtype (S in float64).
    """
    dtype = A.dtype
    Qb, Rb = torch.linalg.qr(B.double())
    Qa, Ra = torch.linalg.qr(A.double().mT)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.mT)
    root = S[:k].sqrt()
    return (root[:, None] * (Vh[:k] @ Qa.mT)).to(dtype), ((Qb @ U[:, :k]) * root).to(dtype), S
