"""Pure decompositions W -> factors: one function per method, one record per method, one registry.

Every method maps a batch of weights ``W (L, out, in)`` (float32 or float64) to factors
``A (L, r, in)`` and ``B (L, out, r)`` (or a :class:`~pissa.factors.Factors` with a core);
its random draws for matrix i come from ``opt.seeds[i]`` (so a layer gets the same factors alone
or batched). The frozen residual is always ``W - B @ [core @] A``
(:func:`~pissa.factors.residual_of`), so the adapted model starts exactly where the base was.

Data-aware methods also read calibration statistics of the same layers (:class:`Stats`:
``X^T X / n`` of the layer inputs and their mean, or the mean loss gradient w.r.t. W), handed in
``opt.stats``; they are still pure functions of ``(W, r, stats)``.

Adding a method is one function here, one :class:`Method` record in :data:`METHODS` and its
tests; nothing else in the package names methods one by one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch import Tensor

from pissa.errors import PissaError
from pissa.methods.factors import Factors, as_factors
from pissa.methods.svd import BLOCK, Batch, SVDMethod, compute_dtype, krylov_svd, seeded, stack, truncated_svd

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


Need = Literal["weight", "covariance", "gradient"]
"""What an init reads: the weight; the activation statistics (``X^T X / n`` and the mean, ``pissa
calibrate``); the mean loss gradient w.r.t. the weight (``pissa calibrate --gradients``)."""


def calibration_hint(need: Need = "covariance") -> str:
    """How to make the statistics of ``need``, in one sentence (every missing-statistics error ends with it)."""
    grad = " --gradients" if need == "gradient" else ""
    return (f"run `pissa calibrate --model MODEL --data DATA --out stats.safetensors{grad}` and pass "
            "calibration='stats.safetensors' (--calibration stats.safetensors)")


@dataclass(frozen=True)
class Stats:
    """Calibration statistics of a batch of L equal-shape layers (the third argument of a data-aware init).

    ``cov (L, in, in)``: ``X^T X / n`` over the n calibration tokens ``x (in,)`` that reached the
    layer (uncentred); ``mean (L, in)``: ``X^T 1 / n``; ``grad (L, out, in)``: the mean gradient of
    the loss w.r.t. W. A method reads only what its :attr:`Method.needs` names; the rest may be None.
    """

    cov: Tensor | None = None
    mean: Tensor | None = None
    grad: Tensor | None = None
    components: Tensor | None = None
    """``(L, k, in)``: the k leading principal directions of the inputs (rows: eigenvectors of the centred
    covariance, descending), when the reader of the statistics already computed them
    (:meth:`pissa.stats.Calibration.explained_variance`, once per distinct input); EVA then reuses them."""

    def to(self, dtype: torch.dtype, device: torch.device | None = None) -> Stats:
        conv = lambda t: None if t is None else t.to(device=device, dtype=dtype)
        return Stats(*(conv(getattr(self, f.name)) for f in dataclasses.fields(self)))

    def batched(self) -> Stats:
        """One layer's statistics (``cov (in, in)``...) as a batch of one."""
        add = lambda t: None if t is None else t.unsqueeze(0)
        return Stats(*(add(getattr(self, f.name)) for f in dataclasses.fields(self)))


def centred(cov: Tensor, mean: Tensor | None) -> Tensor:
    """The covariance of the activations about their mean, ``cov - mean mean^T`` (batched)."""
    return cov if mean is None else cov - mean.unsqueeze(-1) * mean.unsqueeze(-2)


def damped(cov: Tensor, damping: float) -> Tensor:
    """``C + damping * mean(diag C) * I`` (batched): the damped covariance CorDA and EoRA factor or invert."""
    out = cov.clone()
    out.diagonal(dim1=-2, dim2=-1).add_(damping_scale(cov, damping).unsqueeze(-1))
    return out


def damping_scale(cov: Tensor, damping: float) -> Tensor:
    """``damping * mean(diag C)`` per matrix ``(L,)``: what :func:`damped` adds to the diagonal."""
    return damping * cov.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(torch.finfo(cov.dtype).tiny)


CHUNK64_BYTES = 64 * 2**20
"""Float64 bytes of the batch :meth:`InitOptions.top_svd64` decomposes at once (its Rayleigh-Ritz copy)."""


