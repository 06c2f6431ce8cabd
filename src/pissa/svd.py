"""Truncated SVD: exact, or randomized block Lanczos that is within 0.1% of exact.

All functions take a batch of matrices ``W (L, m, n)`` and return the top ``k`` singular
triplets ``U (L, m, k)``, ``S (L, k)`` (descending), ``Vh (L, k, n)``, so that
``U @ diag(S) @ Vh`` is (close to) the best rank-k approximation of each ``W``.

Why block Krylov: the spectra of trained weight matrices decay slowly, so plain subspace
iteration (``torch.svd_lowrank``, which PEFT's ``pissa_niter_4`` calls) converges slowly: on
SmolLM2-135M at rank 16 it leaves the rank-16 residual 0.5% above optimal. A block Krylov method
keeps *every* block of the power sequence and extracts the best rank-k approximation from their
whole span, which converges much faster per matmul (Musco & Musco, NeurIPS 2015). Block
Golub-Kahan-Lanczos bidiagonalization builds that span with two skinny matmuls per step and
gives the projected matrix for free, so no extra pass over ``W`` is needed at the end.
Equal-shape matrices are processed as one batch so the work runs as a few large matmuls.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import Tensor

SVDMethod = Literal["krylov", "exact"]

NITER = 4
"""Default block Lanczos iterations (t = NITER + 1 steps)."""
OVERSAMPLE = 16
"""Default extra block columns beyond the rank. With NITER, measured on SmolLM2-135M at rank 16:
mean residual 1.00007 x optimal, max 1.00036 x (benchmarks/init_speed.py)."""


def exact_svd(W: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k triplets from a full LAPACK SVD of ``W (..., m, n)``: exact, O(m n min(m, n))."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[..., :k], S[..., :k], Vh[..., :k, :]


def seeded(seeds: Sequence[int], shape: tuple[int, ...], like: Tensor, normal: bool = True) -> Tensor:
    """A ``(len(seeds), *shape)`` tensor of N(0, 1) (or U(0, 1)) draws, item i from its own seed.

    One seed per matrix makes a matrix's random numbers independent of how matrices are
    batched: a layer decomposed alone (streaming) or in a batch (in memory) sees the same draws.
    Drawn on the CPU so results do not depend on the device.
    """
    draw = torch.randn if normal else torch.rand
    out = [draw(shape, generator=torch.Generator().manual_seed(s), dtype=like.dtype) for s in seeds]
    return torch.stack(out).to(like.device)


def _orthonormal_step(Y: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """QR of ``Y (L, d, b)`` after removing its components along the orthonormal rows of ``basis (L, c, d)``.

    Classical Gram-Schmidt applied twice ("CGS2"), which keeps the basis orthonormal to working
    precision; returns ``(Q (L, d, b), R (L, b, b))``.
    """
    if basis.shape[-2]:
        for _ in range(2):
            Y = torch.baddbmm(Y, basis.mT, basis @ Y, alpha=-1)
    return torch.linalg.qr(Y)


def pass_dtype(W: Tensor) -> torch.dtype:
    """The dtype of the Krylov passes over W: bfloat16 where the CPU has native bf16 matmuls.

    The passes only have to find a subspace; a bf16 copy halves the memory traffic of these
    memory-bound skinny matmuls (about 2x faster) and leaves the subspace as good as float32's
    (measured on SmolLM2: identical residual errors). The final projection is in W's dtype.
    """
    if W.device.type == "cpu" and W.dtype == torch.float32 and torch.backends.mkldnn.is_available():
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return torch.bfloat16
    return W.dtype


def krylov_svd(
    W: Tensor, k: int, *, seeds: Sequence[int], niter: int = NITER, oversample: int = OVERSAMPLE
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k triplets of ``W (L, m, n)`` by randomized block Golub-Kahan-Lanczos bidiagonalization.

    Written for ``m <= n`` (a tall W is transposed so the left basis lives in the smaller
    space). With block size ``b = k + oversample``, ``P_1 (n, b)`` orthonormal Gaussian (one
    seed per matrix), and ``t = niter + 1`` steps:

        Q_j R_j     = qr(W P_j)       orthogonalized against Q_1 .. Q_{j-1}
        P_{j+1} L_j = qr(W^T Q_j)     orthogonalized against P_1 .. P_j

    so that ``T = Q^T W P`` is block upper-bidiagonal (``R_j`` on the diagonal, ``L_j^T`` above
    it) and ``Q (m, t b)`` spans the Krylov space ``[W P_1, (W W^T) W P_1, ...]``. The top-b
    Ritz vectors ``Z = Q U_T[:, :b]`` of the small ``T`` (eigenvectors of ``T T^T``) span the
    dominant subspace; one last
    pass in W's own precision, ``svd(Z^T W)``, gives the triplets (Rayleigh-Ritz).
    Cost: ``2 t - 1`` skinny passes over W (in :func:`pass_dtype`) plus one in W's dtype. If
    ``t b >= min(m, n)`` the exact SVD is cheaper and is used instead.
    """
    m, n = W.shape[-2:]
    b, steps = k + oversample, niter + 1
    width = b * steps
    if width >= min(m, n):
        return exact_svd(W, k)
    tall = m > n
    M = W.mT if tall else W  # (L, m', n') with m' <= n'
    low = pass_dtype(M)
    Ml = M.to(low)
    batch = M.shape[:-2]
    # the bases are stored as rows (LAPACK's column-major Q transposes into them without a strided copy)
    Qt = M.new_zeros(*batch, width, M.shape[-2])
    Pt = M.new_zeros(*batch, width, M.shape[-1])
    T = M.new_zeros(*batch, width, width)
    Pt[..., :b, :] = torch.linalg.qr(seeded(seeds, (M.shape[-1], b), M)).Q.mT
    for j in range(steps):
        rows, nxt = slice(j * b, (j + 1) * b), slice((j + 1) * b, (j + 2) * b)
        Y = (Ml @ Pt[..., rows, :].mT.to(low)).to(M.dtype)
        Q, T[..., rows, rows] = _orthonormal_step(Y, Qt[..., : j * b, :])
        Qt[..., rows, :] = Q.mT
        if j < steps - 1:
            Y = (Ml.mT @ Q.to(low)).to(M.dtype)
            P, L_ = _orthonormal_step(Y, Pt[..., : (j + 1) * b, :])
            Pt[..., nxt, :] = P.mT
            T[..., rows, nxt] = L_.mT
    del Ml, Pt
    # top-b left singular vectors of T = top eigenvectors of T T^T (only a subspace is needed here)
    Zt = torch.linalg.eigh(T @ T.mT).eigenvectors[..., -b:].flip(-1).mT @ Qt  # (L, b, m') orthonormal rows
    Uz, S, Vh = torch.linalg.svd(Zt @ M, full_matrices=False)
    U, S, Vh = Zt.mT @ Uz[..., :k], S[..., :k], Vh[..., :k, :]
    return (Vh.mT, S, U.mT) if tall else (U, S, Vh)


def truncated_svd(
    W: Tensor,
    k: int,
    *,
    method: SVDMethod = "krylov",
    niter: int = NITER,
    oversample: int = OVERSAMPLE,
    seeds: Sequence[int] = (0,),
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k singular triplets of a batch ``W (L, m, n)``, computed in ``W``'s (floating) dtype.

    ``method="exact"`` is a full LAPACK SVD; ``"krylov"`` (default) is :func:`krylov_svd`.
    """
    if method == "exact":
        return exact_svd(W, k)
    if method == "krylov":
        return krylov_svd(W, k, seeds=seeds, niter=niter, oversample=oversample)
    raise ValueError(f"unknown SVD method {method!r}; use 'krylov' or 'exact'")
