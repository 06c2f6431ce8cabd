"""Float32 master weights for the float16 / bfloat16 trainable parameters of a run.

torch's AdamW keeps its moments in the parameter's dtype and updates it there. For a float16 parameter that
breaks Adam at its cause: ``eps = 1e-8`` is below float16's smallest subnormal (``2^-24 ≈ 6e-8``) and rounds
to 0, and the second moment ``v = (1 - b2) g^2`` underflows to 0 for any ``|g| < ~8e-3``, so the step
``m / (sqrt(v) + eps)`` divides by zero: inf, then NaN, in the first steps (tests/unit/optim/test_masters.py
shows it). Even where it stays finite, an update below half a unit in the last place of the weight (``lr``
5e-5 on a weight of 0.5 in float16, whose spacing there is 2.4e-4) rounds away, so a small learning rate
trains nothing; bfloat16 (8 significant bits) loses more. A larger ``eps`` would change Adam itself.

The fix, mixed precision's usual one: each low-precision trainable ``p`` gets a float32 copy ``m`` (the master)
that the optimizer holds instead of ``p`` (same position in its groups, so ``state_dict`` indices do not
move); :func:`move_grads` hands ``p.grad`` to ``m.grad`` in float32 (the training step calls it after
backward, before unscaling and clipping, so the gradient scaler and the clipping see float32 gradients;
a pre-step hook does it for a plain ``optimizer.step()``); after each step ``p`` is set to ``m`` rounded to
its dtype. The moments, the update and the accumulated weight are float32, and ``p`` is the nearest float16
to the float32 run's weight up to the rounding of the forward pass. The masters travel in ``state_dict()``
(key ``master`` of their state), so a resumed run continues from the exact float32 weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

LOW_PRECISION = (torch.float16, torch.bfloat16)
"""Parameter dtypes that train through a float32 master."""

MASTER = "master"
"""The key of a master's float32 weight in its ``state_dict()["state"][i]``."""


def with_masters(params: list[nn.Parameter]) -> tuple[list[Tensor], list[tuple[nn.Parameter, Tensor]]]:
    """``params`` with each :data:`LOW_PRECISION` one replaced by its float32 master (a detached leaf copy, same
    order), and the ``(param, master)`` pairs."""
    pairs = [(p, p.detach().float()) for p in params if p.dtype in LOW_PRECISION]
    master = {id(p): m for p, m in pairs}
    return [master.get(id(p), p) for p in params], pairs


def move_grads(optimizer: torch.optim.Optimizer) -> None:
    """Each low-precision parameter's gradient moved to its master in float32 (the parameter's set to None); a
    no-op for an optimizer without masters and for gradients already moved."""
    for p, m in getattr(optimizer, "pissa_masters", ()):
        if p.grad is not None:
            g = p.grad.float()
            m.grad = g if m.grad is None else m.grad + g
            p.grad = None


def attach_masters(optimizer: torch.optim.Optimizer, pairs: list[tuple[nn.Parameter, Tensor]]) -> torch.optim.Optimizer:
    """``optimizer`` (built over :func:`with_masters`'s list) made to keep ``pairs`` in step (module docstring)."""
    if not pairs:
        return optimizer
    optimizer.pissa_masters = pairs  # type: ignore[attr-defined]
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}

    def before(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        move_grads(opt)

    @torch.no_grad()
    def after(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for p, m in pairs:
            p.copy_(m)

    def save(opt: torch.optim.Optimizer, sd: dict[str, Any]) -> dict[str, Any]:
        state = dict(sd["state"])  # its values are the live state's dicts: copied, not changed
        for _, m in pairs:
            state[index[id(m)]] = {**state.get(index[id(m)], {}), MASTER: m.detach().clone()}
        return {**sd, "state": state}

    def load(opt: torch.optim.Optimizer) -> None:
        after(opt, (), {})

    def unpack(opt: torch.optim.Optimizer, sd: dict[str, Any]) -> dict[str, Any]:
        state = {k: dict(v) for k, v in sd["state"].items()}
        with torch.no_grad():
            for _, m in pairs:
                saved = state.get(index[id(m)], {}).pop(MASTER, None)
                if saved is not None:
                    m.copy_(saved)
        return {**sd, "state": {k: v for k, v in state.items() if v}}

    optimizer.register_step_pre_hook(before)
    optimizer.register_step_post_hook(after)
    optimizer.register_state_dict_post_hook(save)
    optimizer.register_load_state_dict_pre_hook(unpack)
    optimizer.register_load_state_dict_post_hook(load)
    return optimizer


def master_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of ``optimizer``'s float32 masters (0 without)."""
    return sum(m.numel() * m.element_size() for _, m in getattr(optimizer, "pissa_masters", ()))
