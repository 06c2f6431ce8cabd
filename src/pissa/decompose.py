"""Pure decompositions W -> (A, B, residual): one function per method, one registry.

Every method maps a batch of weights ``W (L, out, in)`` (float32 or float64) to factors
``A (L, r, in)`` and ``B (L, out, r)``; its random draws for matrix i come from ``opt.seeds[i]``
(so a layer gets the same factors alone or batched). The frozen residual is always

    residual = W - B @ A

so that ``residual + B @ A == W`` and the adapted model starts exactly where the base was.
Adding a method is one function here, one line in ``METHODS`` and one test.

Structured methods (SVFit, LoRA-XS, SORSA) return a :class:`Factors` instead of ``(A, B)``:
an ``r x r`` (or diagonal) ``core`` between B and A and the list of parts that train. Their
initial product is ``B @ core @ A`` and the residual ``W - B @ core @ A`` (same formula).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
from torch import Tensor

from .errors import PissaError
from .svd import BLOCK, Batch, SVDMethod, compute_dtype, seeded, stack, truncated_svd

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class InitOptions:
    """Numerical options shared by the init functions; ``seeds`` has one entry per matrix of the batch."""

    seeds: Sequence[int] = (0,)
    svd: SVDMethod = "krylov"
    niter: int | None = None
    block: int = BLOCK

    def top_svd(self, W: Batch, r: int) -> tuple[Tensor, Tensor, Tensor]:
        """Top-r triplets ``U (L, out, r), S (L, r), Vh (L, r, in)`` of the batch W with these options."""
        return truncated_svd(W, r, method=self.svd, steps=self.niter, block=self.block, seeds=self.seeds)


def layer_seed(seed: int, name: str) -> int:
    """A 63-bit seed for layer ``name`` derived from the config seed (stable across runs and machines)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


Part = Literal["A", "B", "core"]


