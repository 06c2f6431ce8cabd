"""Adapter shapes: the tensors an adapted layer holds and how they make its update of ``W (out, in)``.

Every adapted layer is ``W_res + delta`` where ``delta`` is a function of the shape's tensors and
``W_res = W - initial`` subtracts what ``delta`` is at the start (so the model starts where the base was).
A :class:`Shape` is stateless: its functions take the layer's tensors ``t`` by name (a mapping) and the
scaling ``s = alpha / rank``. Everything that handles adapters (the layer, save / load, merge, the
streamed merge and ``pissa init``, the sharded loader, the PEFT export, the analyses) goes through these
functions and names no shape; a new shape is one module in this package (a :class:`~pissa.adapter.shapes.base.Shape`
subclass) and one entry in :data:`SHAPES`.

What a shape provides:

- ``rank_axes``: its factor variables and the axis of the rank in each (merging per position);
- ``variables``: its tensors that can train (``nn.Parameter`` in the layer), each with the name of its
  frozen initial copy (a buffer); every other tensor of ``t`` is a frozen buffer (an index, a residual factor);
- :meth:`Shape.start`: the layer's tensors from a method's initial tensors (adds the frozen copies);
- :meth:`Shape.initial` / :meth:`Shape.residual`: the term the residual subtracts, and ``W - initial``;
- :meth:`Shape.delta` / :meth:`Shape.forward`: the current term and its product with an input;
- :meth:`Shape.merged`: ``W_res + delta`` (every merge);
- :meth:`Shape.peft`: its update as PEFT LoRA factors, or None when it has no LoRA form;
- :meth:`Shape.pair`: its current term as one factor pair, or None (``pissa.decompose``);
- :meth:`Shape.update`: what training changed, ``delta - initial`` (the analyses);
- :meth:`Shape.penalty`: a regularizer of its tensors (or None);
- :meth:`Shape.scaled`: a method's initial tensors for a given scaling (``s * delta == unscaled``).

All tensor files store a layer's tensors as ``{layer}.{name}``; a layer's "layers" entry records its
shape, its trainable names, its rank and the shape's facts (:attr:`pissa.methods.factors.Init.meta`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pissa.adapter.shapes.base import Shape, Tensors
from pissa.adapter.shapes.kronecker import Kronecker
from pissa.adapter.shapes.lowrank import LowRank
from pissa.adapter.shapes.sparse import Sparse
from pissa.errors import PissaError

__all__ = ["LEGACY_TRAIN", "SHAPES", "Kronecker", "LowRank", "Shape", "Sparse", "Tensors", "get_shape", "layer_facts"]

SHAPES: dict[str, Shape] = {shape.name: shape for shape in (LowRank(), Sparse(), Kronecker())}
"""The registry of adapter shapes: name -> :class:`Shape`."""

LEGACY_TRAIN = {"A": "lora_A", "B": "lora_B", "core": "lora_core"}
"""Trainable part names of adapters written before shapes existed (their layers are all low-rank)."""


def get_shape(name: str) -> Shape:
    """The registered shape ``name``, or a PissaError naming the choices (an adapter from a newer pissa)."""
    if name not in SHAPES:
        raise PissaError(f"unknown adapter shape {name!r} (known: {', '.join(SHAPES)}); upgrade pissa to read this adapter")
    return SHAPES[name]


def layer_facts(meta: Mapping[str, Any], tensors: Tensors,
                where: str = "the adapter") -> tuple[Shape, tuple[str, ...], int, dict[str, Any]]:
    """From a saved layer's "layers" entry and its tensors: its shape, trainable names, rank and shape facts;
    a PissaError naming ``where`` when a tensor the shape needs is missing.

    Entries written before shapes existed have no ``shape`` (low-rank), train names ``A``/``B``/``core`` and no
    ``rank`` (the rows of ``A0``)."""
    shape = get_shape(meta.get("shape", "lowrank"))
    if missing := [k for k in shape.required if k not in tensors]:
        raise PissaError(f"{where} lacks {missing[0]}; re-save the adapter")
    train = tuple(LEGACY_TRAIN.get(k, k) if "shape" not in meta else k for k in meta.get("train", ("A", "B")))
    rank = int(meta["rank"]) if "rank" in meta else int(tensors["A0"].shape[0])
    facts = dict(meta.get("facts", {"orthonormal": bool(meta.get("orthonormal", False))}))
    return shape, train, rank, facts
