"""Adam with projected moments: GaLore (the top singular vectors of the gradient) and DCT-AdamW (columns of a fixed
DCT basis), in one :class:`torch.optim.Optimizer` whose unprojected groups are plain AdamW.

A projected weight ``W`` (m, n) is handled as ``X = G`` when ``m >= n`` and as ``X = G^T`` otherwise, so ``X`` is
(big, small) with ``big = max(m, n)``, ``small = min(m, n)`` and the projection acts on the smaller side (as in
GaLore and the official DCT-AdamW). With a basis ``P`` (small, r) of orthonormal columns:

    x = X P                                       (big, r): the projected gradient
    m = b1 m + (1 - b1) x,   v = b2 v + (1 - b2) x^2   (big, r): the moments
    u = (m / bc1) / (sqrt(v / bc2) + eps)         bc_i = 1 - b_i^t (torch's AdamW rule)
    W <- W (1 - lr wd) - lr s (u P^T)             (transposed back when m < n; s: GaLore's scale, 1 for DCT)

GaLore: ``P`` is the top-r right singular vectors of ``X`` (an SVD in float32 or float64), recomputed at steps 0, T, 2T, ...
(0-based); the moments are kept as they are when ``P`` changes (the paper's and galore-torch's rule, which treats
the new subspace as a slow drift of the old one), with the step count t of the weight.

DCT-AdamW: ``Q`` (small, small) is the orthonormal DCT-II basis of that size (:func:`dct_basis`, built once per
size, dtype and device); at steps 0, T, 2T, ... the r columns of ``Q`` with the largest l1 norms of ``X Q``
are chosen (:func:`select_columns`) and only their int64 indices are stored (``P = Q[:, index]``). Because the
basis is fixed, a column that stays chosen keeps its moments (moved to its new position), and a newly chosen
column starts at zero with a step count of its own (``age``, per column), so its bias correction is that of a
fresh Adam coordinate: the official code keeps the moment rows in place when the indices change, which mixes
one column's history into another's.

The state is tensors only (``step``, ``exp_avg``, ``exp_avg_sq``, GaLore's ``basis``, DCT-AdamW's ``index`` and
``age``), so ``state_dict()`` round-trips through safetensors and a run resumes exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import cache
from typing import Any, Literal

import torch
from torch import Tensor

Projection = Literal["galore", "dct"]


@cache
def dct_basis(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The orthonormal DCT-II basis of size ``n`` as columns: ``Q[j, k] = c_k cos(pi k (2j + 1) / (2n))`` with
    ``c_0 = sqrt(1/n)``, ``c_k = sqrt(2/n)``; (n, n), ``Q^T Q = I``, and ``x Q`` is the DCT-II of a row ``x``.
    Built in float64 and cast; cached per ``(n, dtype, device)``."""
    j = torch.arange(n, dtype=torch.float64)
    q = torch.cos(math.pi * torch.outer(2 * j + 1, j) / (2 * n)) * math.sqrt(2 / n)
    q[:, 0] = math.sqrt(1 / n)
    return q.to(dtype=dtype, device=device)


