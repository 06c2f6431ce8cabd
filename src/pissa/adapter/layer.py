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

Several named adapters (:mod:`pissa.adapter.named`): the layer's attributes hold the *active* adapter; the others
wait in ``slots`` (an :class:`AdapterSlot` each). The residual is the *held* adapter's ``W - initial_h`` (the first one
loaded) and stays the only dense weight; with another adapter X active the layer computes
``y = residual(x) + x initial_h^T - x initial_X^T + shape_X.forward(x)``, i.e. ``(W - initial_X) x + delta_X x``,
the initial terms as their low-rank products. ``use_initial`` (:func:`pissa.reference`) computes with the
variables' frozen initial copies instead of their values, without dropout.
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
        self.adapter_name = "default"
        """The active adapter's name (:func:`pissa.set_adapter`)."""
        self.held = "default"
        """The adapter whose initial term the residual subtracted."""
        self.use_initial = False
        """Compute with the initial copies of the variables (:func:`pissa.reference`)."""
        self.slots: nn.ModuleDict | None = None
        """The inactive named adapters (None: the layer holds one adapter)."""

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
        t = self.tensors()
        if self.use_initial:
            t, h = self.shape.at_start(t), x.to(self.dtype)
        else:
            h = self.dropout(x).to(self.dtype)
        if isinstance(self.residual, nn.Conv2d):
            kernel = self.shape.delta(t, self.scaling).reshape(self.residual.weight.shape)
            r = self.residual
            h = F.conv2d(h, kernel, None, r.stride, r.padding, r.dilation)
        else:
            h = self.shape.forward(h, t, self.scaling)
        if self.held != self.adapter_name:
            h = h + self.held_correction(x.to(self.dtype))
        return y + h.to(y.dtype)

    # --- several named adapters (pissa.adapter.named) -------------------------------------------------------

    def _held_slot(self) -> tuple[Shape, dict[str, Tensor], float]:
        """(shape, tensors, scaling) of the adapter whose initial term the residual subtracted."""
        if self.held == self.adapter_name:
            return self.shape, self.tensors(), self.scaling
        assert self.slots is not None
        slot = self.slots[self.held]
        assert isinstance(slot, AdapterSlot)
        return slot.shape, slot.tensors(), slot.scaling

    def held_correction(self, x: Tensor) -> Tensor:
        """``x initial_h^T - x initial_X^T`` (..., out): what turns the held residual into the active adapter's."""
        shape, t, s = self._held_slot()
        held = shape.initial_forward(x, t, s)
        mine = self.shape.initial_forward(x, self.tensors(), self.scaling)
        out = torch.zeros(*x.shape[:-1], self.out_features, dtype=x.dtype, device=x.device) if held is None else held
        return out if mine is None else out - mine

    def names(self) -> list[str]:
        """The names of the adapters this layer holds: the active one, then the inactive ones (a name starting with
        ``_`` is the frozen remainder of an unloaded held adapter, not an adapter)."""
        return [self.adapter_name] + [n for n in (self.slots or {}) if not n.startswith("_")]

    def stash(self) -> AdapterSlot:
        """Move the active adapter out of the layer's attributes into a new slot (returned, not yet registered)."""
        slot = AdapterSlot(self.shape, self.tensors(), self.train_parts, self.scaling, self.rank, self.dropout,
                           self.facts, self.residual_digest)
        for n in self.tensor_names:
            delattr(self, n)
        self.tensor_names = ()
        return slot

    def install(self, name: str, slot: AdapterSlot) -> None:
        """Make ``slot`` the active adapter ``name`` (its tensors become the layer's attributes)."""
        self.shape, self.train_parts, self.scaling, self.rank = slot.shape, slot.train_parts, slot.scaling, slot.rank
        self.dropout, self.facts, self.residual_digest = slot.dropout, slot.facts, slot.residual_digest
        self.tensor_names = slot.tensor_names
        for n, t in slot.tensors().items():
            delattr(slot, n)
            if isinstance(t, nn.Parameter):
                self.register_parameter(n, t)
            else:
                self.register_buffer(n, t)
        self.adapter_name = name

    def merged(self, dtype: torch.dtype | None = None) -> nn.Module:
        """A new plain layer (the residual's type, or a dense one for a quantized residual) holding
        ``W_res + delta`` and the bias (the active adapter's residual: ``+ initial_h - initial_X`` when another
        adapter's is held); this layer is left unchanged. ``dtype``: the merged weight's (default: the
        residual's); the sum is formed in the factors' dtype either way."""
        residual = dense_copy(self.residual)
        W = dense_weight(residual)
        if dtype is not None:
            W = W.to(dtype)
        if self.held != self.adapter_name:
            eye = torch.eye(self.in_features, dtype=torch.float64, device=W.device)
            W = (W.double() + self.held_correction(eye).T).to(W.dtype)
        set_dense_weight(residual, self.shape.merged(W, self.tensors(), self.scaling))
        return residual

    def extra_repr(self) -> str:
        train = "+".join(self.train_parts)
        return (f"in={self.in_features}, out={self.out_features}, shape={self.shape.name}, "
                f"{self.shape.describe(self.tensors())}, scaling={self.scaling:g}, train={train}")


class AdapterSlot(nn.Module):
    """An inactive named adapter of a :class:`PissaLinear`: its shape's tensors (variables as frozen parameters,
    the rest as buffers) and the facts the layer holds for its active adapter."""

    def __init__(self, shape: Shape, tensors: Mapping[str, Tensor], train: tuple[str, ...], scaling: float,
                 rank: int, dropout: nn.Module, facts: Mapping[str, Any], residual_digest: str) -> None:
        super().__init__()
        self.shape, self.train_parts, self.scaling, self.rank = shape, tuple(train), float(scaling), int(rank)
        self.dropout, self.facts, self.residual_digest = dropout, dict(facts), residual_digest
        self.tensor_names = tuple(tensors)
        for name, t in tensors.items():
            if name in shape.variables:
                self.register_parameter(name, t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False))
            else:
                self.register_buffer(name, t)

    def tensors(self) -> dict[str, Tensor]:
        """The shape's tensors by name (the tensors themselves)."""
        return {n: getattr(self, n) for n in self.tensor_names}
