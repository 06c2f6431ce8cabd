"""What an init function reads besides W: the numerical options (:class:`InitOptions`, one seed per matrix) and
the calibration statistics of its layers (:class:`Stats`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from pissa.errors import PissaError
from pissa.methods.svd import BLOCK, MatrixBatch, SVDMethod, krylov_svd, truncated_svd

Need = Literal["weight", "covariance", "gradient"]
"""What an init reads: the weight; the activation statistics (``X^T X / n`` and the mean, ``pissa
calibrate``); the mean loss gradient w.r.t. the weight (``pissa calibrate --gradients``)."""

KronRule = Literal["energy", "elbow"]
"""How SoKA picks a layer's Kronecker terms (:func:`pissa.methods.kronecker.term_count`)."""


def calibration_hint(need: Need = "covariance") -> str:
    """How to make the statistics of ``need``, in one sentence (every missing-statistics error ends with it)."""
    grad = " --gradients" if need == "gradient" else ""
    return (f"make them with `pissa calibrate --model MODEL --data DATA --out stats.safetensors{grad}` (or pissa.calibrate) "
            "and pass them as `calibration`")


@dataclass(frozen=True)
class Stats:
    """Calibration statistics of a batch of L equal-shape layers (the third argument of a data-aware init).

    ``cov (L, in, in)``: ``X^T X / n`` over the n calibration tokens ``x (in,)`` that reached the
    layer (uncentred); ``mean (L, in)``: ``X^T 1 / n``; ``grad (L, out, in)``: the mean gradient of
    the loss w.r.t. W. A method reads only what its :attr:`Method.needs` names; the rest may be None.
    """

    cov: Tensor | None = None
    mean: Tensor | None = None
    grad: Tensor | None = None
    components: Tensor | None = None
    """``(L, k, in)``: the k leading principal directions of the inputs (rows: eigenvectors of the centred
    covariance, descending), when the reader of the statistics already computed them
    (:meth:`pissa.files.statistics.Calibration.explained_variance`, once per distinct input); EVA then reuses them."""

    def to(self, dtype: torch.dtype, device: torch.device | None = None) -> Stats:
        conv = lambda t: None if t is None else t.to(device=device, dtype=dtype)
        return Stats(*(conv(getattr(self, f.name)) for f in dataclasses.fields(self)))

    def batched(self) -> Stats:
        """One layer's statistics (``cov (in, in)``...) as a batch of one."""
        add = lambda t: None if t is None else t.unsqueeze(0)
        return Stats(*(add(getattr(self, f.name)) for f in dataclasses.fields(self)))


def centred(cov: Tensor, mean: Tensor | None) -> Tensor:
    """The covariance of the activations about their mean, ``cov - mean mean^T`` (batched)."""
    return cov if mean is None else cov - mean.unsqueeze(-1) * mean.unsqueeze(-2)


def damped(cov: Tensor, damping: float) -> Tensor:
    """``C + damping * mean(diag C) * I`` (batched): the damped covariance CorDA and EoRA factor or invert."""
    out = cov.clone()
    out.diagonal(dim1=-2, dim2=-1).add_(damping_scale(cov, damping).unsqueeze(-1))
    return out


def damping_scale(cov: Tensor, damping: float) -> Tensor:
    """``damping * mean(diag C)`` per matrix ``(L,)``: what :func:`damped` adds to the diagonal."""
    return damping * cov.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(torch.finfo(cov.dtype).tiny)


CHUNK64_BYTES = 64 * 2**20
"""Float64 bytes of the batch :meth:`InitOptions.top_svd64` decomposes at once (its Rayleigh-Ritz copy)."""


@dataclass(frozen=True)
class InitOptions:
    """Numerical options shared by the init functions; ``seeds`` has one entry per matrix of the batch.

    ``stats``: the batch's calibration statistics (data-aware methods); ``damping``: their covariance's
    relative damping (:func:`damped`); ``first_lr``: LoRA-SB's simulated first step; ``fraction`` / ``threshold``:
    SaRA's mask rule (:func:`pissa.methods.sparse.sparse_mask`); ``kron_shape``, ``kron_rule``, ``kron_tau``: SoKA's
    factor shapes and term rule (:mod:`pissa.methods.kronecker`); ``names``: the batch's layer names (for errors).
    """

    seeds: Sequence[int] = (0,)
    svd: SVDMethod = "krylov"
    niter: int | None = None
    block: int = BLOCK
    stats: Stats | None = None
    damping: float = 0.01
    first_lr: float = 5e-6
    fraction: float = 0.1
    threshold: float | None = None
    kron_shape: Sequence[int] | None = None
    kron_rule: KronRule = "energy"
    kron_tau: float = 0.9
    names: Sequence[str] = ()

    def where(self) -> str:
        """The batch in an error message: its first layer (they share a shape), or "the weight"."""
        return f"layer {self.names[0]!r}" if self.names else "the weight"

    def top_svd(self, W: MatrixBatch, r: int) -> tuple[Tensor, Tensor, Tensor]:
        """Top-r triplets ``U (L, out, r), S (L, r), Vh (L, r, in)`` of the batch W with these options."""
        return truncated_svd(W, r, method=self.svd, steps=self.niter, block=self.block, seeds=self.seeds)

    def top_svd64(self, M: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`top_svd` of a statistics-derived ``M (L, m, n)`` (a covariance, a gradient, ``W C``): for a
        Krylov SVD, float32 passes with the basis and the projected problems in float64
        (:func:`pissa.methods.svd.krylov_svd` ``work``); the triplets in M's dtype. Such matrices have steep spectra
        (the top r hold over 99% of the energy), which bf16 passes blur and for which the float32 Krylov SVD
        falls back to a full LAPACK SVD (:data:`pissa.methods.svd.LOW_PRECISION_TAIL`); this resolves them at a
        tenth of that cost or less. :data:`CHUNK64_BYTES` of the batch at a time."""
        if self.svd != "krylov" or M.dtype == torch.float64:
            return self.top_svd(M, r)
        per = max(1, CHUNK64_BYTES // (8 * M[0].numel()))
        parts = [krylov_svd(M[i : i + per], r, steps=self.niter, block=self.block, seeds=self.seeds[i : i + per],
                            work=torch.float64) for i in range(0, len(M), per)]
        return tuple(torch.cat([p[j] for p in parts]).to(M.dtype) for j in range(3))  # type: ignore[return-value]

    def covariance(self) -> Tensor:
        """``stats.cov (L, in, in)``, or a PissaError that says how to make it."""
        if self.stats is None or self.stats.cov is None:
            raise PissaError("this method reads activation statistics and none were given; " + calibration_hint())
        return self.stats.cov

    def gradient(self) -> Tensor:
        """``stats.grad (L, out, in)``, or a PissaError that says how to make it."""
        if self.stats is None or self.stats.grad is None:
            raise PissaError("this method reads the loss gradient and none was given; " + calibration_hint("gradient"))
        return self.stats.grad


def layer_seed(seed: int, name: str) -> int:
    """A 63-bit seed for layer ``name`` derived from the config seed (stable across runs and machines)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1
