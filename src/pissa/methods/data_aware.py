"""Data-aware inits: pure functions of ``(W, r, stats)`` that also read calibration statistics
(:class:`~pissa.methods.inputs.Stats`): CorDA (both modes), EVA, EoRA, LoRA-GA and LoRA-SB.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pissa.errors import PissaError
from pissa.methods.factors import Factors
from pissa.methods.inputs import InitOptions, centred, damped, damping_scale
from pissa.methods.svd import krylov_svd


def corda_init(W: Tensor, r: int, opt: InitOptions) -> tuple[Tensor, Tensor]:
    """CorDA, instruction-previewed mode (Yang et al., 2024, arXiv 2406.05223): the top of W
    oriented by the activations.

    With ``C`` the damped covariance (:func:`damped` of ``X^T X / n``) and the SVD ``W C = U S V^T``,
    ``W = U S (V^T C^{-1})`` exactly; ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T C^{-1}`` (the r
    largest components, which carry the task's context; the residual keeps the rest). C = I gives
    PiSSA. Since ``U_r^T W C = S_r V_r^T``, ``A = S_r^{-1/2} U_r^T W``: no solve with C, and
    ``B A = U_r U_r^T W``, W projected on the top-r left singular vectors of ``W C``. The SVD is
    :meth:`InitOptions.top_svd64` (block Krylov in float64 by default). PEFT's CorDA also divides
    each calibration sequence by its largest entry before summing ``X^T X``; here every token weighs the same.
    """
    cov = opt.covariance()
    WC = (W @ cov).add_(W * damping_scale(cov, opt.damping)[..., None, None])  # C = cov + scale I, not formed
    U, S, _ = opt.top_svd64(WC, r)
    return _projected_factors(W, U, S)


def _projected_factors(W: Tensor, U: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:
    """``(A, B) = (S^{-1/2} U^T W, U S^{1/2})`` for the left singular vectors ``U (L, out, r)`` and values
    ``S (L, r)`` of ``W C`` (a PissaError when some are 0: the covariance is singular)."""
    if not bool((S > 0).all()):
        raise PissaError("the activation covariance is singular (too few calibration tokens for the layer's width?); "
                         "raise `damping` or calibrate on more `samples`")
    root = S.sqrt()
    return (U.mT @ W) / root.unsqueeze(-1), U * root.unsqueeze(-2)


def corda_kpm_init(W: Tensor, r: int, opt: InitOptions) -> tuple[Tensor, Tensor]:
    """CorDA, knowledge-preserved mode: the r *smallest* components of ``W C = U S V^T`` train and the
    principal ones, which the calibration data (e.g. world-knowledge QA) exercises most, stay frozen
    in the residual. ``B = U_{-r:} sqrt(S_{-r:})``, ``A = sqrt(S_{-r:}) V_{-r:}^T C^{-1}``; C = I gives
    MiLoRA. Always a full SVD (a sketch cannot find the smallest singular values)."""
    C = damped(opt.covariance(), opt.damping)
    U, S, Vh = torch.linalg.svd(W @ C, full_matrices=False)
    return _corda_factors(U[..., -r:], S[..., -r:], Vh[..., -r:, :], C)


def _corda_factors(U: Tensor, S: Tensor, Vh: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """``(A, B) = (sqrt(S) Vh C^{-1}, U sqrt(S))`` for triplets of ``W C`` (C symmetric positive definite;
    a PissaError when it is not, e.g. undamped statistics of too few tokens)."""
    root = S.sqrt()
    # Vh C^{-1} = (C^{-1} Vh^T)^T by Cholesky (C is SPD once damped; batched LU solves hit an MKL pivot error on
    # SmolLM2's 30 stacked q_proj covariances, torch 2.13 CPU)
    try:
        factor = torch.linalg.cholesky(C)
    except torch.linalg.LinAlgError:
        raise PissaError("the activation covariance is singular (too few calibration tokens for the layer's width?); "
                         "raise `damping` or calibrate on more `samples`") from None
    right = torch.cholesky_solve(Vh.mT, factor).mT
    return root.unsqueeze(-1) * right, U * root.unsqueeze(-2)


def eva_init(W: Tensor, r: int, opt: InitOptions) -> tuple[Tensor, Tensor]:
    """EVA (Paischer et al., 2024, arXiv 2410.07170): A = the top-r principal directions of the layer's
    inputs, B = 0.

    The rows of ``A (r, in)`` are the orthonormal eigenvectors of the centred covariance
    ``X^T X / n - mean mean^T`` with the r largest eigenvalues (what PEFT's incremental PCA
    converges to), from ``opt.top_svd`` of that symmetric positive semi-definite matrix (its top
    singular vectors are those eigenvectors; block Krylov by default, ``svd="exact"`` for LAPACK);
    ``B = 0`` so the residual is W. Per-layer ranks come from :func:`eva_ranks` (``AdapterConfig.eva_rho``).
    The directions are ``opt.stats.components`` when given with at least r rows (Krylov SVDs only: computed
    once per input with the explained variance, :func:`principal_directions`), else
    :meth:`InitOptions.top_svd64` of the centred covariance.
    """
    zeros = torch.zeros(W.shape[0], W.shape[1], r, dtype=W.dtype, device=W.device)
    known = opt.stats.components if opt.stats is not None else None
    if known is not None and known.shape[-2] >= r and opt.svd == "krylov":
        return known[..., :r, :].contiguous(), zeros
    cov = centred(opt.covariance(), opt.stats.mean if opt.stats is not None else None)
    U, _, _ = opt.top_svd64(cov, r)
    return U.mT.contiguous(), zeros


def explained_variance(cov: Tensor, mean: Tensor | None, k: int | None = None) -> Tensor:
    """The fractions of the inputs' variance along the ``k`` (default: all) leading principal directions,
    descending: the eigenvalues of the centred covariance divided by their sum, its trace (``(..., k)``,
    float64). A few leading ones come from a block Krylov SVD, all of them from LAPACK."""
    return principal_directions(cov, mean, k)[0]


def principal_directions(cov: Tensor, mean: Tensor | None, k: int | None = None) -> tuple[Tensor, Tensor]:
    """:func:`explained_variance` ``(..., k)`` and the directions ``(..., k, in)`` (rows: the eigenvectors of the
    centred covariance, descending, float64): EVA's A. For a few, from a block Krylov SVD of that symmetric
    positive semi-definite matrix (float32 passes, float64 basis, :func:`pissa.methods.svd.krylov_svd`), from
    LAPACK's ``eigh`` for more than half."""
    C = centred(cov.double(), None if mean is None else mean.double())
    total = C.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True).clamp_min(torch.finfo(C.dtype).tiny)
    if k is None or 2 * k >= C.shape[-1]:
        values, vectors = torch.linalg.eigh(C)
        values, vectors = values.flip(-1)[..., :k], vectors.flip(-1)[..., :k].mT
    else:
        batch = C.reshape(-1, *C.shape[-2:]).float()
        U, values, _ = krylov_svd(batch, k, seeds=[0] * len(batch), work=torch.float64)
        values, vectors = values.reshape(*C.shape[:-2], k), U.mT.reshape(*C.shape[:-2], k, C.shape[-1])
    return values.clamp_min(0) / total, vectors


