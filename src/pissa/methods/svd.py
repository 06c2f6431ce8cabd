"""Truncated SVD: exact, or randomized block Lanczos that is within 0.1% of exact.

All functions take a batch of L equal-shape ``(m, n)`` matrices (:data:`MatrixBatch`) and return the
top ``k`` singular triplets ``U (L, m, k)``, ``S (L, k)`` (descending), ``Vh (L, k, n)``, so
that ``U @ diag(S) @ Vh`` is (close to) the best rank-k approximation of each matrix.

Why block Krylov: the spectra of trained weight matrices decay slowly, so plain subspace
iteration (``torch.svd_lowrank``, which PEFT's ``pissa_niter_4`` calls) converges slowly: on
SmolLM2-135M at rank 16 it leaves the rank-16 residual 0.5% above optimal. A block Krylov method
keeps *every* block of the power sequence and extracts the best rank-k approximation from their
whole span, which converges much faster per matmul (Musco & Musco, NeurIPS 2015). Block Lanczos
on ``W W^T`` builds that span with two skinny passes per step, orthonormalizes only on the small
side of W, and the second pass of each step already holds the projected matrix. The passes run
in bfloat16 where the CPU has native bf16 matmuls (:func:`pass_dtype`); one last pass in full
precision, over the k Ritz vectors only, makes the factors exact within the space found.
Equal-shape matrices are processed as one batch; on the CPU a few at a time (:data:`CHUNK_BYTES`), so that each
chunk stays in the cache through all its passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, TypeAlias

import torch
from torch import Tensor

SVDMethod = Literal["krylov", "exact"]

MatrixBatch: TypeAlias = Tensor | Sequence[Tensor]
"""Equal-shape matrices: one ``(L, m, n)`` tensor, or a sequence of L ``(m, n)`` tensors (attach
hands over its weights that way, so the SVD stacks them in the dtype it needs, without a
full-precision copy of every batch)."""

CHUNK_BYTES = 4 << 20
"""On the CPU, :func:`krylov_svd` decomposes at most this many bytes of pass-dtype weights at a time (4 MiB,
two of SmolLM2's MLP matrices in bf16), so that a chunk stays in the cache through all its passes
(skinny products 3.5x faster than from memory, measured on an EPYC with 1 MiB L2 per core and 32 MiB
L3) and its pass-dtype copy reuses one buffer (a fresh weight-sized buffer per batch costs page faults:
7x the conversion itself)."""

BLOCK = 16
"""Columns per block Lanczos step. Skinny products cost about the same per pass for widths 16..32
on CPUs (packing-bound), so more steps of a narrow block buy more accuracy per second than fewer
wide ones."""

LOW_PRECISION_TAIL = 0.1
"""Matrices whose rank-k residual keeps less than this fraction of ||W||_F (top-k energy > 99%)
get the exact SVD instead of the float32 Krylov result, for two reasons. bf16 passes find the
subspace only up to their rounding (about 2^-9 ||W||_F), which adds ~``0.5 (2^-9 ||W|| / tail)^2``
to the residual ratio (measured: 1e-3 at tail = 0.036 ||W||); and ``T = Z Z^T`` squares the
spectrum, so in float32 the directions of a steep spectrum blur (measured: 1.005 x optimal with
float32 passes at tail = 0.0018 ||W||). Above the threshold the bf16 term stays under
0.5 (2^-9 / 0.1)^2 = 2e-4. SmolLM2's projections keep at least 0.49 of their norm in the tail
at rank 16 (0.17 at rank 64), so trained weights do not hit it."""


def krylov_steps(k: int) -> int:
    """Default block Lanczos steps for rank ``k``: ``max(4, 2 + ceil(k / 5))`` (6 at rank 16).

    Measured on SmolLM2-135M (all 210 projections, block 16), largest residual over the layers
    / optimal: rank 4, 4 steps: 1.00026; rank 8, 4: 1.00069; rank 16, 6: 1.00051; rank 32, 9:
    1.00069; rank 64, 15: 1.00054 (all-MiniLM-L6-v2 at ranks 4-64: <= 1.00077). One step fewer
    goes past 1.0009 (rank 4, 3 steps: 1.00091).
    """
    return max(4, 2 + -(-k // 5))


def stack(W: MatrixBatch, dtype: torch.dtype) -> Tensor:
    """``W`` as one ``(L, m, n)`` tensor of ``dtype`` (no copy if it already is one)."""
    if isinstance(W, Tensor):
        return W.to(dtype)
    first = W[0]
    return torch.stack(list(W), out=first.new_empty(len(W), *first.shape, dtype=dtype))


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


def _orthonormal_rows(Y: Tensor, basis: Tensor, max_rounds: int = 3) -> tuple[Tensor, Tensor | None, bool]:
    """Orthonormal rows ``(L, b, d)`` spanning ``Y (L, b, d)`` minus its components along the
    orthonormal rows of ``basis (L, c, d)``; with Y's coefficients ``Y basis^T (L, b, c)`` (None without a basis),
    and whether one round was enough (False: the coefficients do not describe the rows returned).

    Classical Gram-Schmidt twice ("CGS2"), then a Householder QR. That is enough while Y keeps a
    part outside the basis well above rounding. When W has lower rank than the Krylov space,
    some rows of Y lie inside the basis: their leftover is rounding noise pointing mostly along
    the basis, and the QR fills the missing directions with arbitrary ones; both come out far
    from orthogonal to the basis. So the rows are checked and, if some overlap the basis by more
    than ``1000 eps``, orthogonalized and QR-ed again (arbitrary directions always keep a large
    part outside a basis of c < d rows, so one more round fixes them).
    """
    tol = 1000 * torch.finfo(Y.dtype).eps
    coefficients, clean = None, True
    for rnd in range(max_rounds):
        if basis.shape[-2]:
            for i in range(2):
                P = Y @ basis.mT
                coefficients = P if rnd == 0 and i == 0 else coefficients
                Y = torch.baddbmm(Y, P, basis, alpha=-1)
        Y = torch.linalg.qr(Y.mT).Q.mT
        if not basis.shape[-2] or float((Y @ basis.mT).abs().amax()) <= tol:
            break
        clean = False
    return Y, coefficients, clean


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Decompositions run in float64 for float64 weights and in float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def pass_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of the Krylov passes over weights of ``dtype`` on ``device``: bfloat16 where the
    CPU has native bf16 matmuls and the compute dtype is float32, else the compute dtype.

    A bf16 copy halves the memory traffic of the skinny matmuls and runs them on bf16 dot-product
    units (about 2x faster than float32). The rounding of W (2^-9 relative) only tilts the
    subspace found, which a full-precision Rayleigh-Ritz step then uses exactly; the tilt shows
    only when the residual is a small part of W (:data:`LOW_PRECISION_TAIL`). Exactness at init
    is untouched: callers subtract ``B A`` from the original W in float32.
    """
    work = compute_dtype(dtype)
    if (
        device.type == "cpu"
        and work == torch.float32
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    ):
        return torch.bfloat16
    return work


def krylov_svd(
    W: MatrixBatch,
    k: int,
    *,
    seeds: Sequence[int],
    steps: int | None = None,
    block: int = BLOCK,
    work: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k triplets of a batch W of ``(m, n)`` matrices by randomized block Lanczos with full
    reorthogonalization (:func:`krylov_chunk`), a few matrices at a time on the CPU.

    On the CPU the batch is cut into chunks of at most :data:`CHUNK_BYTES` of pass-dtype weights, each
    converted into one reused buffer: a chunk stays in the cache through all its passes. Elsewhere (CUDA)
    the batch is one chunk. A matrix's result does not depend on its chunk (one seed per matrix).
    If ``steps * block >= min(m, n)`` the Krylov space would be all of the small side: float32 work then takes
    :func:`gram_chunk` (the Gram matrix's eigenvectors), float64 work the exact SVD.
    """
    t = krylov_steps(k) if steps is None else steps
    first = W[0]
    work = compute_dtype(first.dtype) if work is None else work
    m, n = first.shape
    gram = t * block >= min(m, n)  # the Krylov space would be the whole small side
    if gram and work == torch.float64:
        return exact_svd(stack(W, work), k)
    if gram:
        low = work
    else:
        low = pass_dtype(first.dtype, first.device) if work == compute_dtype(first.dtype) else first.dtype
    per = len(W) if first.device.type != "cpu" else max(1, CHUNK_BYTES // (m * n * low.itemsize))
    buffer: Tensor | None = None
    parts = []
    for i in range(0, len(W), per):
        part = W[i : i + per]
        if isinstance(part, Tensor) and part.dtype == low:
            Wl = part
        else:  # one copy per matrix into one buffer (torch.stack's converting path is 2x slower)
            buffer = first.new_empty(min(per, len(W)), m, n, dtype=low) if buffer is None else buffer
            Wl = buffer[: len(part)]
            for j, w in enumerate(part):
                Wl[j].copy_(w)
        if gram:
            parts.append(gram_chunk(Wl, part, k))
        else:
            parts.append(krylov_chunk(Wl, part, k, seeds=seeds[i : i + per], steps=t, block=block, work=work))
    if len(parts) == 1:
        return parts[0]
    U, S, Vh = (torch.cat(p) for p in zip(*parts))
    return U, S, Vh


def krylov_chunk(
    Wl: Tensor, W: MatrixBatch, k: int, *, seeds: Sequence[int], steps: int, block: int, work: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k triplets of the L matrices ``W`` by block Lanczos, its passes over ``Wl (L, m, n)``, W in
    the pass dtype (:func:`pass_dtype`; ``Wl`` may be W itself).

    Let ``d = min(m, n)`` be the small side, ``M (d, D)`` the orientation of W with that side
    first, ``b = block`` and ``t = steps``. From a start block
    ``Z_0 (b, D)`` (``ceil(b/2)`` Gaussian rows, one seed per matrix, and the ``floor(b/2)`` rows
    of M with the largest norms), each step takes two skinny passes over W:

        Q_j = orth(Z_{j-1} M^T)     rows orthonormal, and orthogonal to Q_1 .. Q_{j-1}
        Z_j = Q_j M

    so the rows of ``Q (t b, d)`` span the Krylov space of ``M M^T`` started at ``M Z_0^T``, and
    ``T = Z Z^T = Q M M^T Q^T`` is its projected matrix, with no further pass over W: all but its last block row
    are the Gram-Schmidt coefficients ``(Z_{j-1} M^T) Q_{<j}^T`` of the steps (a product less per step). The top-k
    eigenvectors V of T give the Ritz vectors ``X = Q^T V (d, k)``. These passes run in
    the pass dtype (bf16 on most CPUs), whose rounding would show in the factors of weights
    with fast-decaying spectra, so the Rayleigh-Ritz step is redone in full precision on the k
    Ritz vectors: ``A = X^T M (k, D)``, ``A A^T = u diag(S^2) u^T``, ``U = X u``,
    ``Vh = diag(1/S) u^T A``: ``U diag(S) Vh = X X^T M`` exactly, the best approximation of W
    from the Ritz space. Cost: ``2 t`` skinny passes over W in the pass dtype, one in the compute
    dtype, one ``t b`` eigenproblem.
    In float32, a matrix whose top k hold nearly all its energy gets the exact SVD instead
    (:data:`LOW_PRECISION_TAIL`). Results are in ``work``: with ``work=torch.float64`` for float32 W the
    passes run in float32 and the basis, ``T`` and the Rayleigh-Ritz step in float64, which resolves steep
    spectra (statistics-derived matrices: covariances, gradients) without that fallback at about half the
    cost of float64 passes.
    """
    t = steps
    tall = Wl.shape[-2] > Wl.shape[-1]
    fwd = Wl.mT if tall else Wl  # M (d, D): rows (c, d) @ fwd -> (c, D); rows (c, D) @ fwd.mT -> (c, d)
    batch, (d, D) = Wl.shape[:-2], fwd.shape[-2:]
    Q = Wl.new_empty(*batch, t * block, d, dtype=work)
    Z = Wl.new_empty(*batch, t * block, D, dtype=work)
    # start block: Gaussian rows (one seed per matrix) and the rows of M with the largest norms,
    # a warm start that saves one step on trained weights (measured on SmolLM2 and MiniLM)
    rows2 = Wl.square().sum(-2 if tall else -1)  # (L, d) squared norms of M's rows (a sum(dtype=) would copy Wl)
    energy = rows2.to(work).sum(-1)  # ||W||_F^2, to the precision of the passes
    warm = rows2.topk(block // 2, dim=-1).indices  # (L, b // 2)
    gauss = seeded(seeds, (block - block // 2, D), Q).to(Wl.dtype)
    z = torch.cat([gauss, fwd.gather(-2, warm.unsqueeze(-1).expand(*warm.shape, D))], -2)
    # T = Z Z^T from the Gram-Schmidt coefficients: step j's Y = Z_{j-1} M^T, so Y Q_{<j}^T = Z_{j-1} Z_{<j}^T is
    # T's block row j-1 left of the diagonal block's end, which is all that eigh reads (its lower triangle)
    T = Q.new_zeros(*batch, t * block, t * block)
    assembled = True
    for j in range(t):
        rows = slice(j * block, (j + 1) * block)
        Q[..., rows, :], coefficients, clean = _orthonormal_rows((z @ fwd.mT).to(work), Q[..., : j * block, :])
        assembled = assembled and clean
        if j:
            assert coefficients is not None  # a basis of j * block rows
            T[..., (j - 1) * block : j * block, : j * block] = coefficients
        z = Q[..., rows, :].to(Wl.dtype) @ fwd
        Z[..., rows, :] = z
    del fwd
    last = slice((t - 1) * block, None)
    if assembled:
        T[..., last, :] = Z[..., last, :] @ Z.mT
    else:  # a rank-deficient W took more rounds: the coefficients miss the rows that were redone
        T = Z @ Z.mT
    X = torch.linalg.eigh(T).eigenvectors[..., -k:].mT @ Q  # (L, k, d): orthonormal Ritz rows
    return _rayleigh_ritz(X, W, tall, energy, k, work)


def gram_chunk(Wf: Tensor, W: MatrixBatch, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k triplets of the L matrices ``W`` from ``Wf (L, m, n)``, W in float32, where a Krylov space would span
    the whole small side ``d = min(m, n)``: the top-k eigenvectors ``X (k, d)`` of the Gram matrix ``M M^T (d, d)``
    (one product, one ``d x d`` eigenproblem), then the float32 Rayleigh-Ritz step of :func:`krylov_chunk`.

    The Gram matrix squares the spectrum, so its float32 eigenvectors resolve directions down to about
    ``sqrt(eps) ||W||_2``; matrices whose rank-k residual is under :data:`LOW_PRECISION_TAIL` of ``||W||_F``
    (the only ones where that shows) get the exact SVD, as in :func:`krylov_chunk`. 3-4x faster than LAPACK's
    SVD on SmolLM2's ``(192, 576)`` projections at rank 64.
    """
    tall = Wf.shape[-2] > Wf.shape[-1]
    fwd = Wf.mT if tall else Wf
    G = fwd @ fwd.mT  # (L, d, d)
    energy = G.diagonal(dim1=-2, dim2=-1).sum(-1)
    X = torch.linalg.eigh(G).eigenvectors[..., -k:].mT  # (L, k, d)
    return _rayleigh_ritz(X, W, tall, energy, k, Wf.dtype)


def _rayleigh_ritz(X: Tensor, W: MatrixBatch, tall: bool, energy: Tensor, k: int,
                   work: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """The best rank-k triplets of each W from its orthonormal Ritz rows ``X (L, k, d)`` in ``work``:
    ``A = X M``, ``A A^T = u diag(S^2) u^T``, ``U = X^T u``, ``Vh = diag(1/S) u^T A`` (for a tall W the roles of U
    and Vh swap); matrices whose residual keeps under :data:`LOW_PRECISION_TAIL` of ``energy = ||W||_F^2`` take
    the exact SVD instead, unless ``work`` is float64."""
    A = _rows_times(X, W, tall)  # (L, k, D) = X M in full precision
    s2, u = torch.linalg.eigh(A @ A.mT)
    u, S = u.flip(-1), s2.flip(-1).clamp_min(0).sqrt()
    U = X.mT @ u
    Vh = (u.mT @ A) / S.clamp_min(torch.finfo(S.dtype).tiny).unsqueeze(-1)
    U, S, Vh = (Vh.mT, S, U.mT) if tall else (U, S, Vh)
    if work != torch.float64:  # steep spectra: see LOW_PRECISION_TAIL
        steep = (energy - S.square().sum(-1)).clamp_min(0) < LOW_PRECISION_TAIL**2 * energy
        if bool(steep.any()):
            idx = steep.nonzero().flatten().tolist()
            for part, exact in zip((U, S, Vh), exact_svd(stack([W[i] for i in idx], work), k)):
                part[idx] = exact
    return U, S, Vh


def _rows_times(X: Tensor, W: MatrixBatch, tall: bool) -> Tensor:
    """``X_i @ M_i`` in X's dtype for each matrix of W, ``M_i = W_i^T`` if ``tall`` else ``W_i``.

    A sequence is multiplied matrix by matrix (each converted on its own), so no full-precision
    copy of the batch is made.
    """
    if isinstance(W, Tensor):
        M = W.to(X.dtype)
        return X @ (M.mT if tall else M)
    return torch.stack([x @ (w.to(x.dtype).mT if tall else w.to(x.dtype)) for x, w in zip(X, W)])


def truncated_svd(
    W: MatrixBatch,
    k: int,
    *,
    method: SVDMethod = "krylov",
    steps: int | None = None,
    block: int = BLOCK,
    seeds: Sequence[int] = (0,),
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k singular triplets of a :data:`MatrixBatch` W, in :func:`compute_dtype` of W's dtype.

    ``method="exact"`` is a full LAPACK SVD; ``"krylov"`` (default) is :func:`krylov_svd`.
    """
    if method == "exact":
        return exact_svd(stack(W, compute_dtype(W[0].dtype)), k)
    if method == "krylov":
        return krylov_svd(W, k, seeds=seeds, steps=steps, block=block)
    raise ValueError(f"unknown SVD method {method!r}; use 'krylov' or 'exact'")