def select_columns(x: Tensor, q: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The ``rank`` columns of ``q`` (small, small) best aligned with ``x`` (big, small): the largest l1 norms of the
    columns of ``x q``. Returns their indices (int64, ascending) and ``x q[:, index]`` (big, rank)."""
    full = x @ q
    index = full.abs().sum(0).topk(rank).indices.sort().values
    return index, full[:, index]


def top_singular_vectors(g: Tensor, rank: int) -> Tensor:
    """The top ``rank`` singular vectors of ``g`` (m, n) on its smaller side as columns, (min(m, n), rank): the right
    ones when ``m >= n``, else the left ones; from an SVD of ``g`` itself (so the signs are galore-torch's) in float32
    (float64 for a float64 ``g``), cast to ``g``'s dtype."""
    u, _, vh = torch.linalg.svd(g if g.dtype == torch.float64 else g.float(), full_matrices=False)
    return (vh[:rank].T if g.shape[0] >= g.shape[1] else u[:, :rank]).to(g.dtype)


class ProjectedAdamW(torch.optim.Optimizer):
    """AdamW whose groups with ``projection`` ``"galore"`` or ``"dct"`` keep their moments in ``rank`` dimensions
    (module docstring); groups with ``projection`` None are torch's AdamW (same formula, same state names)."""

    def __init__(self, params: Iterable[Any], lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, projection=None, rank=0, every=1,
                        scale=1.0)
        super().__init__(params, defaults)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, then the integer state (indices, ages) back to int64 (torch casts state to the param dtype)."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in ("index", "age"):
                if key in state:
                    state[key] = state[key].long()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, p.grad, group)
        return loss

    def _update(self, p: Tensor, g: Tensor, group: dict[str, Any]) -> None:
        state, (b1, b2), lr = self.state[p], group["betas"], group["lr"]
        if not state:
            state["step"] = torch.tensor(0.0)
        t = int(state["step"].item())
        state["step"] += 1
        if group["weight_decay"]:
            p.mul_(1 - lr * group["weight_decay"])
        if group["projection"] is None:
            p.sub_(lr * _adam(state, g, b1, b2, group["eps"], torch.tensor(t + 1.0)))
            return
        wide = p.shape[0] < p.shape[1]
        basis, x = self._project(state, g, group, t)
        if "age" in state:
            state["age"] += 1
        ages = state["age"] if "age" in state else torch.tensor(t + 1.0)
        u = _adam(state, x, b1, b2, group["eps"], ages) @ basis.T * group["scale"]
        p.sub_(lr * (u.T if wide else u))

    def _project(self, state: dict[str, Tensor], g: Tensor, group: dict[str, Any], t: int) -> tuple[Tensor, Tensor]:
        """The basis ``P`` (small, r) at step ``t`` (re-chosen when due) and ``X P`` for the gradient ``g``; moves the
        moments on a change of DCT columns."""
        x = g.T if g.shape[0] < g.shape[1] else g
        rank, due = min(group["rank"], x.shape[1]), t % group["every"] == 0
        if group["projection"] == "galore":
            if due:
                state["basis"] = top_singular_vectors(g, rank)
            return state["basis"], x @ state["basis"]
        q = dct_basis(x.shape[1], x.dtype, x.device)
        if not due:
            return q[:, state["index"]], x @ q[:, state["index"]]
        index, projected = select_columns(x, q, rank)
        if "index" in state:
            _reindex(state, index)
        else:
            state["age"] = torch.zeros(rank, dtype=torch.int64, device=x.device)
        state["index"] = index
        return q[:, index], projected


def _reindex(state: dict[str, Tensor], index: Tensor) -> None:
    """Moments and ages of the columns that stay chosen moved to their positions in the new ``index``; the new
    columns' zeroed."""
    old = state["index"]
    hit = torch.searchsorted(old, index).clamp(max=len(old) - 1)
    stays = old[hit] == index
    for key in ("exp_avg", "exp_avg_sq"):
        state[key] = torch.where(stays, state[key][:, hit], torch.zeros((), dtype=state[key].dtype))
    state["age"] = torch.where(stays, state["age"][hit], 0)


def _adam(state: dict[str, Tensor], x: Tensor, b1: float, b2: float, eps: float, t: Tensor) -> Tensor:
    """Update the moments of ``x`` in ``state`` and return torch AdamW's step direction ``(m / bc1) / (sqrt(v / bc2)
    + eps)``; ``t`` the step count, a scalar or one per column of ``x``."""
    if "exp_avg" not in state:
        state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(x), torch.zeros_like(x)
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.lerp_(x, 1 - b1)
    v.mul_(b2).addcmul_(x, x, value=1 - b2)
    t = t.to(device=x.device, dtype=torch.float64)
    bc1, bc2 = (1 - b1 ** t).to(x.dtype), (1 - b2 ** t).to(x.dtype)
    return (m / bc1) / ((v / bc2).sqrt() + eps)
