"""The base layers an adapter wraps: recognizing ``nn.Linear``, Hugging Face ``Conv1D`` and ``nn.Conv2d``
and reading or writing their weight as an ``(out, in)`` matrix whatever the stored layout (a Conv2d kernel
``(out, in, kh, kw)`` is the matrix ``(out, in * kh * kw)``)."""

from __future__ import annotations

from torch import Tensor, nn


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face ``Conv1D`` (GPT-2 style: weight (in, out), y = x W + b), recognized without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(getattr(module, "weight", None), Tensor)


def is_adaptable(module: nn.Module) -> bool:
    """Layers an adapter can wrap: ``nn.Linear`` (and subclasses), Hugging Face ``Conv1D`` and ``nn.Conv2d`` of one
    group (a grouped or depthwise convolution has no single weight matrix)."""
    if isinstance(module, nn.Conv2d):
        return module.groups == 1
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or Hugging Face ``Conv1D``: what "all-linear" targets (never a convolution)."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def native_weight(module: nn.Module) -> Tensor:
    """The weight of a Linear, Conv1D or Conv2d as stored: (out, in), (in, out) for Conv1D, (out, in, kh, kw) for Conv2d."""
    W = module.weight
    assert isinstance(W, Tensor), f"{type(module).__name__}.weight is not a tensor"
    return W


def dense_weight(module: nn.Module) -> Tensor:
    """The (out, in) weight of a Linear or Conv1D, ``(out, in * kh * kw)`` of a Conv2d (a view, not a copy)."""
    W = native_weight(module)
    return W.T if is_conv1d(module) else W.flatten(1) if W.dim() == 4 else W


def set_dense_weight(module: nn.Module, W: Tensor) -> None:
    """Store an (out, in) matrix as the module's frozen weight in its native layout."""
    stored = native_weight(module)
    data = W.T.contiguous() if is_conv1d(module) else W.reshape(stored.shape).contiguous()
    module.weight = nn.Parameter(data, requires_grad=False)
