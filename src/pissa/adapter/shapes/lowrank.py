"""The low-rank shape: ``delta = s * B @ [core @] A`` (PiSSA and the methods of its family that are B A)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from pissa.adapter.shapes.base import Shape, Tensors
from pissa.errors import PissaError
from pissa.methods.factors import Init, fold_core, merged_weight, orthonormality, residual_of

FACTOR_A, FACTOR_B, CORE = "lora_A", "lora_B", "lora_core"
"""The low-rank shape's trainable tensors ``A (r, in)``, ``B (out, r)`` and the optional core, by name: the
names code outside the protocol uses for B A methods (federated rounds, merging, per-sample gradients)."""
LOWRANK = "lowrank"
"""The low-rank shape's name (what an adapter folder records per layer; an old folder's layers, without one)."""


class LowRank(Shape):
    """``delta = s * B @ [core @] A`` with ``lora_A (r, in)``, ``lora_B (out, r)`` and an optional ``lora_core``
    (``(r,)`` diagonal or ``(r, r)``); initial copies ``A0``, ``B0``, ``core0``. QPiSSA's residual factors
    ``Ar (r, in)``, ``Br (out, r)`` (frozen) replace ``B0 A0`` in the residual: ``W - s Br Ar``.
    Facts: ``orthonormal`` (SORSA's penalty ``||B^T B - I||_F + ||A A^T - I||_F``)."""

    name = LOWRANK
    variables = {FACTOR_A: "A0", FACTOR_B: "B0", CORE: "core0"}
    required = (FACTOR_A, FACTOR_B, "A0", "B0")
    rank_axes = {FACTOR_A: 0, FACTOR_B: 1}

    @staticmethod
    def _initial_factors(t: Tensors) -> tuple[Tensor, Tensor, Tensor | None]:
        if "Ar" in t and "Br" in t:
            return t["Ar"], t["Br"], None
        return t["A0"], t["B0"], t.get("core0")

    def initial(self, t: Tensors, s: float) -> Tensor | None:
        A, B, core = self._initial_factors(t)
        if not bool(B.any()) or (core is not None and not bool(core.any())):
            return None
        return s * (fold_core(B, core) @ A)

    def residual(self, W: Tensor, t: Tensors, s: float) -> Tensor:
        A, B, core = self._initial_factors(t)
        # B0 = 0 (LoRA) or core0 = 0 (LoRA-XS): W - 0 is W bit for bit, so W is kept, not copied
        if not bool(B.any()) or (core is not None and not bool(core.any())):
            return W
        return residual_of(W, A, B, s, core)

    def initial_forward(self, x: Tensor, t: Tensors, s: float) -> Tensor:
        """``s (x A0^T) [core0] B0^T`` (residual factors ``Br Ar`` when present), never forming the ``(out, in)``
        term; zero for LoRA (B0 = 0), computed anyway (adding zeros is exact, and no device sync tests B0)."""
        A, B, core = self._initial_factors(t)
        h = F.linear(x, A.to(x.dtype))
        if core is not None:
            h = h * core.to(x.dtype) if core.dim() == 1 else F.linear(h, core.to(x.dtype))
        return F.linear(h, B.to(x.dtype)) * s

    def delta(self, t: Tensors, s: float) -> Tensor:
        return s * (fold_core(t["lora_B"], t.get("lora_core")) @ t["lora_A"])

    def forward(self, x: Tensor, t: Tensors, s: float) -> Tensor:
        h = F.linear(x, t["lora_A"])
        core = t.get("lora_core")
        if core is not None:
            h = h * core if core.dim() == 1 else F.linear(h, core)
        h = F.linear(h, t["lora_B"])
        return h * s if s != 1.0 else h

    def merged(self, residual: Tensor, t: Tensors, s: float) -> Tensor:
        core = t.get("lora_core")
        return merged_weight(residual, t["lora_A"].detach(), t["lora_B"].detach(), s,
                             None if core is None else core.detach())

    def peft(self, t: Tensors, s: float, train: tuple[str, ...],
             export_rank: Literal["r", "2r"]) -> tuple[Tensor, Tensor]:
        """``s (B A - B0 A0) = s [B | -B0] [A ; A0]`` (a core folded into the B side: ``[B C | -B0 C0]``).

        Rank r suffices when A is frozen, so A = A0 (SVFit, LoRA-XS: ``(B C - B0 C0) A``), or when
        ``B0 C0 = 0`` (LoRA: ``B A``); with residual factors (QPiSSA) ``Br Ar`` replaces ``B0 A0``. In float32.
        """
        core = t.get("lora_core")
        A = t["lora_A"].detach().float()
        BC = fold_core(t["lora_B"].detach().float(), None if core is None else core.detach().float())
        A0, B0, core0 = self._initial_factors(t)
        A0 = A0.float()
        BC0 = fold_core(B0.float(), None if core0 is None else core0.float())
        if export_rank == "2r":
            return torch.cat([A, A0], 0), torch.cat([BC, -BC0], 1)
        if "lora_A" not in train:
            return A, BC - BC0
        if BC0.any():
            raise PissaError("a rank-r export needs B0 = 0 or a frozen A; this layer has neither (a method record is wrong)")
        return A, BC

    def pair(self, t: Tensors, s: float) -> tuple[Tensor, Tensor]:
        root = s**0.5
        return t["lora_A"] * root, fold_core(t["lora_B"], t.get("lora_core")) * root

    def penalty(self, t: Tensors, meta: Mapping[str, Any]) -> Tensor | None:
        return orthonormality(t["lora_A"], t["lora_B"]).float() if meta.get("orthonormal") else None

    def scaled(self, init: Init, s: float) -> Init:
        """Without a core A and B are divided by ``sqrt(s)`` (balanced, as PiSSA's sqrt(S) split); with a core only
        the core is divided by ``s``, so orthonormal A and B stay orthonormal. Residual factors are divided by ``sqrt(s)``."""
        root = s**0.5
        t = dict(init.tensors)
        for k in ("Ar", "Br"):
            if k in t:
                t[k] = t[k] / root
        if "lora_core" in t:
            t["lora_core"] = t["lora_core"] / s
        else:
            t["lora_A"], t["lora_B"] = t["lora_A"] / root, t["lora_B"] / root
        return dataclasses.replace(init, tensors=t)

    def describe(self, t: Tensors) -> str:
        core = t.get("lora_core")
        return f"rank={t['lora_A'].shape[0]}" + ("" if core is None else f", core={tuple(core.shape)}")
