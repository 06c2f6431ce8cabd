"""AdapterConfig: how an adapter is made (method, rank, scaling, targets, 4-bit residual, SVD and data-aware options)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from pissa.adapter.targets import matches
from pissa.errors import PissaError
from pissa.methods.quantize import quantizer
from pissa.methods.registry import METHODS, get_method
from pissa.methods.sparse import check_fraction
from pissa.methods.svd import BLOCK, SVDMethod
from pissa.options import CHOICES
from pissa.runtime.devices import DTYPES


@dataclass
class AdapterConfig:
    """How to adapt a model."""

    method: str = field(default="pissa", metadata={CHOICES: tuple(METHODS)})
    """Initialization method (pissa.METHODS)."""
    rank: int = 16
    """Rank r of the trainable factors B (out x r) and A (r x in)."""
    alpha: float | None = None
    """Scaling numerator: the update is (alpha / rank) B A. None means alpha = rank (scaling 1)."""
    targets: str | list[str] = "all-linear"
    """"all-linear" (every Linear/Conv1D except the output head) or module-name suffixes / regexes."""
    quantize: Literal["nf4", "int8"] | None = None
    """None; "nf4" to hold the frozen residual in 4-bit NF4 (QPiSSA); "int8" for LLM.int8 (8-bit rows, outlier
    columns in 16 bits). LoRA with either is QLoRA."""
    quant_iters: int = 5
    """QPiSSA iterations with quantize, from PiSSA's B A: each quantizes W - B A,
    then B A = rank-r SVD of W - q(W - B A)."""
    seed: int = 0
    """Seed of the random parts of the init (randomized SVD sketch, LoRA's A)."""
    svd: SVDMethod = "krylov"
    """SVD for SVD-based methods: "krylov" (randomized block Krylov, within 0.1% of exact) or "exact"."""
    niter: int | None = None
    """Block Lanczos steps of the "krylov" SVD, two passes over W each (more = closer to exact);
    None: the rank's default, max(4, 2 + ceil(rank / 5))."""
    block: int = BLOCK
    """Columns per block Lanczos step."""
    dropout: float = 0.0
    """Dropout probability on the adapter path's input."""
    factor_dtype: Literal["float32", "bfloat16", "float16", "float64"] = "float32"
    """Dtype of the trainable factors: float32, bfloat16, float16 or float64."""
    rank_pattern: dict[str, int] | None = None
    """Per-layer ranks, a JSON object {module name, name suffix or regex: rank}; a layer takes the rank of
    its exact name, else of the first key that matches it, else --rank; rank 0 leaves the layer unadapted."""
    calibration: str | None = None
    """Statistics file written by pissa calibrate, read by the data-aware methods (corda, corda-kpm, eva,
    eora, lora-ga, lora-sb) and by QPiSSA's last step (quantize); pissa compare without it calibrates
    on its own training split into OUT/calibration.safetensors."""
    damping: float = 0.01
    """Data-aware methods: the activation covariance C gets damping * mean(diag C) added to its diagonal
    before it is inverted or factored (CorDA, EoRA)."""
    first_lr: float = 5e-6
    """LoRA-SB: learning rate of the simulated first full fine-tuning step -lr sign(G) it starts from
    (its paper: the peak rate divided by the warm-up steps; pissa finetune's defaults give 5e-5 / 10)."""
    eva_rho: float = 2.0
    """EVA: a layer may take up to eva_rho * rank components; the budget rank x layers goes to the components
    explaining the most variance across layers (1: every layer keeps rank)."""
    sparse_fraction: float = 0.1
    """SaRA: the share of each weight's entries that train, those of least magnitude; in (0, 1)."""
    sparse_threshold: float | None = None
    """SaRA: train every entry with |w| below this instead of a fraction (None: use sparse_fraction)."""

    kron_shape: tuple[int, int, int, int] | None = None
    """SoKA: the factor shapes (m, n, p, q) of U (m x n) and V (p x q) for a weight (m*p x n*q); None: balanced
    splits of out and in features (as PEFT's LoKr)."""
    kron_rule: Literal["energy", "elbow"] = "energy"
    """SoKA: how many Kronecker terms a layer keeps (at most rank): "energy" (the fewest holding kron_tau of the
    squared spectrum) or "elbow" (the elbow of the spectrum)."""
    kron_tau: float = 0.9
    """SoKA: the energy share the kept Kronecker terms must hold (kron_rule "energy"), in (0, 1]."""

    def __post_init__(self) -> None:
        get_method(self.method)
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise PissaError(f"rank must be an integer >= 1, got {self.rank!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise PissaError(f"alpha must be > 0 (or None for alpha = rank), got {self.alpha!r}")
        if self.quantize is not None:
            quantizer(self.quantize)
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
        if self.factor_dtype not in DTYPES:
            raise PissaError(f"factor_dtype must be one of {', '.join(DTYPES)}, got {self.factor_dtype!r}")
        if isinstance(self.targets, str) and self.targets != "all-linear":
            self.targets = [self.targets]
        if self.rank_pattern is not None:
            if not isinstance(self.rank_pattern, dict) or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
                for k, v in self.rank_pattern.items()
            ):
                raise PissaError(f"rank_pattern must map module names or regexes to ranks >= 0, got {self.rank_pattern!r}")
            self.rank_pattern = dict(self.rank_pattern) or None
        if not (isinstance(self.damping, (int, float)) and 0 <= self.damping < math.inf):
            raise PissaError(f"damping must be a number >= 0, got {self.damping!r}")
        if not (isinstance(self.first_lr, (int, float)) and self.first_lr > 0):
            raise PissaError(f"first_lr must be > 0, got {self.first_lr!r}")
        check_fraction(self.sparse_fraction)
        threshold = self.sparse_threshold
        if threshold is not None and not (isinstance(threshold, (int, float)) and threshold > 0):
            raise PissaError(f"sparse_threshold must be > 0 (or None for sparse_fraction), got {self.sparse_threshold!r}")
        if self.kron_shape is not None:
            if not (isinstance(self.kron_shape, (list, tuple)) and len(self.kron_shape) == 4 and all(
                    isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in self.kron_shape)):
                raise PissaError(f"kron_shape must be four integers >= 1 (m, n, p, q), got {self.kron_shape!r}")
            self.kron_shape = (self.kron_shape[0], self.kron_shape[1], self.kron_shape[2], self.kron_shape[3])
        if self.kron_rule not in ("energy", "elbow"):
            raise PissaError(f"unknown kron_rule={self.kron_rule!r}; use 'energy' or 'elbow'")
        if not (isinstance(self.kron_tau, (int, float)) and 0 < self.kron_tau <= 1):
            raise PissaError(f"kron_tau must be in (0, 1], got {self.kron_tau!r}")
        if not (isinstance(self.eva_rho, (int, float)) and self.eva_rho >= 1):
            raise PissaError(f"eva_rho must be >= 1 (1: uniform ranks), got {self.eva_rho!r}")

    @property
    def scaling(self) -> float:
        """alpha / rank (1.0 when alpha is None)."""
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def scaling_for(self, rank: int) -> float:
        """The scaling of a layer of rank ``rank``: alpha / rank (1.0 when alpha is None), as PEFT's rank_pattern."""
        return 1.0 if self.alpha is None else self.alpha / rank

    def layer_rank(self, name: str) -> int:
        """The rank of layer ``name``: its exact name in rank_pattern, else the first key matching it
        (dotted suffix or full regex), else ``rank``; 0: not adapted."""
        pattern = self.rank_pattern or {}
        if name in pattern:
            return pattern[name]
        for key, r in pattern.items():
            if matches(name, key):
                return r
        return self.rank

    @property
    def torch_factor_dtype(self) -> torch.dtype:
        return DTYPES[self.factor_dtype]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
