"""The frozen quantized residual layers: ``y = x dq(W_res)^T + b`` with W_res held in NF4 (:mod:`pissa.methods.nf4`)
or in LLM.int8 (:mod:`pissa.methods.int8`); :data:`QUANTIZED_LAYERS` maps ``AdapterConfig.quantize`` to its layer.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pissa.adapter.base_layers import dense_weight, is_conv1d
from pissa.files.digests import weight_digest
from pissa.methods.int8 import int8_dequantize, int8_quantize
from pissa.methods.nf4 import BLOCKSIZE, nf4_dequantize, nf4_quantize, require_bnb
from pissa.methods.quantize import quantizer


class _DequantMatMul(torch.autograd.Function):
    """``x @ dq(W)^T`` that dequantizes W again in backward instead of keeping it for autograd."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: QuantizedLinear) -> Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantized(x.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ ctx.layer.dequantized(grad.dtype), None


class QuantizedLinear(nn.Module):
    """A frozen linear layer ``y = x dq(W)^T + b`` whose ``W (out, in)`` is stored quantized (one subclass per codec).

    W is dequantized on the fly in forward and again in backward, so autograd keeps no dense copy; inputs of
    another dtype than the original weight's are computed in the input's dtype. ``conv1d`` remembers a Hugging
    Face Conv1D base (for :meth:`to_dense`); ``source_digest`` is the :func:`~pissa.files.digests.weight_digest`
    of the dense residual in the base layer's native layout, i.e. of what a residual checkpoint on disk holds.
    """

    codes: Tensor  # a buffer of every subclass: the stored weight

    def __init__(self, weight: Tensor, bias: Tensor | None = None, conv1d: bool = False) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight_dtype = weight.dtype
        self.conv1d = conv1d
        self.source_digest = weight_digest(weight.T if conv1d else weight)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def weight(self) -> Tensor:
        """The stored codes (as bitsandbytes' quantized parameters): the weight, marked as quantized by its dtype."""
        return self.codes

    def dequantized(self, dtype: torch.dtype | None = None) -> Tensor:
        """``dq(W) (out, in)`` in ``dtype`` (default: the original weight's dtype)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        y = _DequantMatMul.apply(x, self)
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
        bias = None if self.bias is None else nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        dense.register_parameter("bias", bias)  # as ``dense.bias = bias``, which torch types for tensors and modules only
        return dense


class NF4Linear(QuantizedLinear):
    """``W (out, in)`` in 4-bit NF4: buffers ``codes`` (uint8, two codes per byte) and ``absmax`` (float32, one per
    64 weights), 0.5625 bytes per weight instead of 2 (bf16) or 4 (fp32). Works on the CPU (bitsandbytes >= 0.45)
    and on GPUs (there through bitsandbytes' 4-bit matmul)."""

    absmax: Tensor  # buffers, registered in __init__

    def __init__(self, weight: Tensor, bias: Tensor | None = None, conv1d: bool = False) -> None:
        super().__init__(weight, bias, conv1d)
        codes, absmax = nf4_quantize(weight)
        self.register_buffer("codes", codes)
        self.register_buffer("absmax", absmax)

    def dequantized(self, dtype: torch.dtype | None = None) -> Tensor:
        return nf4_dequantize(self.codes, self.absmax, (self.out_features, self.in_features), dtype or self.weight_dtype)

    def quant_state(self, dtype: torch.dtype) -> Any:
        """bitsandbytes' ``QuantState`` of the 2-D weight ``(out, in)`` for a compute ``dtype``.

        The codes were quantized from the flat row-major vector in blocks of 64, which are the same
        blocks (and bytes) bitsandbytes makes for the 2-D weight, so its 4-bit kernels read them as
        they are.
        """
        bnb = require_bnb()
        code = bnb.get_4bit_type("nf4", device=self.codes.device)
        return bnb.QuantState(absmax=self.absmax, shape=torch.Size([self.out_features, self.in_features]), code=code,
                              blocksize=BLOCKSIZE, quant_type="nf4", dtype=dtype)

    def kernel_matmul(self, x: Tensor) -> Tensor:
        """``x @ dq(W)^T`` through bitsandbytes' 4-bit matmul (the path of its ``Linear4bit``): fused
        dequantization on CUDA, autograd for the input gradient included."""
        import bitsandbytes  # its matmul_4bit; require_bnb (via quant_state) already checked the install

        return bitsandbytes.matmul_4bit(x, self.codes.t(), quant_state=self.quant_state(x.dtype))

    def forward(self, x: Tensor) -> Tensor:
        # CUDA: bitsandbytes' kernels. CPU: dequantize then matmul (bitsandbytes 0.50's CPU 4-bit matmul
        # misreads 2-D weights whose in_features is not a multiple of 64, and its fast path needs `kernels`)
        if not x.is_cuda:
            return super().forward(x)
        y = self.kernel_matmul(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, nf4, blocksize={BLOCKSIZE}, dtype={self.weight_dtype}"


class Int8Linear(QuantizedLinear):
    """``W (out, in)`` in LLM.int8 (:mod:`pissa.methods.int8`): buffers ``codes`` (int8 ``(out, in)``), ``scales``
    (float32 row absmax ``(out,)``), ``outlier_cols`` (int64 ``(c,)``) and ``outliers`` (float16 ``(out, c)``: the
    outlier columns kept in 16 bits), about 1 byte per weight. Dequantized on the fly on every device."""

    scales: Tensor  # buffers, registered in __init__
    outlier_cols: Tensor
    outliers: Tensor

    def __init__(self, weight: Tensor, bias: Tensor | None = None, conv1d: bool = False) -> None:
        super().__init__(weight, bias, conv1d)
        for name, t in zip(("codes", "scales", "outlier_cols", "outliers"), int8_quantize(weight)):
            self.register_buffer(name, t)

    def dequantized(self, dtype: torch.dtype | None = None) -> Tensor:
        return int8_dequantize(self.codes, self.scales, self.outlier_cols, self.outliers, dtype or self.weight_dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, int8, outlier columns={self.outlier_cols.numel()}, "
                f"dtype={self.weight_dtype}")


QUANTIZED_LAYERS: dict[str, type[QuantizedLinear]] = {"nf4": NF4Linear, "int8": Int8Linear}
"""``AdapterConfig.quantize`` -> its frozen residual layer."""


def is_quantized(module: nn.Module) -> bool:
    """A quantized frozen residual layer (it has no dense weight; ``to_dense`` makes one)."""
    return isinstance(module, QuantizedLinear)


def dense_copy(module: nn.Module) -> nn.Module:
    """A plain copy of a residual layer: the dense layer of a quantized one, a deep copy of any other."""
    return module.to_dense() if isinstance(module, QuantizedLinear) else copy.deepcopy(module)


def dense_shape(module: nn.Module) -> tuple[int, int]:
    """``(out, in)`` of a residual layer's weight matrix (``in * kh * kw`` for a Conv2d), quantized or not."""
    if isinstance(module, QuantizedLinear):
        return module.out_features, module.in_features
    out, inp = dense_weight(module).shape
    return int(out), int(inp)


def quantize_residual(module: nn.Module, residual: Tensor, kind: str) -> nn.Module:
    """The frozen residual layer for ``module`` (Linear or Conv1D): ``residual (out, in)`` quantized by ``kind``
    (:data:`QUANTIZED_LAYERS`), with ``module``'s bias."""
    quantizer(kind)  # a PissaError naming the choices for an unknown kind
    bias = getattr(module, "bias", None)
    return QUANTIZED_LAYERS[kind](residual.detach(), bias, conv1d=is_conv1d(module)).to(residual.device)
