"""The Kronecker shape: ``delta = s * sum_k U_k (x) V_k`` (SoKA, :mod:`pissa.methods.kronecker`).

For a weight ``W (m p, n q)``: ``kron_U (r, m, n)`` and ``kron_V (r, p, q)`` train (frozen copies ``U0``, ``V0``),
``W_res = W - s * sum_k U0_k (x) V0_k``. The forward never forms the delta: with ``x (..., n q)`` seen as
``X (..., n, q)``, ``(U (x) V) x = vec(U X V^T)``, so ``y = s * sum_k U_k X V_k^T (..., m, p) -> (..., m p)``.
It has no LoRA form (a sum of Kronecker products is full rank in general): export it merged.
Facts: ``factors`` ``[m, n, p, q]``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from pissa.adapter.shapes.base import Shape, Tensors
from pissa.methods.factors import Init
from pissa.methods.kronecker import kron_sum


class Kronecker(Shape):
    """``delta = s * sum_k kron(kron_U[k], kron_V[k])``, ``kron_U (r, m, n)``, ``kron_V (r, p, q)``; see the module docstring."""

    name = "kronecker"
    variables = {"kron_U": "U0", "kron_V": "V0"}
    required = ("kron_U", "kron_V", "U0", "V0")

    def initial(self, t: Tensors, s: float) -> Tensor:
        return s * kron_sum(t["U0"], t["V0"])

    def delta(self, t: Tensors, s: float) -> Tensor:
        return s * kron_sum(t["kron_U"], t["kron_V"])

    def forward(self, x: Tensor, t: Tensors, s: float) -> Tensor:
        U, V = t["kron_U"], t["kron_V"]
        (_, m, n), (_, p, q) = U.shape, V.shape
        X = x.reshape(*x.shape[:-1], n, q)
        y = torch.einsum("kij,...jl,kal->...ia", U, X, V).reshape(*x.shape[:-1], m * p)
        return y * s if s != 1.0 else y

    def scaled(self, init: Init, s: float) -> Init:
        """Each ``U_k`` and ``V_k`` divided by ``sqrt(s)``."""
        root = s**0.5
        t = dict(init.tensors)
        t["kron_U"], t["kron_V"] = t["kron_U"] / root, t["kron_V"] / root
        return dataclasses.replace(init, tensors=t)

    def describe(self, t: Tensors) -> str:
        (r, m, n), (_, p, q) = t["kron_U"].shape, t["kron_V"].shape
        return f"terms={r}, U=({m}, {n}), V=({p}, {q})"
