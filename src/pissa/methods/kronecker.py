"""SoKA (arXiv 2506.15251): Kronecker-product adapters from the SVD of the Van Loan-Pitsianis rearrangement.

A weight ``W (m p, n q)`` is a sum of Kronecker products ``W = sum_k sigma_k U_k (x) V_k`` with ``U_k (m, n)``,
``V_k (p, q)``: the rearrangement ``R(W) (m n, p q)`` maps ``U (x) V`` to ``vec(U) vec(V)^T``, so the SVD of
``R(W)`` gives the terms (Van Loan and Pitsianis), and the top r of them are the best r-term Kronecker
approximation in Frobenius norm: ``||W - sum_{k<=r}||_F^2 = sum_{k>r} sigma_k^2``. SoKA trains the top terms
(``sqrt(sigma_k)`` split into both factors) and freezes the rest in the residual, as PiSSA does with the
principal singular triplets; each layer keeps as many terms as its spectrum asks for (:func:`term_count`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from pissa.errors import PissaError
from pissa.methods.factors import Init
from pissa.methods.inputs import InitOptions, KronRule

FactorShape = tuple[int, int, int, int]
"""``(m, n, p, q)``: ``U (m, n)`` and ``V (p, q)`` for a weight ``(m p, n q)``."""


def balanced_split(dim: int) -> tuple[int, int]:
    """``(a, b)`` with ``a b = dim``, ``a <= b`` and ``a + b`` smallest: ``a`` the largest divisor ``<= sqrt(dim)``
    (what PEFT's LoKr ``factorization(dim)`` returns)."""
    a = max(d for d in range(1, math.isqrt(dim) + 1) if dim % d == 0)
    return a, dim // a


def factor_shape(out_features: int, in_features: int, given: Sequence[int] | None = None,
                 where: str = "the weight") -> FactorShape:
    """The factor shapes ``(m, n, p, q)`` of a weight ``(out, in)``: ``given`` when it divides it (``m p = out``,
    ``n q = in``), else a PissaError naming ``where``; by default the balanced splits ``out = m p``, ``in = n q``
    (:func:`balanced_split`, ``m <= p``, ``n <= q``)."""
    if given is None:
        (m, p), (n, q) = balanced_split(out_features), balanced_split(in_features)
        return m, n, p, q
    m, n, p, q = (int(v) for v in given)
    if m * p != out_features or n * q != in_features:
        raise PissaError(f"kron_shape {(m, n, p, q)} does not divide {where} of shape ({out_features}, {in_features}): "
                         f"it needs m*p = {out_features} and n*q = {in_features} (m, p from the divisors of "
                         f"{out_features}; n, q of {in_features}); leave kron_shape unset for balanced factors")
    return m, n, p, q


def rearrange(W: Tensor, shape: FactorShape) -> Tensor:
    """Van Loan-Pitsianis: ``W (..., m p, n q) -> R (..., m n, p q)``, ``R[(i, j), (k, l)] = W[i p + k, j q + l]``,
    so ``R(U (x) V) = vec(U) vec(V)^T``."""
    m, n, p, q = shape
    lead = W.shape[:-2]
    return W.reshape(*lead, m, p, n, q).transpose(-3, -2).reshape(*lead, m * n, p * q)


def unrearrange(R: Tensor, shape: FactorShape) -> Tensor:
    """The inverse of :func:`rearrange`: ``R (..., m n, p q) -> W (..., m p, n q)``."""
    m, n, p, q = shape
    lead = R.shape[:-2]
    return R.reshape(*lead, m, n, p, q).transpose(-3, -2).reshape(*lead, m * p, n * q)


def kron_sum(U: Tensor, V: Tensor) -> Tensor:
    """``sum_k U_k (x) V_k (m p, n q)`` of ``U (r, m, n)`` and ``V (r, p, q)``."""
    (_, m, n), (_, p, q) = U.shape, V.shape
    return torch.einsum("kij,kab->iajb", U, V).reshape(m * p, n * q)


def kron_svd(W: Tensor, shape: FactorShape) -> tuple[Tensor, Tensor, Tensor]:
    """Every Kronecker term of ``W (L, m p, n q)``: ``U (L, K, m, n)``, ``S (L, K)`` (descending), ``V (L, K, p, q)``
    with ``K = min(m n, p q)`` and ``W = sum_k S_k U_k (x) V_k`` (``U_k``, ``V_k`` of unit Frobenius norm): the full
    SVD of :func:`rearrange`, in W's dtype."""
    m, n, p, q = shape
    Ur, S, Vh = torch.linalg.svd(rearrange(W, shape), full_matrices=False)
    L, K = S.shape
    return Ur.mT.reshape(L, K, m, n), S, Vh.reshape(L, K, p, q)


def term_count(S: Tensor, cap: int, rule: KronRule = "energy", tau: float = 0.9, total: float | None = None) -> int:
    """How many Kronecker terms a matrix with spectrum ``S (K,)`` (descending) keeps, at most ``cap``.

    ``"energy"``: the smallest r with ``sum_{k<=r} S_k^2 / total >= tau``, ``total = sum_k S_k^2`` (or ``||W||_F^2``
    given, when S holds only the top values); ``"elbow"``: the terms before the elbow, the point of ``(k, S_k)``
    farthest below the chord through the first and last ones (both axes scaled to [0, 1]; S whole); at least 1."""
    S = S.double()
    if rule == "energy":
        share = S.square().cumsum(0) / (S.square().sum() if total is None else total)
        r = int((share < tau).sum()) + 1
    else:
        K = len(S)
        k = torch.linspace(0, 1, K, dtype=S.dtype)
        s = (S - S[-1]) / (S[0] - S[-1]) if K > 1 and S[0] > S[-1] else torch.zeros_like(S)
        r = int((1 - k - s).argmax())  # the elbow (farthest below the chord s = 1 - k); the terms before it stay
    return max(1, min(r, cap, len(S)))


def soka_init(W: Tensor, r: int, opt: InitOptions) -> Init:
    """SoKA of ``W (L, out, in)``: the Kronecker shape's tensors ``kron_U (L, R, m, n)``, ``kron_V (L, R, p, q)``,
    term k being ``sqrt(S_k) U_k`` and ``sqrt(S_k) V_k`` of the rearrangement's top singular triplets
    (``opt.top_svd``, the :func:`kron_svd` terms); matrix i keeps :func:`term_count` of its spectrum (at most r;
    the energy rule needs only the top r values and ``||W||_F^2``, the elbow every value) terms, recorded in
    ``Init.ranks`` (R their largest). ``Init.rank`` is r, so the scaling is ``alpha / r`` whatever a layer keeps.
    Factor shapes: :func:`factor_shape` with ``opt.kron_shape``."""
    m, n, p, q = shape = factor_shape(W.shape[-2], W.shape[-1], opt.kron_shape, opt.where())
    R = rearrange(W, shape)
    cap = min(r, m * n, p * q)
    if opt.kron_rule == "elbow":
        ranks = tuple(term_count(S, cap, "elbow") for S in torch.linalg.svdvals(R.double()))
        Ur, S, Vh = opt.top_svd(R, max(ranks))
    else:
        Ur, S, Vh = opt.top_svd(R, cap)
        energy = torch.linalg.matrix_norm(R.double()).square()
        ranks = tuple(term_count(S[i], cap, "energy", opt.kron_tau, float(energy[i])) for i in range(len(R)))
    keep = max(ranks)
    Ur, S, Vh = Ur[..., :keep], S[:, :keep], Vh[:, :keep]
    root = S.sqrt()
    tensors = {"kron_U": (Ur * root[:, None]).mT.reshape(len(R), -1, m, n),
               "kron_V": (Vh * root[..., None]).reshape(len(R), -1, p, q)}
    return Init("kronecker", tensors, ("kron_U", "kron_V"), {"factors": list(shape)}, rank=r, ranks=ranks)