def eva_ranks(ratios: dict[str, Tensor], ranks: dict[str, int], rho: float) -> dict[str, int]:
    """EVA's rank redistribution: each layer offers its ``round(rho * r_l)`` leading explained-variance
    ratios (:func:`explained_variance`), the budget ``sum_l r_l`` goes to the largest of all offered
    ones, and a layer's rank is the number of its own that were chosen (0: the layer is not adapted).
    ``rho = 1`` keeps every layer at ``r_l``. Ties break by layer order, then by component index.
    """
    budget = sum(ranks.values())
    offers = []
    for li, (name, r) in enumerate(ranks.items()):
        k = min(int(round(rho * r)), ratios[name].shape[-1])
        offers += [(-float(v), li, j, name) for j, v in enumerate(ratios[name][:k].tolist())]
    chosen = sorted(offers)[:budget]
    out = dict.fromkeys(ranks, 0)
    for _, _, _, name in chosen:
        out[name] += 1
    return out


def eora_fit(E: Tensor, r: int, opt: InitOptions) -> tuple[Tensor, Tensor]:
    """EoRA (Liu et al., 2024, arXiv 2410.21271): the rank-r ``B A`` minimising the activation-weighted
    error ``||(E - B A) L||_F``, ``L L^T = C`` the damped covariance, for an error ``E (L, out, in)``.

    ``C = Q diag(lam) Q^T``, ``L = Q diag(sqrt(lam))``; the SVD ``E L = U S V^T`` gives
    ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T L^{-1}`` with ``L^{-1} = diag(1/sqrt(lam)) Q^T``, so
    ``(E - B A) L = E L - U_r S_r V_r^T`` and the error is ``sqrt(sum_{i>r} S_i^2)``, the smallest
    possible (Eckart-Young in the eigenspace). Since ``||M L||_F^2 = tr(M C M^T)``, this is
    ``||M X^T||_F / sqrt(n)`` for the calibration inputs X when the damping is 0. (EoRA puts S on B;
    the balanced sqrt split matches PiSSA.)
    """
    lam, Q = torch.linalg.eigh(damped(opt.covariance(), opt.damping))
    root = lam.clamp_min(torch.finfo(lam.dtype).tiny * lam.amax(-1, keepdim=True)).sqrt()  # (L, in)
    U, S, Vh = opt.top_svd(E @ (Q * root.unsqueeze(-2)), r)
    s = S.sqrt()
    A = s.unsqueeze(-1) * ((Vh / root.unsqueeze(-2)) @ Q.mT)
    return A, U * s.unsqueeze(-2)


