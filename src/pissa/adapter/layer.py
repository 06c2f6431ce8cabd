"""The adapted linear layer: a frozen residual layer plus a trainable low-rank path.

    y = residual(x) + scaling * (dropout(x) @ A^T) @ B^T
    y = residual(x) + scaling * ((dropout(x) @ A^T) @ core^T) @ B^T     (with a core)

``residual`` is the original module (``nn.Linear``, or Hugging Face ``Conv1D`` whose weight is
stored (in, out)) with its weight replaced by ``W_res = W - scaling * B0 @ A0`` and its bias
kept. ``A (r, in)`` and ``B (out, r)`` train; ``A0``/``B0`` are the initial factors, kept as
buffers because they (with the base weights) rebuild the residual exactly and define the
update ``scaling * (B A - B0 A0)`` that ``export_peft`` writes.

Structured methods (SVFit, LoRA-XS, SORSA) add a ``core`` (``(r,)`` diagonal or ``(r, r)``)
and its initial value ``core0``; everywhere ``B`` reads ``B @ core`` (residual
``W - s B0 core0 A0``), and ``train`` says which of A, B, core are trainable.

QPiSSA adds residual factors ``Ar (r, in)``, ``Br (out, r)`` (buffers, None otherwise): its
residual is ``nf4(W - s Br Ar)``, quantized one iteration before ``A0, B0``
(:func:`pissa.methods.qpissa.refine`), and its update relative to W is ``s (B A - Br Ar)``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pissa.adapter.base_layers import dense_weight, native_weight, set_dense_weight
from pissa.adapter.quantized import NF4Linear
from pissa.methods.factors import Part, fold_core, merged_weight


class PissaLinear(nn.Module):
    """A frozen residual layer plus ``scaling * B @ [core @] A``; see the module docstring for the formula."""

    # buffers (registered in __init__) and the digest attach sets: declared for type checkers
    A0: Tensor
    B0: Tensor
    core0: Tensor | None
    Ar: Tensor | None
    Br: Tensor | None
    base_digest: str
    """:func:`~pissa.files.digests.weight_digest` of the base layer's weight (set by attach / load_adapter)."""
    residual_digest: str
    """:func:`~pissa.files.digests.weight_digest` of the residual weight (of the dense one a 4-bit residual was
    quantized from)."""
    base_dtype: torch.dtype
    """The dtype of the base weight (what the digests cover; a model loads the adapter in that dtype)."""

    def __init__(
        self,
        residual: nn.Module,
        A: Tensor,
        B: Tensor,
        scaling: float,
        dropout: float = 0.0,
        core: Tensor | None = None,
        train: tuple[Part, ...] = ("A", "B"),
        orthonormal: bool = False,
        Ar: Tensor | None = None,
        Br: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.residual = residual
        for p in self.residual.parameters():
            p.requires_grad_(False)
        # contiguous copies: SVD factors are often transposed views, and FSDP2 shards contiguous parameters only
        self.lora_A = nn.Parameter(A.clone(memory_format=torch.contiguous_format))
        self.lora_B = nn.Parameter(B.clone(memory_format=torch.contiguous_format))
        self.lora_core = None if core is None else nn.Parameter(core.clone(memory_format=torch.contiguous_format))
        self.register_buffer("A0", A.clone())
        self.register_buffer("B0", B.clone())
        self.register_buffer("core0", None if core is None else core.clone())
        self.register_buffer("Ar", None if Ar is None else Ar.clone())
        self.register_buffer("Br", None if Br is None else Br.clone())
        self.scaling = float(scaling)
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.train_parts = tuple(train)
        self.orthonormal = orthonormal

    def factor(self, part: Part) -> nn.Parameter:
        """The parameter of part "A", "B" or "core"."""
        p = {"A": self.lora_A, "B": self.lora_B, "core": self.lora_core}[part]
        assert p is not None, f"this layer has no {part!r} factor"  # only "core" can be missing
        return p

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
        return native_weight(self.residual)

    def residual_factors(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(A, B, core)`` whose scaled product the residual subtracts from W: ``(Ar, Br, None)`` or ``(A0, B0, core0)``."""
        return (self.Ar, self.Br, None) if self.Ar is not None and self.Br is not None else (self.A0, self.B0, self.core0)

    def delta(self) -> Tensor:
        """The current low-rank term ``scaling * B @ core @ A`` (out, in), in the factors' dtype."""
        return self.scaling * (fold_core(self.lora_B, self.lora_core) @ self.lora_A)

    def forward(self, x: Tensor) -> Tensor:
        y = self.residual(x)
        h = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)
        if self.lora_core is not None:
            h = h * self.lora_core if self.lora_core.dim() == 1 else F.linear(h, self.lora_core)
        h = F.linear(h, self.lora_B)
        if self.scaling != 1.0:
            h = h * self.scaling
        return y + h.to(y.dtype)

    def merged(self) -> nn.Module:
        """A new plain layer (the residual's type, or a dense one for a 4-bit residual) holding
        ``W_res + scaling * B @ A`` and the bias; this layer is left unchanged."""
        residual = self.residual.to_dense() if isinstance(self.residual, NF4Linear) else copy.deepcopy(self.residual)
        core = None if self.lora_core is None else self.lora_core.detach()
        merged = merged_weight(dense_weight(residual), self.lora_A.detach(), self.lora_B.detach(), self.scaling, core)
        set_dense_weight(residual, merged)
        return residual

    def extra_repr(self) -> str:
        core = "" if self.lora_core is None else f", core={tuple(self.lora_core.shape)}, train={'+'.join(self.train_parts)}"
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}{core}"
