"""The base layers an adapter wraps: recognizing ``nn.Linear`` / Hugging Face ``Conv1D`` and
reading or writing their weight as an ``(out, in)`` matrix whatever the stored layout."""

from __future__ import annotations

from torch import Tensor, nn


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face ``Conv1D`` (GPT-2 style: weight (in, out), y = x W + b), recognized without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(getattr(module, "weight", None), Tensor)


def is_adaptable(module: nn.Module) -> bool:
    """Layers an adapter can wrap: ``nn.Linear`` (and subclasses) and Hugging Face ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def native_weight(module: nn.Module) -> Tensor:
    """The weight of a Linear or Conv1D as stored: (out, in), or (in, out) for Conv1D."""
    W = module.weight
    assert isinstance(W, Tensor), f"{type(module).__name__}.weight is not a tensor"
    return W


def dense_weight(module: nn.Module) -> Tensor:
    """The (out, in) weight of a Linear or Conv1D (a view, not a copy)."""
    W = native_weight(module)
    return W.T if is_conv1d(module) else W


def set_dense_weight(module: nn.Module, W: Tensor) -> None:
    """Store an (out, in) matrix as the module's frozen weight in its native layout."""
    data = W.T.contiguous() if is_conv1d(module) else W.contiguous()
    module.weight = nn.Parameter(data, requires_grad=False)