def eora_init(W: Tensor, r: int, opt: InitOptions) -> tuple[Tensor, Tensor]:
    """EoRA as an init: :func:`eora_fit` of the compression error ``W - compressed(W)``. The compressed
    weight is ``nf4(W)`` with ``quantize="nf4"`` (applied by :func:`pissa.methods.qpissa.refine`, the record is
    :attr:`Method.compensates`) and 0 without, where ``B A`` is the activation-weighted best rank-r
    approximation of W itself and the residual ``W - B A`` starts exactly at the base."""
    return eora_fit(W, r, opt)


def lora_ga_init(W: Tensor, r: int, opt: InitOptions) -> tuple[Tensor, Tensor]:
    """LoRA-GA (Wang et al., 2024, arXiv 2407.05000): factors from the SVD of the mean loss gradient G.

    ``G = U S V^T`` (top 2r); ``A = zeta V_{1..r}^T``, ``B = zeta U_{r+1..2r}`` with the stable
    scale ``zeta = out^{1/4} / sqrt(gamma)`` (gamma = :data:`LORA_GA_GAMMA`): the "ArB2r" choice,
    under which the first step of the adapter best approximates the first step of full fine-tuning.
    As in the paper (and PEFT) the frozen weight becomes ``W - B A``, so the model starts at the
    base. (PEFT 0.21 also multiplies B by ``S_{r+1..2r}`` and scales only B; the spans are the same.)
    Needs ``2 r <= min(out, in)``.
    """
    G = opt.gradient()
    if 2 * r > min(G.shape[-2:]):
        raise PissaError(f"lora-ga takes 2r = {2 * r} gradient directions, more than the {min(G.shape[-2:])} of a "
                         f"{tuple(G.shape[-2:])} layer; use rank <= {min(G.shape[-2:]) // 2}")
    U, _, Vh = opt.top_svd64(G, 2 * r)
    zeta = W.shape[-2] ** 0.25 / LORA_GA_GAMMA**0.5
    return zeta * Vh[..., :r, :], zeta * U[..., r : 2 * r]


def lora_sb_init(W: Tensor, r: int, opt: InitOptions) -> Factors:
    """LoRA-SB (Ponkshe et al., 2024, arXiv 2411.19557): LoRA-XS's frozen ``B``, ``A`` and trainable
    ``r x r`` core R, initialised from an approximation of full fine-tuning's first update.

    That update is AdamW's first step, ``dW = -eta sign(G)`` (``eta = opt.first_lr``, the first
    step's learning rate, G the mean loss gradient); with its SVD ``dW = U S V^T``:
    ``B = U_r``, ``R = diag(S_r)``, ``A = V_r^T``, the best rank-r approximation of dW. As in the
    paper the base weight is *not* offset: the residual factors are zero, so the model starts at
    ``W + B R A``, one approximated full fine-tuning step away from the base (not an exact start:
    :attr:`Method.exact_start` is False), and its update relative to W is ``B R A``.
    """
    delta = -opt.first_lr * torch.sign(opt.gradient())
    U, S, Vh = opt.top_svd(delta, r)
    core = torch.diag_embed(S)
    zeros = torch.zeros_like
    return Factors(A=Vh, B=U, core=core, train=("core",), Ar=zeros(Vh), Br=zeros(U))


LORA_GA_GAMMA = 16.0
"""LoRA-GA's stable-scale hyper-parameter gamma (the paper's and PEFT's default)."""