@dataclass(frozen=True)
class InitOptions:
    """Numerical options shared by the init functions; ``seeds`` has one entry per matrix of the batch.

    ``stats``: the batch's calibration statistics (data-aware methods); ``damping``: their covariance's
    relative damping (:func:`damped`); ``first_lr``: LoRA-SB's simulated first step.
    """

    seeds: Sequence[int] = (0,)
    svd: SVDMethod = "krylov"
    niter: int | None = None
    block: int = BLOCK
    stats: Stats | None = None
    damping: float = 0.01
    first_lr: float = 5e-6

    def top_svd(self, W: Batch, r: int) -> tuple[Tensor, Tensor, Tensor]:
        """Top-r triplets ``U (L, out, r), S (L, r), Vh (L, r, in)`` of the batch W with these options."""
        return truncated_svd(W, r, method=self.svd, steps=self.niter, block=self.block, seeds=self.seeds)

    def top_svd64(self, M: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`top_svd` of a statistics-derived ``M (L, m, n)`` (a covariance, a gradient, ``W C``): for a
        Krylov SVD, float32 passes with the basis and the projected problems in float64
        (:func:`pissa.svd.krylov_svd` ``work``); the triplets in M's dtype. Such matrices have steep spectra
        (the top r hold over 99% of the energy), which bf16 passes blur and for which the float32 Krylov SVD
        falls back to a full LAPACK SVD (:data:`pissa.svd.LOW_PRECISION_TAIL`); this resolves them at a
        tenth of that cost or less. :data:`CHUNK64_BYTES` of the batch at a time."""
        if self.svd != "krylov" or M.dtype == torch.float64:
            return self.top_svd(M, r)
        per = max(1, CHUNK64_BYTES // (8 * M[0].numel()))
        parts = [krylov_svd(M[i : i + per], r, steps=self.niter, block=self.block, seeds=self.seeds[i : i + per],
                            work=torch.float64) for i in range(0, len(M), per)]
        return tuple(torch.cat([p[j] for p in parts]).to(M.dtype) for j in range(3))  # type: ignore[return-value]

    def covariance(self) -> Tensor:
        """``stats.cov (L, in, in)``, or a PissaError that says how to make it."""
        if self.stats is None or self.stats.cov is None:
            raise PissaError("this method reads activation statistics and none were given; " + calibration_hint())
        return self.stats.cov

    def gradient(self) -> Tensor:
        """``stats.grad (L, out, in)``, or a PissaError that says how to make it."""
        if self.stats is None or self.stats.grad is None:
            raise PissaError("this method reads the loss gradient and none was given; " + calibration_hint("gradient"))
        return self.stats.grad


def layer_seed(seed: int, name: str) -> int:
    """A 63-bit seed for layer ``name`` derived from the config seed (stable across runs and machines)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


InitFn = Callable[[Tensor, int, InitOptions], "tuple[Tensor, Tensor] | Factors"]
"""``init(W (L, out, in), r, opt) -> (A (L, r, in), B (L, out, r))`` or :class:`~pissa.factors.Factors`."""

BatchInitFn = Callable[[Batch, int, InitOptions], "tuple[Tensor, Tensor] | Factors"]
"""The init of a :attr:`Method.svd_only` method: it also takes W as any :data:`~pissa.svd.Batch`."""


def pissa_init(W: Batch, r: int, opt: InitOptions) -> tuple[Tensor, Tensor]:
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


def svfit_init(W: Batch, r: int, opt: InitOptions) -> Factors:
    """SVFit (Sun et al., 2024, arXiv 2409.05926): train only the top-r singular values.

    ``B = U_r``, ``core = S_r`` (diagonal, trainable: r parameters per layer), ``A = V_r^T``,
    with U_r and V_r frozen; the residual is ``W - U_r diag(S_r) V_r^T``.
    """
    U, S, Vh = opt.top_svd(W, r)
    return Factors(A=Vh, B=U, core=S, train=("core",))


def lora_xs_init(W: Batch, r: int, opt: InitOptions) -> Factors:
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


def sorsa_init(W: Batch, r: int, opt: InitOptions) -> Factors:
    """SORSA (Cao, 2024, arXiv 2409.00055): PiSSA's principal part kept as ``U_r, S_r, V_r^T``, all trainable.

    ``B = U_r``, ``core = S_r`` (diagonal), ``A = V_r^T`` (r (in + out) + r parameters per
    layer); the orthonormality regularizer ``||U_r^T U_r - I||_F + ||V_r^T V_r - I||_F`` is
    :func:`pissa.regularization` (``pissa finetune --reg-weight``).
    """
    U, S, Vh = opt.top_svd(W, r)
    return Factors(A=Vh, B=U, core=S, train=("A", "B", "core"), orthonormal=True)


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
                         "raise --damping or calibrate on more --samples")
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
                         "raise --damping or calibrate on more --samples") from None
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
    positive semi-definite matrix (float32 passes, float64 basis, :func:`pissa.svd.krylov_svd`), from
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
    weight is ``nf4(W)`` with ``quantize="nf4"`` (applied by :func:`pissa.qpissa.refine`, the record is
    :attr:`Method.compensates`) and 0 without, where ``B A`` is the activation-weighted best rank-r
    approximation of W itself and the residual ``W - B A`` starts exactly at the base."""
    return eora_fit(W, r, opt)


LORA_GA_GAMMA = 16.0
"""LoRA-GA's stable-scale hyper-parameter gamma (the paper's and PEFT's default)."""


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


