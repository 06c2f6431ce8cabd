"""QPiSSA: the frozen residual in 4-bit NF4, the iterative refinement, and the paper's error metric.

NF4 (Dettmers et al., 2023, QLoRA) splits a matrix into blocks of 64 consecutive weights
(row-major), scales each block by its absolute maximum and rounds it to the nearest of 16
normal-quantile levels. Storage: two 4-bit codes per byte plus one float32 absmax per block,
0.5625 bytes per weight. bitsandbytes does the rounding, on the CPU as on GPUs. ``nf4(X)``
below is the round trip ``dequantize(quantize(X))``.

QPiSSA (PiSSA paper, Algorithm 1) keeps the principal part ``B A`` in full precision and
quantizes only the residual. It is LoftQ's alternation started from PiSSA's factors instead of
from 0, and like LoftQ it ends on the SVD step (optimal for the last Q):

    B_0 A_0 = best rank-r approximation of W                           (PiSSA)
    t = 1 .. T:  Q_t = nf4(W - B_{t-1} A_{t-1});  B_t A_t = best rank-r approximation of W - Q_t
    stored:      Q_T = nf4(W - Br Ar) with the residual factors (Ar, Br) = (A_{T-1}, B_{T-1}),
                 and the trainable initial factors (A, B) = (A_T, B_T)

LoftQ (Li et al., 2023), the baseline, quantizes W itself first and then alternates:

    Q = nf4(W);  repeat T times: B A = best rank-r of W - Q, then (except the last time) Q = nf4(W - B A)
    stored:      Q, B, A

Both are measured on their final pair ``(Q_T, B_T A_T)``.

The paper's metric, with ``||.||_*`` the nuclear norm (QLoRA, ``Q = nf4(W)`` and ``B A = 0``, scores 0):

    ratio = (1 - ||W - (Q + B A)||_* / ||W - nf4(W)||_*) * 100
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .decompose import Decomposition, Factors, InitOptions, init_structured, pissa_init, residual_of
from .errors import PissaError
from .fingerprint import weight_digest
from .layer import is_conv1d
from .svd import BLOCK, SVDMethod

if TYPE_CHECKING:
    from .config import AdapterConfig

BLOCKSIZE = 64
"""Weights per NF4 block (one float32 absmax each), as QLoRA and bitsandbytes' Linear4bit."""

QUANT_TYPES = ("nf4",)

REFINED_METHODS = ("pissa",)
"""Methods whose factors the QPiSSA iterations refine; other methods (LoRA: QLoRA) only get the residual quantized."""

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def require_bnb():
    """``bitsandbytes.functional``, or a PissaError saying how to install it."""
    # bitsandbytes warns at import that its optional fused CPU 4-bit matmul (package `kernels`) is
    # missing; NF4Linear dequantizes and calls torch's matmul instead, so the warning is noise here
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError:
        raise PissaError("quantize='nf4' needs bitsandbytes; run: pip install 'bitsandbytes>=0.45' (or pip install 'pissa[quant]')") from None
    return bnb_functional


def check_quantizable(cfg: "AdapterConfig") -> None:
    """Raise PissaError unless ``cfg.quantize`` names a supported type and bitsandbytes is importable."""
    if cfg.quantize not in QUANT_TYPES:
        raise PissaError(f"unsupported quantize={cfg.quantize!r}; use one of: {', '.join(QUANT_TYPES)}")
    require_bnb()


# ---------------------------------------------------------------- NF4 through bitsandbytes


def nf4_quantize(X: Tensor) -> tuple[Tensor, Tensor]:
    """Quantize ``X`` (any shape, blocks of 64 over its row-major elements) to NF4.

    Returns ``codes`` (uint8 ``(ceil(numel / 2), 1)``, bitsandbytes' packing) and ``absmax``
    (float32 ``(ceil(numel / 64),)``). float16/bfloat16 inputs are widened to float32 exactly;
    float64 is rounded to float32 first. Deterministic: equal inputs give equal bytes.
    """
    codes, state = require_bnb().quantize_4bit(X.detach().reshape(-1).float(), blocksize=BLOCKSIZE, quant_type="nf4")
    return codes, state.absmax


