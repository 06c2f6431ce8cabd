"""DP-SGD on a client (Opacus): per-sample gradients of an adapted layer's trainable factors, Poisson sampling,
and the DP optimizer that clips each example's gradient and adds Gaussian noise.

For :class:`~pissa.adapter.layer.PissaLinear` with the low-rank shape ``y = W_res x + s B (A x)`` and the
layer's input ``x_n`` (tokens t) and output gradient ``g_n`` of example n, the per-sample gradients are

    dL_n/dB = s * sum_t g_{n,t} (A x_{n,t})^T        (out, r)
    dL_n/dA = s * sum_t (B^T g_{n,t}) x_{n,t}^T      (r, in)

(:func:`lowrank_grad_sample`, registered with Opacus for PissaLinear), so Opacus's GradSampleModule computes
them in one backward pass with its hooks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from opacus import GradSampleModule
from opacus.grad_sample import register_grad_sampler
from opacus.optimizers import DPOptimizer
from torch import Tensor, nn

from pissa.adapter.attach import adapted_layers
from pissa.adapter.layer import PissaLinear
from pissa.adapter.shapes.lowrank import CORE, FACTOR_A, FACTOR_B, LOWRANK
from pissa.errors import PissaError


@register_grad_sampler(PissaLinear)
def lowrank_grad_sample(layer: PissaLinear, activations: Sequence[Tensor], backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradients ``(n, *p.shape)`` of the layer's trainable ``lora_A`` / ``lora_B`` (formulas in the
    module docstring); ``activations[0]`` is the input ``(n, ..., in)``, ``backprops`` the output gradient
    ``(n, ..., out)``."""
    t = layer.tensors()
    x = activations[0].to(layer.dtype)
    g = backprops.to(layer.dtype)
    s = layer.scaling
    found: dict[Any, Tensor] = {}  # keyed by the parameters themselves
    A, B = t[FACTOR_A], t[FACTOR_B]
    if B.requires_grad:
        found[B] = s * torch.einsum("n...o,n...r->nor", g, x @ A.detach().T)
    if A.requires_grad:
        found[A] = s * torch.einsum("n...r,n...i->nri", g @ B.detach(), x)
    return found


def check_private(model: nn.Module) -> None:
    """A PissaError unless every adapted layer is one per-sample gradients are written for: a low-rank adapter
    (no core) on a linear layer, without dropout (its mask would differ from the one the formula assumes)."""
    for name, layer in adapted_layers(model):
        if layer.shape.name != LOWRANK or CORE in layer.tensor_names or isinstance(layer.residual, nn.Conv2d):
            raise PissaError(f"DP-SGD needs a low-rank B A adapter on linear layers; {name} is "
                             f"{layer.shape.name}: use `method` pissa or lora")
        if not isinstance(layer.dropout, nn.Identity):
            raise PissaError("DP-SGD's per-sample gradients assume no adapter dropout: set `dropout` 0")


def private(model: nn.Module) -> GradSampleModule:
    """``model`` wrapped so that each backward also leaves ``p.grad_sample`` (n, *p.shape) on its trainable
    parameters (the loss must be the mean over the batch's examples)."""
    check_private(model)
    return GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)


def dp_optimizer(optimizer: torch.optim.Optimizer, noise: float, clip: float, expected_batch: int,
                 generator: torch.Generator | None = None) -> DPOptimizer:
    """Opacus's DP-SGD step around ``optimizer``: clip each example's gradient to L2 norm ``clip``, sum, add
    ``N(0, (noise * clip)^2)`` per coordinate, divide by ``expected_batch`` (the Poisson batch's expected size)."""
    return DPOptimizer(optimizer, noise_multiplier=noise, max_grad_norm=clip, expected_batch_size=expected_batch,
                       loss_reduction="mean", generator=generator)


def poisson_batch(n: int, rate: float, generator: torch.Generator) -> list[int]:
    """Poisson sampling: each of ``0..n-1`` joins the batch independently with probability ``rate`` (may be empty)."""
    return torch.nonzero(torch.rand(n, generator=generator) < rate).flatten().tolist()


def empty_grad_samples(optimizer: DPOptimizer) -> None:
    """An empty Poisson batch: give every parameter one zero per-sample gradient, so the step adds only the
    noise (a zero gradient clips to zero; the sum over the empty batch is zero)."""
    for p in optimizer.params:
        p.grad_sample = torch.zeros((1, *p.shape), dtype=p.dtype, device=p.device)