def full_init(W: Batch, r: int, opt: InitOptions) -> Factors:
    """Full fine-tuning has no factors: every weight of the model trains (``pissa finetune --method full``)."""
    raise PissaError("method 'full' trains every weight and has no adapter factors; use it with pissa finetune/compare")


FALLBACK_LR = 5e-5
"""Learning rate of a method whose record has no measured one (PiSSA's: the cautious choice)."""


@dataclass(frozen=True)
class Method:
    """Everything the package knows about one initialization method."""

    name: str
    """Registry name (``AdapterConfig.method``, ``--method``)."""
    init: InitFn
    """The pure init function ``(W, r, opt) -> factors``."""
    svd_only: bool = False
    """It reads W only through :meth:`InitOptions.top_svd`, so it accepts any :data:`~pissa.svd.Batch`
    (attach hands such methods the weights unstacked; the SVD stacks them in its pass dtype)."""
    qpissa: bool = False
    """With ``quantize="nf4"`` the QPiSSA iterations refine its factors against the 4-bit residual
    (:func:`pissa.qpissa.refine`); otherwise only the residual is quantized (LoRA: QLoRA)."""
    default_lr: float | None = None
    """Best peak learning rate measured on the embedded task (None: :data:`FALLBACK_LR`)."""
    export_rank: Literal["r", "2r"] = "2r"
    """Rank of its PEFT LoRA export: ``"2r"`` for ``s [B | -B0] [A ; A0]``; ``"r"`` when ``B0 = 0``
    (the update is ``s B A``) or when A is frozen (``s (B - B0) A``)."""
    needs: tuple[Need, ...] = ("weight",)
    """What its init reads: the weight, and for data-aware methods the calibration statistics
    (``AdapterConfig.calibration``, written by ``pissa calibrate [--gradients]``)."""
    adapter: bool = True
    """False for full fine-tuning: no adapter, every weight trains (the paper's baseline; finetune and compare only)."""
    exact_start: bool = True
    """The adapted model starts exactly at the base (without ``quantize``): the residual is ``W - B A``.
    False for a method that starts elsewhere by design (LoRA-SB starts one approximated update away)."""
    compensates: bool = False
    """With ``quantize="nf4"`` its init is applied to the quantization error ``W - nf4(W)`` and the residual
    is ``nf4(W)`` (EoRA); see :func:`pissa.qpissa.refine`."""
    allocates_ranks: bool = False
    """Its per-layer ranks come from the statistics (EVA: :func:`eva_ranks`, ``AdapterConfig.eva_rho``)."""

    @property
    def learning_rate(self) -> float:
        """The default peak learning rate: measured, else :data:`FALLBACK_LR`."""
        return FALLBACK_LR if self.default_lr is None else self.default_lr


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        # default lrs: SmolLM2-135M-Instruct on Rotten Tomatoes, batch 8, cosine, seed 0. PiSSA's and LoRA's
        # come from an earlier 150-step comparison (rank 16); benchmarks/results/convergence.md's 30-step
        # validation sweep chose 5e-4 (top of its grid) and 2e-4 (README, "Benchmarks: convergence").
        Method("pissa", pissa_init, svd_only=True, qpissa=True, default_lr=5e-5),
        Method("lora", lora_init, default_lr=2e-4, export_rank="r"),
        Method("milora", milora_init),
        Method("olora", olora_init),
        Method("svfit", svfit_init, svd_only=True, export_rank="r"),
        Method("lora-xs", lora_xs_init, svd_only=True, export_rank="r"),
        Method("sorsa", sorsa_init, svd_only=True),
        # data-aware defaults: benchmarks/results/convergence_data_aware.md, validation loss after 20 steps at
        # 1e-4 / 5e-4 (a two-point grid: a choice at 5e-4 is its top, not bracketed)
        Method("corda", corda_init, needs=("weight", "covariance"), default_lr=1e-4),  # 0.387 / 0.599
        Method("corda-kpm", corda_kpm_init, needs=("weight", "covariance")),
        Method("eva", eva_init, needs=("covariance",), export_rank="r", allocates_ranks=True, default_lr=5e-4),  # 0.436 / 0.392
        Method("eora", eora_init, needs=("weight", "covariance"), compensates=True),
        Method("lora-ga", lora_ga_init, needs=("gradient",), default_lr=1e-4),  # 0.439 / 0.476
        Method("lora-sb", lora_sb_init, needs=("gradient",), export_rank="r", exact_start=False,
               default_lr=5e-4),  # 2.026 / 0.607
        Method("loldu", loldu_init, export_rank="r", default_lr=5e-4),  # 3.572 / 1.174: wants more
        # benchmarks/results/convergence_full.md: validation loss 0.514 / 0.515 / 0.404 / 0.746 at 1e-5 / 3e-5 / 1e-4 / 3e-4
        Method("full", full_init, adapter=False, default_lr=1e-4),
    )
}
"""The registry: name -> :class:`Method`."""

