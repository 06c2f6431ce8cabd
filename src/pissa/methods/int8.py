"""LLM.int8 for a frozen weight: 8-bit rows with the outlier columns kept in 16 bits (through bitsandbytes).

LLM.int8 (Dettmers et al., 2022, arXiv 2208.07339) quantizes a matrix row by row: row i is scaled by its
absolute maximum ``c_i`` and rounded to ``round(127 w / c_i)`` in int8 ("vector-wise"), and it splits off the
*outlier features*: the columns where some magnitude reaches a threshold are computed in 16 bits, so that a
few huge values do not stretch every row's scale. bitsandbytes' ``Linear8bitLt`` (0.45+) finds those columns in
the *activations* of each batch (threshold 6.0 on hidden states of unit scale; ``MatmulLtState.threshold``),
quantizes the weight row-wise with no threshold, and multiplies the outlier activation columns by the weight's
columns dequantized from int8 (it keeps no 16-bit weight once ``has_fp16_weights=False``). A frozen residual
has no activations to look at, so here the outliers are found in the weight itself, with the same rule in
the weight's own unit, and their 16-bit values are kept:

    outlier columns  J = { j : |W_ij| >= OUTLIER_SIGMAS * rms(W) for some i }    (rms = sqrt(mean W^2), per matrix)
    int8 part        bitsandbytes' int8_vectorwise_quant(W16, threshold): row scales c_i = max over the
                     non-outlier entries of row i, codes round(127 W_ij / c_i), zero in the columns J
    16-bit part      W16[:, J]   (W16: W rounded to float16, the dtype LLM.int8 computes in)
    int8(W)          codes * c / 127 off J, W16 on J

Storage: one int8 code per weight, one float32 scale per row, the outlier columns at 2 bytes per weight
(on SmolLM2-135M's projections 5.9% of the columns on average, at most 20.5%:
``benchmarks/results/quant_error_int8.md``). ``int8(X)`` below
is the round trip ``dequantize(quantize(X))``; the 8-bit residual layer is
:class:`pissa.adapter.quantized.Int8Linear`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pissa.errors import PissaError
from pissa.methods.nf4 import require_bnb

OUTLIER_SIGMAS = 6.0
"""A column is an outlier column when one of its entries reaches this many RMS of the matrix (LLM.int8's
6.0, a threshold on unit-scale hidden states, in the weight's own unit)."""

FLOAT16_MAX = float(torch.finfo(torch.float16).max)


def require_int8():
    """``bitsandbytes.functional`` with LLM.int8's vector-wise quantizer (bitsandbytes >= 0.45), or a PissaError."""
    bnb = require_bnb()
    if not hasattr(bnb, "int8_vectorwise_quant"):
        raise PissaError("quantize='int8' needs bitsandbytes >= 0.45 (int8_vectorwise_quant); run: pip install -U bitsandbytes")
    return bnb


def int8_quantize(X: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """LLM.int8 of one matrix ``X (out, in)`` (see the module docstring).

    Returns ``codes`` (int8 ``(out, in)``, zero in the outlier columns), ``scales`` (float32 ``(out,)``, the
    rows' absmax off the outliers), ``cols`` (int64 ``(c,)``, the outlier columns, ascending) and ``outliers``
    (float16 ``(out, c)``, X's values there). Deterministic: equal inputs give equal bytes. A PissaError when
    X does not fit float16.
    """
    bnb = require_int8()
    X = X.detach()
    if X.numel() and float(X.abs().max()) > FLOAT16_MAX:
        raise PissaError(f"a weight of magnitude {float(X.abs().max()):.3g} exceeds float16's range, which LLM.int8 "
                         "computes in; use quantize='nf4' or none for this model")
    X16 = X.to(torch.float16, copy=True)
    threshold = OUTLIER_SIGMAS * float(X.double().square().mean().sqrt()) if X.numel() else 0.0
    codes, scales, cols = bnb.int8_vectorwise_quant(X16, threshold if threshold > 0 else 0.0)
    cols = torch.empty(0, dtype=torch.int64, device=X.device) if cols is None else cols.to(torch.int64)
    codes.masked_fill_((scales == 0).unsqueeze(-1), 0)  # an all-zero (or all-outlier) row: 0 / 0, made 0
    codes[:, cols] = 0  # bitsandbytes' CPU kernel zeroes them, its CUDA kernel only the outliers themselves
    return codes, scales.float(), cols, X16[:, cols].contiguous()


def int8_dequantize(codes: Tensor, scales: Tensor, cols: Tensor, outliers: Tensor, dtype: torch.dtype) -> Tensor:
    """``codes * scales / 127`` with the outlier columns ``cols`` set to ``outliers``: ``(out, in)`` in ``dtype``."""
    W = require_int8().int8_vectorwise_dequant(codes, scales)
    W[:, cols] = outliers.float()
    return W.to(dtype)


def int8(X: Tensor) -> Tensor:
    """``dequantize(quantize(X))`` of each matrix of ``X (..., m, n)`` (each with its own scales and outliers), in X's dtype."""
    if X.dim() == 2:
        return int8_dequantize(*int8_quantize(X), X.dtype)
    m, n = X.shape[-2:]
    return torch.stack([int8(x) for x in X.reshape(-1, m, n)]).view(X.shape)
