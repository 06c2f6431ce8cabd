"""The sparse shape: chosen entries of W train in place (SaRA, :mod:`pissa.methods.sparse`).

    delta   = scatter(sparse_values at sparse_index)                  (out, in)
    initial = scatter(values0 at sparse_index) - scatter(sparse_fixed_update at sparse_fixed_index)
    W_res   = W - initial: exact zeros on the mask, W elsewhere (and W plus the frozen updates of entries a
              progressive step took out of the mask)

``sparse_index (k,)`` holds int64 flat indices into the ``(out, in)`` matrix (``sparse_size`` ``[out, in]``),
``sparse_values (k,)`` is the one trainable tensor (frozen copy ``values0``). The scaling is not used
(``s = 1`` whatever ``alpha``: an entry's value is the weight itself, not an update to be scaled), so
``merged = W_res + scatter(values)`` is W bit for bit at the start. Only the k values are parameters: the
optimizer and its moments hold k numbers per layer (SaRA's "unstructural backpropagation" keeps no dense gradient
for the optimizer). The forward (:class:`SparseLinear`) forms the dense delta as a temporary and does not keep it
for backward, which forms it again and the dense gradient ``g^T x`` (both freed after the layer's backward).
It has no LoRA form: export it merged.

After :meth:`Sparse.shrunk` (SaRA's progressive step) a layer also holds ``sparse_fixed_index (m,)`` and
``sparse_fixed_update (m,)``: the entries that left the mask and what training had changed of them, frozen.
Penalty: the nuclear norm ``||scatter(values - values0)||_*`` of the trainable update (SaRA's low-rank
constraint), ``pissa.regularization`` times ``reg_weight``; one SVD ``(out, in)`` per layer per step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pissa.adapter.shapes.base import Shape, Tensors
from pissa.methods.factors import Init

FIXED = ("sparse_fixed_index", "sparse_fixed_update")
"""The frozen record of the entries a progressive step took out of the mask (absent before one)."""


def scatter(index: Tensor, values: Tensor, size: Tensor) -> Tensor:
    """The dense ``(out, in)`` matrix (``size = [out, in]``) with ``values (k,)`` at flat ``index (k,)``, zero
    elsewhere; differentiable in ``values``."""
    out, inp = (int(n) for n in size)
    return values.new_zeros(out * inp).scatter(0, index, values).view(out, inp)


class SparseLinear(torch.autograd.Function):
    """``x (..., in) @ scatter(values)^T``, saving ``x`` and the values but not the dense ``(out, in)`` term: backward
    forms it again for ``grad_x = g @ delta`` and takes ``grad_values`` from the dense ``g^T x`` at the index (both
    temporaries of one layer's backward), so no dense matrix per layer is held from the forward to the backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, values: Tensor, index: Tensor, size: Tensor) -> Tensor:
        ctx.save_for_backward(x, values, index, size)
        return F.linear(x, scatter(index, values, size))

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        x, values, index, size = ctx.saved_tensors
        gx = g @ scatter(index, values, size) if ctx.needs_input_grad[0] else None
        gv = None
        if ctx.needs_input_grad[1]:
            gv = (g.reshape(-1, g.shape[-1]).mT @ x.reshape(-1, x.shape[-1])).view(-1)[index]
        return gx, gv, None, None


class Sparse(Shape):
    """See the module docstring."""

    name = "sparse"
    variables = {"sparse_values": "values0"}
    required = ("sparse_index", "sparse_values", "values0", "sparse_threshold", "sparse_size")

    def initial(self, t: Tensors, s: float) -> Tensor:
        term = scatter(t["sparse_index"], t["values0"], t["sparse_size"])
        if FIXED[0] in t:
            term = term.view(-1).index_add(0, t[FIXED[0]], -t[FIXED[1]].to(term.dtype)).view_as(term)
        return term

    def delta(self, t: Tensors, s: float) -> Tensor:
        return scatter(t["sparse_index"], t["sparse_values"], t["sparse_size"])

    def forward(self, x: Tensor, t: Tensors, s: float) -> Tensor:
        return SparseLinear.apply(x, t["sparse_values"], t["sparse_index"], t["sparse_size"])

    def penalty(self, t: Tensors, meta: Mapping[str, Any]) -> Tensor:
        """``||scatter(values - values0)||_*`` in float32 (the sum of its singular values; autograd through svdvals)."""
        change = (t["sparse_values"] - t["values0"]).float()
        return torch.linalg.svdvals(scatter(t["sparse_index"], change, t["sparse_size"])).sum()

    def scaled(self, init: Init, s: float) -> Init:
        return init  # the scaling is not used (module docstring)

    def shrunk(self, t: Tensors) -> tuple[dict[str, Tensor], Tensor]:
        """SaRA's progressive step: the tensors with the mask cut to the entries whose current value is still below
        the threshold, ``|values| < sparse_threshold`` (the residual is zero on the mask, so the value is the
        weight), and ``keep (k,)`` bool, which of the old values stay. The others join the frozen record with their
        update ``values - values0``, so ``initial`` grows by what they hold and the layer's output does not change
        once its residual is formed again."""
        values = t["sparse_values"].detach()
        keep = values.abs() < t["sparse_threshold"]
        gone = ~keep
        fixed_index = t.get(FIXED[0], t["sparse_index"][:0])
        fixed_update = t.get(FIXED[1], values[:0])
        new = dict(t)
        new.update({
            "sparse_index": t["sparse_index"][keep], "sparse_values": values[keep].clone(), "values0": t["values0"][keep],
            FIXED[0]: torch.cat([fixed_index, t["sparse_index"][gone]]),
            FIXED[1]: torch.cat([fixed_update, values[gone] - t["values0"][gone]]),
        })
        return new, keep

    def describe(self, t: Tensors) -> str:
        out, inp = (int(n) for n in t["sparse_size"])
        return f"values={t['sparse_values'].numel()} of {out * inp}"