ADAPTERS: tuple[str, ...] = tuple(name for name, m in METHODS.items() if m.adapter)
"""The methods that make an adapter (every one but ``full``)."""


def get_method(name: str) -> Method:
    """The registered method ``name``, or a PissaError listing the choices."""
    if name not in METHODS:
        raise PissaError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


@dataclass(frozen=True)
class Decomposition:
    """``weight ≈ residual + B @ A``; A: (rank, in), B: (out, rank), residual: (out, in)."""

    A: Tensor
    B: Tensor
    residual: Tensor


def check_weight(W: Tensor, rank: int, name: str = "weight") -> None:
    """Raise PissaError unless W is a finite 2-D float matrix that admits rank ``rank``."""
    if W.dtype not in SUPPORTED_DTYPES:
        raise PissaError(
            f"{name} has dtype {W.dtype}, which cannot be decomposed; load the model in float32, bfloat16 "
            "or float16 (an already-quantized model must be loaded unquantized; use quantize='nf4' for QPiSSA)"
        )
    if W.dim() != 2:
        raise PissaError(f"{name} must be a 2-D (out, in) matrix, got shape {tuple(W.shape)}")
    limit = min(W.shape)
    if not 1 <= rank <= limit:
        raise PissaError(f"rank {rank} does not fit {name} of shape {tuple(W.shape)}; choose 1 <= rank <= {limit}")
    if not bool(torch.isfinite(W.sum())) and not bool(torch.isfinite(W).all()):  # cheap test first
        raise PissaError(f"{name} contains NaN or Inf; fix or reload the model weights before adapting")


def init_structured(W: Batch, rank: int, method: str, opt: InitOptions) -> Factors:
    """Run the registered method on a batch of ``(out, in)`` weights; its factors are in float32
    (float64 for float64 weights). Methods that are not :attr:`Method.svd_only` get W stacked in that dtype."""
    m = get_method(method)
    if m.svd_only:  # its init reads W only through InitOptions.top_svd, which takes any Batch
        return as_factors(cast(BatchInitFn, m.init)(W, rank, opt))
    stacked = stack(W, compute_dtype(W[0].dtype))
    if opt.stats is not None:
        opt = dataclasses.replace(opt, stats=opt.stats.to(stacked.dtype, stacked.device))
    return as_factors(m.init(stacked, rank, opt))
