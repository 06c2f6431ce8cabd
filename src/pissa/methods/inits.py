"""Weight-only inits: one pure function per method, ``(W (L, out, in), r, opt) -> (A (L, r, in), B (L, out, r))``
or :class:`~pissa.methods.factors.Factors` (with a core, residual factors or frozen parts).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pissa.errors import PissaError
from pissa.methods.factors import Factors
from pissa.methods.inputs import InitOptions
from pissa.methods.svd import MatrixBatch, seeded


def pissa_init(W: MatrixBatch, r: int, opt: InitOptions) -> tuple[Tensor, Tensor]:
    """PiSSA (Meng et al., 2024, arXiv 2404.02948): the r principal singular triplets.

    ``W = U S V^T``; ``B = U[:, :r] sqrt(S[:r])``, ``A = sqrt(S[:r]) V[:, :r]^T``, so ``B A`` is
    the best rank-r approximation of W and the residual holds the minor components.
    """
    U, S, Vh = opt.top_svd(W, r)
    root = S.sqrt()
    return root.unsqueeze(-1) * Vh, U * root.unsqueeze(-2)


def lora_init(W: Tensor, r: int, opt: InitOptions) -> tuple[Tensor, Tensor]:
    """LoRA (Hu et al., 2021): ``A ~ U(-1/sqrt(in), 1/sqrt(in))`` (PyTorch's Kaiming-uniform
    default for a Linear), ``B = 0``; the residual is W itself."""
    L, out_f, in_f = W.shape
    bound = 1.0 / math.sqrt(in_f)
    A = (2 * bound) * seeded(opt.seeds, (r, in_f), W, normal=False) - bound
    return A, torch.zeros(L, out_f, r, dtype=W.dtype, device=W.device)


def milora_init(W: Tensor, r: int, opt: InitOptions) -> tuple[Tensor, Tensor]:
    """MiLoRA (Wang et al., 2024, arXiv 2406.09044): the r *minor* singular triplets.

    ``B = U[:, -r:] sqrt(S[-r:])``, ``A = sqrt(S[-r:]) V[:, -r:]^T`` (the last r of the
    min(out, in) triplets); the residual is the principal part. Always a full (exact) SVD:
    a randomized sketch cannot find the smallest singular values.
    """
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    root = S[..., -r:].sqrt()
    return root.unsqueeze(-1) * Vh[..., -r:, :], U[..., -r:] * root.unsqueeze(-2)


def olora_init(W: Tensor, r: int, opt: InitOptions) -> tuple[Tensor, Tensor]:
    """OLoRA (Büyükakyüz, 2024, arXiv 2406.01775): a thin QR ``W = Q R`` (Householder, LAPACK signs).

    ``B = Q[:, :r]`` (orthonormal columns), ``A = R[:r]``: ``B A`` is W projected on the span
    of its first r columns. As in PEFT's ``olora_init``; PEFT keeps ``(Q_r, R_r)`` and subtracts
    ``s Q_r R_r`` from W, while here (every method) the residual is ``W - Q_r R_r`` and attach
    stores the factors divided by sqrt(s), so the two agree exactly at scaling 1.
    """
    Q, R = torch.linalg.qr(W)
    return R[..., :r, :], Q[..., :, :r]


def svfit_init(W: MatrixBatch, r: int, opt: InitOptions) -> Factors:
    """SVFit (Sun et al., 2024, arXiv 2409.05926): train only the top-r singular values.

    ``B = U_r``, ``core = S_r`` (diagonal, trainable: r parameters per layer), ``A = V_r^T``,
    with U_r and V_r frozen; the residual is ``W - U_r diag(S_r) V_r^T``.
    """
    U, S, Vh = opt.top_svd(W, r)
    return Factors(A=Vh, B=U, core=S, train=("core",))


def clip_svd_init(W: Tensor, r: int, opt: InitOptions) -> Factors:
    """CLIP-SVD (Koleilat et al., 2025, arXiv 2509.03740): train every singular value, nothing else.

    The full SVD ``W = U diag(S) V^T`` with ``k = min(out, in)`` triplets: ``B = U (out, k)``, ``core = S (k,)``
    (diagonal, trainable: k parameters per layer), ``A = V^T (k, in)``, U and V frozen. ``r`` is that k
    (the record is :attr:`~pissa.methods.registry.Method.full_rank`); the residual ``W - U diag(S) V^T`` is
    W's rounding error only. Always LAPACK (a randomized sketch does not reach full rank).
    """
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return Factors(A=Vh[..., :r, :], B=U[..., :r], core=S[..., :r], train=("core",))


def lora_xs_init(W: MatrixBatch, r: int, opt: InitOptions) -> Factors:
    """LoRA-XS (Bałazy et al., 2024, arXiv 2405.17604): a trainable ``r x r`` core between frozen SVD factors.

    ``B = U_r S_r^{1/2}``, ``A = S_r^{1/2} V_r^T`` (frozen), ``core = 0`` (trainable: r^2
    parameters per layer), so the update ``B R A`` starts at zero and the residual is W. The
    paper puts S_r on one side (``U_r S_r``, ``V_r^T``); the balanced sqrt split follows PEFT's
    TinyLoRA and PiSSA.
    """
    U, S, Vh = opt.top_svd(W, r)
    root = S.sqrt()
    core = torch.zeros(*S.shape, r, dtype=S.dtype, device=S.device)
    return Factors(A=root.unsqueeze(-1) * Vh, B=U * root.unsqueeze(-2), core=core, train=("core",))


def sorsa_init(W: MatrixBatch, r: int, opt: InitOptions) -> Factors:
    """SORSA (Cao, 2024, arXiv 2409.00055): PiSSA's principal part kept as ``U_r, S_r, V_r^T``, all trainable.

    ``B = U_r``, ``core = S_r`` (diagonal), ``A = V_r^T`` (r (in + out) + r parameters per
    layer); the orthonormality regularizer ``||U_r^T U_r - I||_F + ||V_r^T V_r - I||_F`` is
    :func:`pissa.regularization` (``pissa finetune --reg-weight``).
    """
    U, S, Vh = opt.top_svd(W, r)
    return Factors(A=Vh, B=U, core=S, train=("A", "B", "core"), orthonormal=True)


def loldu_init(W: Tensor, r: int, opt: InitOptions) -> Factors:
    """LoLDU (Shi et al., 2024, arXiv 2410.13618): a pivoted LU, ``W = P L D U`` (L unit lower, D
    diagonal, U unit upper); ``B = P L_r``, ``core = D_r`` (the only trainable part: r parameters),
    ``A = U_r``, the first r columns / entries / rows. At full rank ``B D A = W`` exactly (for a
    nonsingular pivot sequence); the residual is ``W - P L_r D_r U_r``.
    """
    P, L, U = torch.linalg.lu(W)
    d = U.diagonal(dim1=-2, dim2=-1)
    unit = U / torch.where(d == 0, torch.ones_like(d), d).unsqueeze(-1)
    return Factors(A=unit[..., :r, :], B=P @ L[..., :r], core=d[..., :r].clone(), train=("core",))


def full_init(W: MatrixBatch, r: int, opt: InitOptions) -> Factors:
    """Full fine-tuning has no factors: every weight of the model trains (``pissa finetune --method full``)."""
    raise PissaError("method 'full' trains every weight and has no adapter factors; use it with pissa finetune/compare")
