"""The adapter-shape protocol (:class:`Shape`); see :mod:`pissa.adapter.shapes` for what a shape provides."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from pissa.methods.factors import Init

Tensors = Mapping[str, Tensor]


def pass_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32: the dtype residuals and merges are formed in."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


class Shape:
    """The protocol (see the module docstring); the defaults fit any shape whose ``delta`` is cheap to form."""

    name: ClassVar[str]
    variables: ClassVar[Mapping[str, str]]
    """Trainable-capable tensor name -> the name of its frozen initial copy."""
    required: ClassVar[tuple[str, ...]]
    """The tensors every layer of the shape has (a saved layer without one is refused)."""
    rank_axes: ClassVar[Mapping[str, int]] = {}
    """Factor variables -> the axis of the rank: the other axes index *positions*, each holding one r-vector
    (``lora_B (out, r)``: axis 1, a row per position; ``lora_A (r, in)``: axis 0, a column). Empty: the shape has
    no factors of a rank (RMM's per-position merging, :mod:`pissa.checkpoints.merge_adapters`, refuses it)."""

    def start(self, init: Init) -> dict[str, Tensor]:
        """The layer's tensors at the start: ``init.tensors`` (contiguous copies) plus the frozen copies of the variables."""
        # contiguous copies: SVD factors are often transposed views, FSDP2 shards contiguous parameters only, and a
        # residual formed from them is bit-identical to one formed from the same tensors loaded from a file
        t = {k: v.clone(memory_format=torch.contiguous_format) for k, v in init.tensors.items()}
        t.update({self.variables[k]: t[k].clone() for k in init.tensors if k in self.variables})
        return t

    def initial(self, t: Tensors, s: float) -> Tensor | None:
        """The term ``(out, in)`` that the residual subtracts from W (from frozen tensors only); None when it is zero."""
        raise NotImplementedError

    def residual(self, W: Tensor, t: Tensors, s: float) -> Tensor:
        """``W - initial`` formed in float32 (float64 if any input is) and cast to W's dtype; W itself when the
        term is zero (kept, not copied)."""
        term = self.initial(t, s)
        if term is None:
            return W
        dt = pass_dtype(W, term)
        return (W.to(dt) - term.to(dt)).to(W.dtype)

    def initial_forward(self, x: Tensor, t: Tensors, s: float) -> Tensor | None:
        """``x (..., in) @ initial^T``, ``(..., out)``; None when the initial term is zero. Several adapters on one
        base (:mod:`pissa.adapter.named`) add the held adapter's and subtract the active one's."""
        term = self.initial(t, s)
        return None if term is None else F.linear(x, term.to(x.dtype))

    def at_start(self, t: Tensors) -> dict[str, Tensor]:
        """``t`` with every variable replaced by its frozen initial copy: the tensors the layer started from
        (:func:`pissa.reference`)."""
        return {k: t[self.variables[k]] if k in self.variables and self.variables[k] in t else v for k, v in t.items()}

    def delta(self, t: Tensors, s: float) -> Tensor:
        """The current term ``(out, in)`` in the variables' dtype, differentiable in the trainable tensors."""
        raise NotImplementedError

    def forward(self, x: Tensor, t: Tensors, s: float) -> Tensor:
        """``x (..., in) @ delta^T``: the adapter path of a linear layer, ``(..., out)``."""
        return F.linear(x, self.delta(t, s))

    def merged(self, residual: Tensor, t: Tensors, s: float) -> Tensor:
        """``residual + delta`` formed in the variables' dtype, cast to residual's dtype (every merge calls this)."""
        update = self.delta({k: v.detach() for k, v in t.items()}, s)
        return update.add_(residual.to(update.dtype)).to(residual.dtype)

    def update(self, t: Tensors, s: float) -> Tensor:
        """What training changed: ``delta - initial`` (out, in), in float64 (the analyses)."""
        t = {k: v.detach() for k, v in t.items()}
        term = self.initial(t, s)
        now = self.delta(t, s).double()
        return now if term is None else now - term.double()

    def peft(self, t: Tensors, s: float, train: tuple[str, ...],
             export_rank: Literal["r", "2r"]) -> tuple[Tensor, Tensor] | None:
        """PEFT LoRA factors ``(A (k, in), B (out, k))`` with ``s * B @ A == update``, or None (no LoRA form)."""
        return None

    def pair(self, t: Tensors, s: float) -> tuple[Tensor, Tensor] | None:
        """The current term as one pair ``(A (k, in), B (out, k))``, ``B @ A == delta``; None for a shape without one."""
        return None

    def penalty(self, t: Tensors, meta: Mapping[str, Any]) -> Tensor | None:
        """A regularizer of the layer's tensors (0-d), or None when the shape has none for these facts."""
        return None

    def scaled(self, init: Init, s: float) -> Init:
        """``init`` for an update scaled by ``s``: the delta of the result times s is the delta of ``init``."""
        raise NotImplementedError

    def shrunk(self, t: Tensors) -> tuple[dict[str, Tensor], Tensor] | None:
        """The tensors after a progressive step that drops trainable entries, and ``keep`` (bool over the variable's
        old entries: which stay); None for a shape without one (see :func:`pissa.adapter.progressive.shrink`)."""
        return None

    def describe(self, t: Tensors) -> str:
        """A short description for ``repr``."""
        return ", ".join(f"{k}={tuple(v.shape)}" for k, v in t.items() if k in self.variables)
