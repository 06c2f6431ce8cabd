"""Pure decompositions W -> factors: one function per method, one record per method, one registry.

Every method maps a batch of weights ``W (L, out, in)`` (float32 or float64) to factors
``A (L, r, in)`` and ``B (L, out, r)`` (or a :class:`~pissa.methods.factors.Factors` with a core);
its random draws for matrix i come from ``opt.seeds[i]`` (so a layer gets the same factors alone
or batched). The frozen residual is always ``W - B @ [core @] A``
(:func:`~pissa.methods.factors.residual_of`), so the adapted model starts exactly where the base was.

Data-aware methods also read calibration statistics of the same layers (:class:`Stats`:
``X^T X / n`` of the layer inputs and their mean, or the mean loss gradient w.r.t. W), handed in
``opt.stats``; they are still pure functions of ``(W, r, stats)``.

Adding a method is one function here, one :class:`Method` record in :data:`METHODS` and its
tests; nothing else in the package names methods one by one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch import Tensor

from pissa.errors import PissaError
from pissa.methods.data_aware import corda_init, corda_kpm_init, eora_init, eva_init, lora_ga_init, lora_sb_init
from pissa.methods.factors import Factors, Init, as_factors
from pissa.methods.inits import (
    clip_svd_init,
    full_init,
    loldu_init,
    lora_init,
    lora_xs_init,
    milora_init,
    olora_init,
    pissa_init,
    sorsa_init,
    svfit_init,
)
from pissa.methods.inputs import InitOptions, Need
from pissa.methods.kronecker import soka_init
from pissa.methods.sparse import sara_init
from pissa.methods.svd import MatrixBatch, compute_dtype, stack
from pissa.methods.welore import welore_init

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


InitFn = Callable[[Tensor, int, InitOptions], "tuple[Tensor, Tensor] | Factors | Init"]
"""``init(W (L, out, in), r, opt) -> (A (L, r, in), B (L, out, r))``, :class:`~pissa.methods.factors.Factors`
(the low-rank shape) or an :class:`~pissa.methods.factors.Init` of another adapter shape."""

BatchInitFn = Callable[[MatrixBatch, int, InitOptions], "tuple[Tensor, Tensor] | Factors | Init"]
"""The init of a :attr:`Method.svd_only` method: it also takes W as any :data:`~pissa.methods.svd.MatrixBatch`."""


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
    """It reads W only through :meth:`InitOptions.top_svd`, so it accepts any :data:`~pissa.methods.svd.MatrixBatch`
    (attach hands such methods the weights unstacked; the SVD stacks them in its pass dtype)."""
    qpissa: bool = False
    """With ``quantize="nf4"`` the QPiSSA iterations refine its factors against the 4-bit residual
    (:func:`pissa.methods.qpissa.refine`); otherwise only the residual is quantized (LoRA: QLoRA)."""
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
    is ``nf4(W)`` (EoRA); see :func:`pissa.methods.qpissa.refine`."""
    allocates_ranks: bool = False
    """Its per-layer ranks come from the statistics (EVA: :func:`eva_ranks`, ``AdapterConfig.eva_rho``)."""
    full_rank: bool = False
    """Every adapted layer takes its full rank ``k = min(out, in)`` whatever ``rank`` says (:func:`method_rank`;
    ``rank_pattern`` 0 still leaves a layer out); its scaling is then ``alpha / k`` (CLIP-SVD)."""
    batched: bool = True
    """attach hands its init equal-shape weights together; False: one weight at a time (SaRA, whose threshold rule
    gives each matrix its own count of trainable entries)."""
    compressed: bool = False
    """It fine-tunes a ``pissa compress`` model's low-rank factors and nothing else (WeLore-COFT): no adapter
    (:attr:`adapter` False), the trainable weights are the compressed layers' own ``A`` and ``B``."""

    @property
    def learning_rate(self) -> float:
        """The default peak learning rate: measured, else :data:`FALLBACK_LR`."""
        return FALLBACK_LR if self.default_lr is None else self.default_lr


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        # default lrs: benchmarks/results/default_lr.md, a bracketed validation sweep at the default budget
        # (SmolLM2-135M-Instruct on Rotten Tomatoes, 150 steps of batch 8, rank 16, 3 seeds): PiSSA 2.5e-4, LoRA 5e-4.
        Method("pissa", pissa_init, svd_only=True, qpissa=True, default_lr=2.5e-4),
        Method("lora", lora_init, default_lr=5e-4, export_rank="r"),
        Method("milora", milora_init),
        Method("olora", olora_init),
        Method("svfit", svfit_init, svd_only=True, export_rank="r"),
        # clip-svd: benchmarks/results/family_clip_svd.md (q_proj,v_proj, 15 steps), validation loss 4.421 / 1.383 / 0.679
        # / 0.566 / 0.717 at 1e-3 / 1e-2 / 3e-2 / 1e-1 / 3e-1 (Adam steps on raw singular values: a large rate)
        Method("clip-svd", clip_svd_init, export_rank="r", full_rank=True, default_lr=1e-1),
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
        # sara: benchmarks/results/family_sara.md (q_proj,v_proj, 15 steps), validation loss 4.916 / 2.082 / 0.488 / 0.505
        # / 0.791 at 1e-5 / 1e-4 / 1e-3 / 3e-3 / 1e-2 (with family.py's reg_weight 0.001 on its nuclear norm)
        Method("sara", sara_init, batched=False, default_lr=1e-3),
        Method("loldu", loldu_init, export_rank="r", default_lr=5e-4),  # 3.572 / 1.174: wants more
        # soka: benchmarks/results/soka_lokr.md (rank 1, q_proj,v_proj, 15 steps of batch 4), validation loss
        # 1.541 / 0.658 / 0.717 at 1e-3 / 3e-3 / 1e-2
        Method("soka", soka_init, default_lr=3e-3),
        # benchmarks/results/convergence_full.md: validation loss 0.514 / 0.515 / 0.404 / 0.746 at 1e-5 / 3e-5 / 1e-4 / 3e-4
        Method("full", full_init, adapter=False, default_lr=1e-4),
        # welore: WeLore-COFT on a pissa compress folder (docs/methods/welore.md); benchmarks/results/family_welore.md
        # (SmolLM2 compressed at reduction 0.1, 15 steps of batch 4), validation loss 0.770 / 0.685 / 0.726 / 0.732 at
        # 1e-4 / 1e-3 / 3e-3 / 1e-2
        Method("welore", welore_init, adapter=False, compressed=True, default_lr=1e-3),
    )
}
"""The registry: name -> :class:`Method`."""

