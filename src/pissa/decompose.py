"""Pure decompositions W -> (A, B, residual): one function per method, one registry.

Every method maps a batch of weights ``W (L, out, in)`` (float32 or float64) to factors
``A (L, r, in)`` and ``B (L, out, r)``; its random draws for matrix i come from ``opt.seeds[i]``
(so a layer gets the same factors alone or batched). The frozen residual is always

    residual = W - B @ A

so that ``residual + B @ A == W`` and the adapted model starts exactly where the base was.
Adding a method is one function here, one line in ``METHODS`` and one test.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from .errors import PissaError
from .svd import SVDMethod, seeded, truncated_svd

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class InitOptions:
    """Numerical options shared by the init functions; ``seeds`` has one entry per matrix of the batch."""

    seeds: Sequence[int] = (0,)
    svd: SVDMethod = "krylov"
    niter: int = 4
    oversample: int = 4


def layer_seed(seed: int, name: str) -> int:
    """A 63-bit seed for layer ``name`` derived from the config seed (stable across runs and machines)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


InitFn = Callable[[Tensor, int, InitOptions], tuple[Tensor, Tensor]]


def pissa_init(W: Tensor, r: int, opt: InitOptions) -> tuple[Tensor, Tensor]:
    """PiSSA (Meng et al., 2024, arXiv 2404.02948): the r principal singular triplets.

    ``W = U S V^T``; ``B = U[:, :r] sqrt(S[:r])``, ``A = sqrt(S[:r]) V[:, :r]^T``, so ``B A`` is
    the best rank-r approximation of W and the residual holds the minor components.
    """
    U, S, Vh = truncated_svd(W, r, method=opt.svd, niter=opt.niter, oversample=opt.oversample, seeds=opt.seeds)
    root = S.sqrt()
    return root.unsqueeze(-1) * Vh, U * root.unsqueeze(-2)


def lora_init(W: Tensor, r: int, opt: InitOptions) -> tuple[Tensor, Tensor]:
    """LoRA (Hu et al., 2021): ``A ~ U(-1/sqrt(in), 1/sqrt(in))`` (PyTorch's Kaiming-uniform
    default for a Linear), ``B = 0``; the residual is W itself."""
    L, out_f, in_f = W.shape
    bound = 1.0 / math.sqrt(in_f)
    A = (2 * bound) * seeded(opt.seeds, (r, in_f), W, normal=False) - bound
    return A, torch.zeros(L, out_f, r, dtype=W.dtype, device=W.device)


METHODS: dict[str, InitFn] = {
    "pissa": pissa_init,
    "lora": lora_init,
}


@dataclass(frozen=True)
class Decomposition:
    """``weight ≈ residual + B @ A``; A: (rank, in), B: (out, rank), residual: (out, in)."""

    A: Tensor
    B: Tensor
    residual: Tensor


def check_weight(W: Tensor, rank: int, name: str = "weight") -> None:
    """Raise PissaError unless W is a finite 2-D float matrix that admits rank ``rank``."""
    if W.dtype not in SUPPORTED_DTYPES:
        raise PissaError(
            f"{name} has dtype {W.dtype}, which cannot be decomposed; load the model in float32, bfloat16 "
            "or float16 (an already-quantized model must be loaded unquantized; use quantize='nf4' for QPiSSA)"
        )
    if W.dim() != 2:
        raise PissaError(f"{name} must be a 2-D (out, in) matrix, got shape {tuple(W.shape)}")
    limit = min(W.shape)
    if not 1 <= rank <= limit:
        raise PissaError(f"rank {rank} does not fit {name} of shape {tuple(W.shape)}; choose 1 <= rank <= {limit}")
    if not bool(torch.isfinite(W).all()):
        raise PissaError(f"{name} contains NaN or Inf; fix or reload the model weights before adapting")


def residual_of(weight: Tensor, A: Tensor, B: Tensor, scaling: float = 1.0) -> Tensor:
    """``weight - scaling * B @ A``, computed in float32 (float64 if any input is) and cast to weight.dtype.

    The one formula for the residual: attach, load_adapter and decompose all call it, so a
    residual rebuilt from the saved initial factors is bit-identical to the one made at attach.
    """
    dt = torch.float64 if torch.float64 in (weight.dtype, A.dtype, B.dtype) else torch.float32
    delta = B.to(dt) @ A.to(dt)
    if scaling != 1.0:
        delta = delta * scaling
    return (weight.to(dt) - delta).to(weight.dtype)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Decompositions run in float64 for float64 weights and in float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def init_factors(W: Tensor, rank: int, method: str, opt: InitOptions) -> tuple[Tensor, Tensor]:
    """Run the registered method on ``W (L, out, in)`` in float32/float64; returns (A (L, r, in), B (L, out, r))."""
    if method not in METHODS:
        raise PissaError(f"unknown method {method!r}; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[method](W.to(compute_dtype(W.dtype)), rank, opt)


def decompose(
    weight: Tensor,
    rank: int,
    method: str = "pissa",
    quantize: str | None = None,
    *,
    svd: SVDMethod = "krylov",
    niter: int = 4,
    oversample: int = 4,
    seed: int = 0,
) -> Decomposition:
    """Split ``weight (out, in)`` into trainable ``B (out, rank)``, ``A (rank, in)`` and a frozen residual.

    The factors are float32 (float64 for a float64 weight); the residual has weight's dtype.
    ``quantize="nf4"`` quantizes the residual (QPiSSA) and returns it dequantized.
    """
    check_weight(weight, rank)
    if quantize is not None:
        from .quant import quantized_decompose

        return quantized_decompose(weight, rank, method, quantize, svd=svd, niter=niter, oversample=oversample, seed=seed)
    opt = InitOptions(seeds=(seed,), svd=svd, niter=niter, oversample=oversample)
    A, B = init_factors(weight.unsqueeze(0), rank, method, opt)
    return Decomposition(A=A[0], B=B[0], residual=residual_of(weight, A[0], B[0]))
