"""The optimizer of a run: which weights are projected (:mod:`pissa.optim.projected`) and which take AdamW."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from pissa.errors import PissaError
from pissa.optim.config import OptimizerConfig
from pissa.optim.masters import attach_masters, master_bytes, with_masters
from pissa.optim.projected import ProjectedAdamW

PROJECTION = {"galore": "galore", "dct-adamw": "dct"}
"""``OptimizerConfig.optimizer`` -> the ``projection`` of :class:`ProjectedAdamW`'s projected group."""


def projected_weights(model: nn.Module, rank: int) -> list[nn.Parameter]:
    """The trainable 2-D weights of ``model``'s ``nn.Linear`` layers whose smaller side is over ``rank``, except the
    output head (``get_output_embeddings()``) and any layer tied to an embedding: the ones a projection saves on."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    chosen: dict[int, nn.Parameter] = {}
    for module in model.modules():
        w = getattr(module, "weight", None)
        if (isinstance(module, nn.Linear) and module is not head and isinstance(w, nn.Parameter) and w.requires_grad
                and w.ndim == 2 and min(w.shape) > rank and id(w) not in embedded):
            chosen[id(w)] = w
    return list(chosen.values())


def build_optimizer(model: nn.Module, opt: OptimizerConfig, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer of ``model``'s trainable parameters: torch's AdamW (``adamw``), or one :class:`ProjectedAdamW`
    whose first group holds :func:`projected_weights` (GaLore or DCT-AdamW at ``opt.proj_rank``) and whose second
    group, plain AdamW, holds the rest (embeddings, heads, 1-D tensors), so one ``state_dict`` holds everything.
    A float16 / bfloat16 parameter trains through a float32 master copy (:mod:`pissa.optim.masters`: torch's
    AdamW in float16 divides by an underflowed ``sqrt(v) + eps``).
    PissaError when a projected weight is sharded (FSDP): the projection needs whole gradients."""
    params, masters = with_masters([p for p in model.parameters() if p.requires_grad])
    if opt.optimizer == "adamw":
        return attach_masters(torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), masters)
    weights = projected_weights(model, opt.proj_rank)
    if any(_sharded(p) for p in weights):
        raise PissaError(f"`optimizer` {opt.optimizer} projects whole gradients; run it without `fsdp`")
    master = {id(p): m for p, m in masters}
    projected = [master.get(id(p), p) for p in weights]
    ids = {id(p) for p in projected}
    groups: list[dict[str, Any]] = [
        {"params": projected, "projection": PROJECTION[opt.optimizer], "rank": opt.proj_rank,
         "every": opt.proj_every, "scale": opt.proj_scale if opt.optimizer == "galore" else 1.0},
        {"params": [p for p in params if id(p) not in ids]},
    ]
    return attach_masters(ProjectedAdamW([g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay), masters)


def _sharded(p: Tensor) -> bool:
    """A DTensor (an FSDP2 shard) rather than a whole tensor."""
    return hasattr(p, "device_mesh")


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer``'s state (moments, bases, indices, step counts), and of the tensors
    held by objects in it (other optimizers keep some there: galore-torch's projector is a GaLoreProjector), and of
    the float32 masters of low-precision parameters (:mod:`pissa.optim.masters`)."""
    total = 0
    for state in optimizer.state.values():
        for v in state.values():
            held = [v] if isinstance(v, Tensor) else [t for t in getattr(v, "__dict__", {}).values() if isinstance(t, Tensor)]
            total += sum(t.numel() * t.element_size() for t in held)
    return total + master_bytes(optimizer)
