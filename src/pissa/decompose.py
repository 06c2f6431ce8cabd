"""Pure decompositions W -> factors: one function per method, one record per method, one registry.

Every method maps a batch of weights ``W (L, out, in)`` (float32 or float64) to factors
``A (L, r, in)`` and ``B (L, out, r)`` (or a :class:`~pissa.factors.Factors` with a core);
its random draws for matrix i come from ``opt.seeds[i]`` (so a layer gets the same factors alone
or batched). The frozen residual is always ``W - B @ [core @] A``
(:func:`~pissa.factors.residual_of`), so the adapted model starts exactly where the base was.

Adding a method is one function here, one :class:`Method` record in :data:`METHODS` and its
tests; nothing else in the package names methods one by one.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch import Tensor

from .errors import PissaError
from .factors import Factors, as_factors
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
    needs: tuple[Literal["weight"], ...] = ("weight",)
    """What its init reads: the weight alone (data-aware methods will add statistics)."""
    adapter: bool = True
    """False for full fine-tuning: no adapter, every weight trains (the paper's baseline; finetune and compare only)."""

    @property
    def learning_rate(self) -> float:
        """The default peak learning rate: measured, else :data:`FALLBACK_LR`."""
        return FALLBACK_LR if self.default_lr is None else self.default_lr


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        # default lrs: SmolLM2-135M-Instruct on Rotten Tomatoes, rank 16, batch 8, cosine, seed 0,
        # benchmarks/results/convergence_sweep.md (PiSSA 0.422 at 5e-5 vs 0.442 at 2e-4; LoRA 1.845 vs 0.567)
        Method("pissa", pissa_init, svd_only=True, qpissa=True, default_lr=5e-5),
        Method("lora", lora_init, default_lr=2e-4, export_rank="r"),
        Method("milora", milora_init),
        Method("olora", olora_init),
        Method("svfit", svfit_init, svd_only=True, export_rank="r"),
        Method("lora-xs", lora_xs_init, svd_only=True, export_rank="r"),
        Method("sorsa", sorsa_init, svd_only=True),
        Method("full", full_init, adapter=False),
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
    return as_factors(m.init(stack(W, compute_dtype(W[0].dtype)), rank, opt))