ADAPTERS: tuple[str, ...] = tuple(name for name, m in METHODS.items() if m.adapter)
"""The methods that make an adapter (every one but ``full`` and ``welore``)."""


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


def method_rank(method: str, shape: tuple[int, ...], rank: int) -> int:
    """The rank a layer whose matrix is ``shape (out, in)`` gets from ``method`` at configured ``rank``: its full
    rank ``min(out, in)`` for a :attr:`Method.full_rank` method (unless ``rank`` is 0: not adapted), else ``rank``."""
    return min(shape) if get_method(method).full_rank and rank > 0 else rank


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


def init_structured(W: MatrixBatch, rank: int, method: str, opt: InitOptions) -> Factors | Init:
    """Run the registered method on a batch of ``(out, in)`` weights: low-rank :class:`Factors`, or the
    :class:`Init` of another shape; in float32 (float64 for float64 weights). Methods that are not
    :attr:`Method.svd_only` get W stacked in that dtype."""
    m = get_method(method)
    if m.svd_only:  # its init reads W only through InitOptions.top_svd, which takes any MatrixBatch
        return _result(cast(BatchInitFn, m.init)(W, rank, opt))
    stacked = stack(W, compute_dtype(W[0].dtype))
    if opt.stats is not None:
        opt = dataclasses.replace(opt, stats=opt.stats.to(stacked.dtype, stacked.device))
    return _result(m.init(stacked, rank, opt))


def _result(result: tuple[Tensor, Tensor] | Factors | Init) -> Factors | Init:
    return result if isinstance(result, Init) else as_factors(result)
