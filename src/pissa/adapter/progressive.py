"""A progressive step: shapes that drop trainable entries mid-run (SaRA's mask shrinks to the entries still below
their threshold) change their layers, the residuals and the optimizer's moments together, in place.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pissa.adapter.attach import adapted_layers
from pissa.adapter.base_layers import dense_weight, native_weight, set_dense_weight
from pissa.adapter.quantized import QuantizedLinear
from pissa.adapter.shapes.base import pass_dtype
from pissa.errors import PissaError
from pissa.files.digests import weight_digest


def shrink(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Apply :meth:`~pissa.adapter.shapes.Shape.shrunk` to every adapted layer whose shape has one; return the number
    of trainable entries dropped.

    Each such layer's residual is formed again, ``W - initial`` with ``W = W_res + initial`` of the old tensors
    (exact while the factor dtype holds the base's values), so the dropped entries keep their trained values
    and the output does not change. The optimizer (AdamW's state, any per-entry state of the variable's shape)
    keeps the moments of the entries that stay; its parameter groups point to the new parameters.
    """
    dropped = 0
    for name, layer in adapted_layers(model):
        if (result := layer.shape.shrunk(t := layer.tensors())) is None:
            continue
        if isinstance(layer.residual, QuantizedLinear):
            raise PissaError(f"layer {name!r} has a quantized residual, which a progressive step cannot fold entries "
                             "into; drop `quantize` or set `progressive_step` 0")
        new, keep = result
        residual = dense_weight(layer.residual)
        term = layer.initial()
        dt = pass_dtype(residual) if term is None else pass_dtype(residual, term)
        W = residual if term is None else (residual.to(dt) + term.to(dt)).to(residual.dtype)
        old = {n: getattr(layer, n) for n in layer.shape.variables if n in t}
        layer.set_tensors(new)
        set_dense_weight(layer.residual, layer.shape.residual(W, new, layer.scaling))
        layer.residual_digest = weight_digest(native_weight(layer.residual))
        for n, p in old.items():
            dropped += p.numel() - getattr(layer, n).numel()
            if optimizer is not None:
                _move_state(optimizer, p, getattr(layer, n), keep)
    return dropped


def _move_state(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter, keep: Tensor) -> None:
    """Point the optimizer at ``new`` instead of ``old``, with the entries ``keep`` of old's per-entry state."""
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    if old in optimizer.state:
        state = optimizer.state.pop(old)
        optimizer.state[new] = {k: v[keep].clone() if v.shape == old.shape else v for k, v in state.items()}
