"""NF4: the 4-bit codec (through bitsandbytes).

NF4 (Dettmers et al., 2023, QLoRA) splits a matrix into blocks of 64 consecutive weights
(row-major), scales each block by its absolute maximum and rounds it to the nearest of 16
normal-quantile levels. Storage: two 4-bit codes per byte plus one float32 absmax per block,
0.5625 bytes per weight. bitsandbytes does the rounding, on the CPU as on GPUs. ``nf4(X)``
below is the round trip ``dequantize(quantize(X))``. The QPiSSA iterations that choose what
to quantize live in :mod:`pissa.methods.qpissa`.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from pissa.errors import PissaError

BLOCKSIZE = 64
"""Weights per NF4 block (one float32 absmax each), as QLoRA and bitsandbytes' Linear4bit."""

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def require_bnb():
    """``bitsandbytes.functional``, or a PissaError saying how to install it."""
    # bitsandbytes warns at import that its optional fused CPU 4-bit matmul (package `kernels`) is
    # missing; the quantized residual layers dequantize and calls torch's matmul instead, so the warning is noise here
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError:
        raise PissaError(
            "quantize='nf4' or 'int8' needs bitsandbytes; run: pip install 'bitsandbytes>=0.45' (or pip install 'pissa[quant]')"
        ) from None
    return bnb_functional


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
