"""The adapted layer: a frozen residual layer plus a trainable path of some adapter shape.

    y = residual(x) + shape.forward(dropout(x), tensors, scaling)

``residual`` is the original module (``nn.Linear``, Hugging Face ``Conv1D`` whose weight is stored
(in, out), or ``nn.Conv2d`` seen as its ``(out, in * kh * kw)`` matrix) with its weight replaced by
``W_res = W - initial`` (:meth:`pissa.adapter.shapes.Shape.residual`) and its bias kept. The shape's
tensors (:mod:`pissa.adapter.shapes`) are attributes of the layer under their own names: the variables
(``lora_A``, ``lora_B``, ...) are parameters, the frozen initial copies (``A0``, ``B0``, ...) and other
frozen tensors are buffers; they (with the base weights) rebuild the residual exactly and define the
update that ``export_peft`` writes. ``train`` names the variables that are trainable.

A Conv2d residual's adapter path is the convolution with the delta reshaped to the kernel
``(out, in, kh, kw)`` (same stride, padding and dilation; one group).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pissa.adapter.base_layers import dense_weight, native_weight, set_dense_weight
from pissa.adapter.quantized import dense_copy, dense_shape
from pissa.adapter.shapes import Shape


class PissaLinear(nn.Module):
    """A frozen residual layer plus an adapter of shape ``shape``; see the module docstring for the formula."""

    base_digest: str
    """:func:`~pissa.files.digests.weight_digest` of the base layer's weight (set by attach / load_adapter)."""
    residual_digest: str
    """:func:`~pissa.files.digests.weight_digest` of the residual weight (of the dense one a quantized residual was
    made from)."""
    base_dtype: torch.dtype
    """The dtype of the base weight (what the digests cover; a model loads the adapter in that dtype)."""

    def __init__(
        self,
        residual: nn.Module,
        shape: Shape,
        tensors: Mapping[str, Tensor],
        train: tuple[str, ...],
        scaling: float,
        rank: int,
        dropout: float = 0.0,
        facts: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.residual = residual
        for p in self.residual.parameters():
            p.requires_grad_(False)
        self.shape = shape
        self.tensor_names = tuple(tensors)
        for name, t in tensors.items():
            if name in shape.variables:
                self.register_parameter(name, nn.Parameter(t, requires_grad=False))
            else:
                self.register_buffer(name, t)
        self.train_parts = tuple(train)
        self.scaling = float(scaling)
        self.rank = int(rank)
        self.facts = dict(facts or {})
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.out_features, self.in_features = dense_shape(residual)

    def tensors(self) -> dict[str, Tensor]:
        """The shape's tensors by name (the parameters and buffers themselves, not copies)."""
        return {n: getattr(self, n) for n in self.tensor_names}

    def set_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        """Replace the shape's tensors by ``tensors`` (new ones added; the variables become new parameters, those in
        ``train`` trainable): a progressive step changes their shapes (:func:`pissa.adapter.progressive.shrink`)."""
        for name, t in tensors.items():
            if name in self.shape.variables:
                self.register_parameter(name, nn.Parameter(t, requires_grad=name in self.train_parts))
            else:
                self.register_buffer(name, t)
        self.tensor_names = tuple(tensors)

    def trainable(self) -> list[nn.Parameter]:
        """The parameters that train (``train``)."""
        return [getattr(self, n) for n in self.train_parts]

    @property
    def weight(self) -> Tensor:
        """The residual's (native-layout) weight, for code that inspects ``layer.weight.dtype``/device."""
        return native_weight(self.residual)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the adapter's variables (the factor dtype)."""
        return getattr(self, next(n for n in self.tensor_names if n in self.shape.variables)).dtype

    def initial(self) -> Tensor | None:
        """The term ``(out, in)`` the residual subtracted from the base weight (None: zero)."""
        return self.shape.initial(self.tensors(), self.scaling)

    def delta(self) -> Tensor:
        """The adapter's current term ``(out, in)``, in the variables' dtype."""
        return self.shape.delta(self.tensors(), self.scaling)

    def forward(self, x: Tensor) -> Tensor:
        y = self.residual(x)
        h = self.dropout(x).to(self.dtype)
        if isinstance(self.residual, nn.Conv2d):
            kernel = self.delta().reshape(self.residual.weight.shape)
            r = self.residual
            h = F.conv2d(h, kernel, None, r.stride, r.padding, r.dilation)
        else:
            h = self.shape.forward(h, self.tensors(), self.scaling)
        return y + h.to(y.dtype)

    def merged(self) -> nn.Module:
        """A new plain layer (the residual's type, or a dense one for a quantized residual) holding
        ``W_res + delta`` and the bias; this layer is left unchanged."""
        residual = dense_copy(self.residual)
        set_dense_weight(residual, self.shape.merged(dense_weight(residual), self.tensors(), self.scaling))
        return residual

    def extra_repr(self) -> str:
        train = "+".join(self.train_parts)
        return (f"in={self.in_features}, out={self.out_features}, shape={self.shape.name}, "
                f"{self.shape.describe(self.tensors())}, scaling={self.scaling:g}, train={train}")
