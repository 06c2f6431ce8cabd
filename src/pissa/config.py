"""AdapterConfig: every choice an adapter is made with, typed and validated in one place."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .errors import PissaError
from .svd import BLOCK

FACTOR_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


@dataclass
class AdapterConfig:
    """How to adapt a model. Field docs are the ``--help`` text of the command line."""

    method: str = "pissa"
    """Initialization method, a name from ``pissa.METHODS`` ("pissa", "lora", ...)."""
    rank: int = 16
    """Rank r of the trainable factors B (out x r) and A (r x in)."""
    alpha: float | None = None
    """Scaling numerator: the update is (alpha / rank) B A. None means alpha = rank (scaling 1)."""
    targets: str | list[str] = "all-linear"
    """"all-linear" (every Linear/Conv1D except the output head) or module-name suffixes / regexes."""
    quantize: Literal["nf4"] | None = None
    """None, or "nf4" to hold the frozen residual in 4-bit NF4 (QPiSSA)."""
    quant_iters: int = 5
    """QPiSSA iterations with quantize="nf4", from PiSSA's B A: each quantizes W - B A, then B A = rank-r SVD of W - nf4(W - B A)."""
    seed: int = 0
    """Seed of the random parts of the init (randomized SVD sketch, LoRA's A)."""
    svd: Literal["krylov", "exact"] = "krylov"
    """SVD for SVD-based methods: "krylov" (randomized block Krylov, within 0.1% of exact) or "exact"."""
    niter: int | None = None
    """Block Lanczos steps of the "krylov" SVD, two passes over W each (more = closer to exact);
    None = ``max(4, 2 + ceil(rank / 5))`` (:func:`pissa.svd.krylov_steps`)."""
    block: int = BLOCK
    """Columns per block Lanczos step."""
    dropout: float = 0.0
    """Dropout probability on the adapter path's input."""
    factor_dtype: str = "float32"
    """Dtype of the trainable factors: float32, bfloat16, float16 or float64."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Method-specific options (passed to the method's init function)."""

    def __post_init__(self) -> None:
        from .decompose import METHODS

        if self.method not in METHODS:
            raise PissaError(f"unknown method {self.method!r}; choose one of: {', '.join(sorted(METHODS))}")
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise PissaError(f"rank must be an integer >= 1, got {self.rank!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise PissaError(f"alpha must be > 0 (or None for alpha = rank), got {self.alpha!r}")
        if self.quantize not in (None, "nf4"):
            raise PissaError(f"unsupported quantize={self.quantize!r}; use None or 'nf4'")
        if not isinstance(self.quant_iters, int) or isinstance(self.quant_iters, bool) or self.quant_iters < 1:
            raise PissaError(f"quant_iters must be an integer >= 1, got {self.quant_iters!r}")
        if self.svd not in ("krylov", "exact"):
            raise PissaError(f"unknown svd={self.svd!r}; use 'krylov' or 'exact'")
        if self.niter is not None and (not isinstance(self.niter, int) or self.niter < 1):
            raise PissaError(f"niter must be an integer >= 1 (or None for the rank-based default), got {self.niter!r}")
        if not isinstance(self.block, int) or self.block < 1:
            raise PissaError(f"block must be an integer >= 1, got {self.block!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise PissaError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.factor_dtype not in FACTOR_DTYPES:
            raise PissaError(f"factor_dtype must be one of {', '.join(FACTOR_DTYPES)}, got {self.factor_dtype!r}")
        if isinstance(self.targets, str) and self.targets != "all-linear":
            self.targets = [self.targets]

    @property
    def scaling(self) -> float:
        """alpha / rank (1.0 when alpha is None)."""
        return 1.0 if self.alpha is None else self.alpha / self.rank

    @property
    def torch_factor_dtype(self) -> torch.dtype:
        return FACTOR_DTYPES[self.factor_dtype]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AdapterConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