def nf4_dequantize(codes: Tensor, absmax: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """The NF4 values ``code_level * absmax`` as a ``shape`` tensor of ``dtype``.

    Dequantizes the flat vector: bitsandbytes 0.50's CPU kernel misplaces the block scales of a
    2-D shape whose last dimension is not a multiple of 64 (e.g. (64, 96)); the flat layout is
    the same data and is always right.
    """
    bnb = require_bnb()
    numel = torch.Size(shape).numel()
    kernel_dtype = dtype if dtype in KERNEL_DTYPES else torch.float32
    state = bnb.QuantState(absmax=absmax, shape=torch.Size([numel]), dtype=kernel_dtype, blocksize=BLOCKSIZE, quant_type="nf4")
    return bnb.dequantize_4bit(codes, state).view(shape).to(dtype)


def nf4(X: Tensor) -> Tensor:
    """``dequantize(quantize(X))`` of each matrix of ``X (..., m, n)``, in X's dtype.

    Each matrix is quantized on its own (blocks never straddle two matrices); when ``m n`` is a
    multiple of 64 the whole batch is one bitsandbytes call, which gives the same blocks.
    """
    m, n = X.shape[-2:]
    if X.dim() == 2 or (m * n) % BLOCKSIZE == 0:
        return nf4_dequantize(*nf4_quantize(X), tuple(X.shape), X.dtype)
    return torch.stack([nf4(x) for x in X.reshape(-1, m, n)]).view(X.shape)


# ---------------------------------------------------------------- the 4-bit residual layer


class _NF4MatMul(torch.autograd.Function):
    """``x @ dq(W)^T`` that dequantizes W again in backward instead of keeping it for autograd."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: "NF4Linear") -> Tensor:  # type: ignore[override]
        ctx.layer = layer
        return F.linear(x, layer.dequantized(x.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ ctx.layer.dequantized(grad.dtype), None


class NF4Linear(nn.Module):
    """A frozen linear layer ``y = x dq(W)^T + b`` whose ``W (out, in)`` is stored in 4-bit NF4.

    Buffers ``codes`` (uint8, two codes per byte) and ``absmax`` (float32, one per 64 weights):
    0.5625 bytes per weight instead of 2 (bf16) or 4 (fp32). W is dequantized on the fly in
    forward and again in backward, so autograd keeps no dense copy. Works on the CPU (bitsandbytes
    >= 0.45) and on GPUs; inputs of another dtype than the original weight's are computed in the
    input's dtype. ``conv1d`` remembers a Hugging Face Conv1D base (for :meth:`to_dense`);
    ``source_digest`` is the :func:`~pissa.fingerprint.weight_digest` of the dense residual in the
    base layer's native layout, i.e. of what a residual checkpoint on disk holds.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None, conv1d: bool = False) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight_dtype = weight.dtype
        self.conv1d = conv1d
        self.source_digest = weight_digest(weight.T if conv1d else weight)
        codes, absmax = nf4_quantize(weight)
        self.register_buffer("codes", codes)
        self.register_buffer("absmax", absmax)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def weight(self) -> Tensor:
        """The packed 4-bit codes (uint8), as bitsandbytes' Params4bit: the stored weight, marked as quantized."""
        return self.codes

    def dequantized(self, dtype: torch.dtype | None = None) -> Tensor:
        """``dq(W) (out, in)`` in ``dtype`` (default: the original weight's dtype)."""
        return nf4_dequantize(self.codes, self.absmax, (self.out_features, self.in_features), dtype or self.weight_dtype)

    def forward(self, x: Tensor) -> Tensor:
        y = _NF4MatMul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def to_dense(self) -> nn.Module:
        """A plain ``nn.Linear`` (or ``Conv1D``, weight (in, out)) holding ``dq(W)`` and the bias, frozen."""
        W = self.dequantized()
        if self.conv1d:
            from transformers.pytorch_utils import Conv1D

            dense: nn.Module = Conv1D(self.out_features, self.in_features)
            dense.weight = nn.Parameter(W.T.contiguous(), requires_grad=False)
        else:
            dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
            dense.weight = nn.Parameter(W, requires_grad=False)
        dense.bias = None if self.bias is None else nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return dense

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, nf4, blocksize={BLOCKSIZE}, dtype={self.weight_dtype}"


def quantize_residual(module: nn.Module, residual: Tensor, kind: str) -> nn.Module:
    """The frozen residual layer for ``module`` (Linear or Conv1D): ``residual (out, in)`` in 4-bit, ``module``'s bias."""
    if kind not in QUANT_TYPES:
        raise PissaError(f"unsupported quantize={kind!r}; use one of: {', '.join(QUANT_TYPES)}")
    bias = getattr(module, "bias", None)
    return NF4Linear(residual.detach(), bias, conv1d=is_conv1d(module)).to(residual.device)


# ---------------------------------------------------------------- QPiSSA and LoftQ


def qpissa_iterates(W: Tensor, A: Tensor, B: Tensor, opt: InitOptions) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """QPiSSA's iterates ``(Q_t, A_t, B_t)`` for t = 1, 2, ...: ``Q_t = nf4(W - B_{t-1} A_{t-1})``, then
    ``B_t A_t`` = best rank-r of ``W - Q_t``.

    ``W (L, out, in)``; ``(A, B) = (A_0, B_0)`` are PiSSA's factors. Endless: take what you need.
    """
    r = A.shape[-2]
    while True:
        Q = nf4(W - B @ A)
        A, B = pissa_init(W - Q, r, opt)
        yield Q, A, B


def loftq_iterates(W: Tensor, r: int, opt: InitOptions) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """LoftQ's iterates ``(Q, A, B)`` for t = 1, 2, ...: ``B A`` <- best rank-r of ``W - Q``, then ``Q = nf4(W - B A)``; ``Q`` starts as ``nf4(W)``."""
    Q = nf4(W)
    while True:
        A, B = pissa_init(W - Q, r, opt)
        yield Q, A, B
        Q = nf4(W - B @ A)


def refine(W: Tensor, factors: Factors, method: str, iters: int, opt: InitOptions) -> Factors:
    """The factors for a 4-bit residual: QPiSSA's iteration ``T = iters`` for PiSSA, unchanged otherwise.

    ``W (L, out, in)`` in the compute dtype, ``factors`` the method's (unscaled) init of it
    (``A_0, B_0``). Returns ``A, B = A_T, B_T`` (trainable) and the residual factors
    ``Ar, Br = A_{T-1}, B_{T-1}``: the residual is ``nf4(W - Br Ar) = Q_T``, as in :func:`qpissa_iterates`.
    """
    if method not in REFINED_METHODS:
        return factors
    A, B = factors.A, factors.B
    for _ in range(iters):
        Ar, Br = A, B
        A, B = pissa_init(W - nf4(W - Br @ Ar), A.shape[-2], opt)
    return dataclasses.replace(factors, A=A, B=B, Ar=Ar, Br=Br)


def quantized_decompose(
    weight: Tensor,
    rank: int,
    method: str,
    quantize: str,
    *,
    svd: SVDMethod = "krylov",
    niter: int | None = None,
    block: int = BLOCK,
    seed: int = 0,
    iters: int = 5,
) -> Decomposition:
    """:func:`pissa.decompose` with a 4-bit residual: ``weight ≈ residual + B @ A``, ``residual`` = dequantized NF4.

    For PiSSA the factors come from ``iters`` QPiSSA iterations (``A, B = A_T, B_T``, residual
    ``Q_T = nf4(W - B_{T-1} A_{T-1})``); other methods keep their init. The residual is exactly
    what :class:`NF4Linear` stores for this layer, in weight's dtype.
    """
    if quantize not in QUANT_TYPES:
        raise PissaError(f"unsupported quantize={quantize!r}; use one of: {', '.join(QUANT_TYPES)}")
    if iters < 1:
        raise PissaError(f"QPiSSA iterations must be >= 1, got {iters}")
    opt = InitOptions(seeds=(seed,), svd=svd, niter=niter, block=block)
    W = weight.unsqueeze(0)
    factors = init_structured(W, rank, method, opt)
    refined = refine(W.to(factors.A.dtype), factors, method, iters, opt).layer(0)
    A, B = refined.folded()
    Ar, Br, core = refined.residual_factors()
    return Decomposition(A=A, B=B, residual=nf4(residual_of(weight, Ar, Br, 1.0, core)))


# ---------------------------------------------------------------- the error metric


def nuclear_norm(E: Tensor) -> Tensor:
    """``||E||_*`` (sum of singular values) of each matrix of ``E (..., m, n)``, in float64.

    From the eigenvalues of the float64 Gram matrix of the smaller side: the same value as
    ``torch.linalg.svdvals(E.double()).sum(-1)`` to ~1e-12 relative, and 2-6x faster here.
    """
    M = E.double()
    if M.shape[-2] > M.shape[-1]:
        M = M.mT
    return torch.linalg.eigvalsh(M @ M.mT).clamp_min(0).sqrt().sum(-1)


def reduction_ratio(W: Tensor, Q: Tensor, A: Tensor, B: Tensor, qlora_error: Tensor | None = None) -> Tensor:
    """The paper's ``(1 - ||W - (Q + B A)||_* / ||W - nf4(W)||_*) * 100`` per matrix of ``W (..., out, in)``.

    ``qlora_error``: ``||W - nf4(W)||_*`` if already known.
    """
    if qlora_error is None:
        qlora_error = nuclear_norm(W - nf4(W))
    return (1 - nuclear_norm(W - Q - B @ A) / qlora_error) * 100
