"""The adapted linear layer: a frozen residual layer plus a trainable low-rank path.

    y = residual(x) + scaling * (dropout(x) @ A^T) @ B^T

``residual`` is the original module (``nn.Linear``, or Hugging Face ``Conv1D`` whose weight is
stored (in, out)) with its weight replaced by ``W_res = W - scaling * B0 @ A0`` and its bias
kept. ``A (r, in)`` and ``B (out, r)`` train; ``A0``/``B0`` are the initial factors, kept as
buffers because they (with the base weights) rebuild the residual exactly and define the
update ``scaling * (B A - B0 A0)`` that ``export_peft`` writes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face ``Conv1D`` (GPT-2 style: weight (in, out), y = x W + b), recognized without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(getattr(module, "weight", None), Tensor)


def is_adaptable(module: nn.Module) -> bool:
    """Layers an adapter can wrap: ``nn.Linear`` (and subclasses) and Hugging Face ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def dense_weight(module: nn.Module) -> Tensor:
    """The (out, in) weight of a Linear or Conv1D (a view, not a copy)."""
    return module.weight.T if is_conv1d(module) else module.weight


def set_dense_weight(module: nn.Module, W: Tensor) -> None:
    """Store an (out, in) matrix as the module's frozen weight in its native layout."""
    data = W.T.contiguous() if is_conv1d(module) else W.contiguous()
    module.weight = nn.Parameter(data, requires_grad=False)


class PissaLinear(nn.Module):
    """A frozen residual layer plus ``scaling * B @ A``; see the module docstring for the formula."""

    def __init__(self, residual: nn.Module, A: Tensor, B: Tensor, scaling: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.residual = residual
        for p in self.residual.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.Parameter(A.clone())
        self.lora_B = nn.Parameter(B.clone())
        self.register_buffer("A0", A.clone())
        self.register_buffer("B0", B.clone())
        self.scaling = float(scaling)
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[0]

    @property
    def weight(self) -> Tensor:
        """The residual's (native-layout) weight, for code that inspects ``layer.weight.dtype``/device."""
        return self.residual.weight

    def delta(self) -> Tensor:
        """The current low-rank term ``scaling * B @ A`` (out, in), in the factors' dtype."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: Tensor) -> Tensor:
        y = self.residual(x)
        h = F.linear(F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B)
        if self.scaling != 1.0:
            h = h * self.scaling
        return y + h.to(y.dtype)

    def merged(self) -> nn.Module:
        """The residual module with ``W_res + scaling * B @ A`` folded into its weight (a plain layer again)."""
        W = dense_weight(self.residual)
        merged = (W.to(self.lora_A.dtype) + self.delta().detach()).to(W.dtype)
        set_dense_weight(self.residual, merged)
        return self.residual

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}"