@dataclass(frozen=True)
class Factors:
    """An adapter's factors: the update is ``B @ core @ A`` (``B @ A`` without a core).

    Shapes (leading batch dims allowed): ``A (..., r, in)``, ``B (..., out, r)``, ``core`` None,
    ``(..., r)`` (a diagonal) or ``(..., r, r)``. ``train`` names the parts that are trainable;
    ``orthonormal`` marks factors whose columns (B) and rows (A) should stay orthonormal
    (:func:`pissa.regularization` penalizes the drift, as SORSA does). ``Ar (..., r, in)``,
    ``Br (..., out, r)``: residual factors, when the residual is ``W - Br Ar`` rather than
    ``W - B core A`` (QPiSSA, :func:`pissa.quant.refine`); None otherwise.
    """

    A: Tensor
    B: Tensor
    core: Tensor | None = None
    train: tuple[Part, ...] = ("A", "B")
    orthonormal: bool = False
    Ar: Tensor | None = None
    Br: Tensor | None = None

    def layer(self, i: int) -> "Factors":
        """Matrix ``i`` of a batch."""
        core, Ar, Br = (None if t is None else t[i] for t in (self.core, self.Ar, self.Br))
        return dataclasses.replace(self, A=self.A[i], B=self.B[i], core=core, Ar=Ar, Br=Br)

    def residual_factors(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(A, B, core)`` of the term the residual subtracts: ``(Ar, Br, None)`` if set, else ``(A, B, core)``."""
        return (self.Ar, self.Br, None) if self.Ar is not None and self.Br is not None else (self.A, self.B, self.core)

    def folded(self) -> tuple[Tensor, Tensor]:
        """``(A, B @ core)``: two factors with the same product."""
        return self.A, fold_core(self.B, self.core)

    def scaled(self, scaling: float) -> "Factors":
        """Initial factors for an update scaled by ``s``: ``s * B0 @ core0 @ A0 == B @ core @ A``.

        Without a core A and B are divided by ``sqrt(s)`` (balanced, as PiSSA's sqrt(S) split);
        with a core only the core is divided by ``s``, so orthonormal A and B stay orthonormal.
        Residual factors (no core) are divided by ``sqrt(s)``: ``s * Br0 @ Ar0 == Br @ Ar``.
        """
        root = scaling**0.5
        Ar, Br = (None if t is None else t / root for t in (self.Ar, self.Br))
        if self.core is not None:
            return dataclasses.replace(self, core=self.core / scaling, Ar=Ar, Br=Br)
        return dataclasses.replace(self, A=self.A / root, B=self.B / root, Ar=Ar, Br=Br)

    def to(self, dtype: torch.dtype) -> "Factors":
        core, Ar, Br = (None if t is None else t.to(dtype) for t in (self.core, self.Ar, self.Br))
        return dataclasses.replace(self, A=self.A.to(dtype), B=self.B.to(dtype), core=core, Ar=Ar, Br=Br)


def fold_core(B: Tensor, core: Tensor | None) -> Tensor:
    """``B @ core`` (out, r) for a full ``(r, r)`` core, ``B * core`` for a diagonal ``(r,)``, B if None."""
    if core is None:
        return B
    return B * core.unsqueeze(-2) if core.dim() == B.dim() - 1 else B @ core


def as_factors(result: "tuple[Tensor, Tensor] | Factors") -> Factors:
    """An init function's result as :class:`Factors` (a plain ``(A, B)`` pair: both train)."""
    return result if isinstance(result, Factors) else Factors(A=result[0], B=result[1])


def orthonormality(A: Tensor, B: Tensor) -> Tensor:
    """SORSA's regularizer ``||B^T B - I||_F + ||A A^T - I||_F`` for ``A (r, in)``, ``B (out, r)`` (a 0-d tensor)."""
    eye = torch.eye(A.shape[-2], dtype=A.dtype, device=A.device)
    return torch.linalg.matrix_norm(B.mT @ B - eye) + torch.linalg.matrix_norm(A @ A.mT - eye)


InitFn = Callable[[Tensor, int, InitOptions], "tuple[Tensor, Tensor] | Factors"]


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


METHODS: dict[str, InitFn] = {
    "pissa": pissa_init,
    "lora": lora_init,
    "milora": milora_init,
    "olora": olora_init,
    "svfit": svfit_init,
    "lora-xs": lora_xs_init,
    "sorsa": sorsa_init,
}


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


SVD_ONLY = frozenset({"pissa", "svfit", "lora-xs", "sorsa"})
"""Methods that read W only through :meth:`InitOptions.top_svd`: they take any :data:`~pissa.svd.Batch`."""


def init_structured(W: Batch, rank: int, method: str, opt: InitOptions) -> Factors:
    """Run the registered method on a batch of ``(out, in)`` weights; its factors are in float32
    (float64 for float64 weights). Methods other than :data:`SVD_ONLY` get W stacked in that dtype."""
    if method not in METHODS:
        raise PissaError(f"unknown method {method!r}; choose one of: {', '.join(sorted(METHODS))}")
    return as_factors(METHODS[method](W if method in SVD_ONLY else stack(W, compute_dtype(W[0].dtype)), rank, opt))


def init_factors(W: Tensor, rank: int, method: str, opt: InitOptions) -> tuple[Tensor, Tensor]:
    """Like :func:`init_structured`, with any core folded into B: ``(A (L, r, in), B (L, out, r))``, same product."""
    return init_structured(W, rank, method, opt).folded()


def decompose(
    weight: Tensor,
    rank: int,
    method: str = "pissa",
    quantize: str | None = None,
    *,
    svd: SVDMethod = "krylov",
    niter: int | None = None,
    block: int = BLOCK,
    seed: int = 0,
) -> Decomposition:
    """Split ``weight (out, in)`` into trainable ``B (out, rank)``, ``A (rank, in)`` and a frozen residual.

    The factors are float32 (float64 for a float64 weight); the residual has weight's dtype.
    ``quantize="nf4"`` quantizes the residual (QPiSSA) and returns it dequantized.
    """
    check_weight(weight, rank)
    if quantize is not None:
        from .quant import quantized_decompose

        return quantized_decompose(weight, rank, method, quantize, svd=svd, niter=niter, block=block, seed=seed)
    opt = InitOptions(seeds=(seed,), svd=svd, niter=niter, block=block)
    A, B = init_factors(weight.unsqueeze(0), rank, method, opt)
    return Decomposition(A=A[0], B=B[0], residual=residual_of(weight, A[0], B[0]))
