"""Options of ``pissa analyze`` (one dataclass per analysis; each field's docstring is its ``--help``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pissa.errors import PissaError
from pissa.methods.svd import SVDMethod
from pissa.runtime.hub import HeadKind


@dataclass
class QuantErrorConfig:
    """``pissa analyze quant-error``: NF4 (or int8) error reduction of QPiSSA vs LoftQ vs QLoRA per projection."""

    model: str = "smollm2"
    """Embedded model (smollm2, minilm) or a local Hugging Face folder."""
    kind: HeadKind = "auto"
    """Model head; auto: the embedded model's, else from config.json's architectures."""
    rank: int = 16
    """Adapter rank r."""
    iters: list[int] = field(default_factory=lambda: [1, 5])
    """Comma-separated LoftQ / QPiSSA iteration counts to report."""
    quantize: Literal["nf4", "int8"] = "nf4"
    """The quantizer of every method and of the baseline QLoRA = q(W): nf4 (the paper's) or int8 (LLM.int8)."""
    svd: SVDMethod = "exact"
    """Rank-r SVD: exact (LAPACK) or krylov (block Lanczos)."""
    niter: int | None = None
    """Block Lanczos steps with --svd krylov; None: the rank's default."""
    sample: int | None = None
    """At most this many layers per projection type (None: all)."""
    calibration: str | None = None
    """Statistics file of this model (pissa calibrate): adds the activation-weighted error table, with EoRA
    on nf4(W) and QPiSSA+EoRA (QPiSSA's last step activation-weighted)."""
    device: str = "auto"
    """Where the decompositions run: auto (CUDA when available, else CPU), cpu, cuda, cuda:N, mps."""
    out: str = "quant_error"
    """Output folder (replaced): quant_error.md, .csv, .png."""

    def __post_init__(self) -> None:
        if self.rank < 1 or not self.iters or any(t < 1 for t in self.iters) or (self.sample is not None and self.sample < 1):
            raise PissaError("`rank`, `iters` and `sample` must be >= 1")


@dataclass
class AdapterAnalysisConfig:
    """A trained adapter against its base (``pissa analyze spectrum|intruders``)."""

    adapter: str
    """Adapter folder written by save_adapter / pissa finetune."""
    model: str | None = None
    """The base model (embedded name or folder); default: the one the adapter records."""
    kind: HeadKind = "auto"
    """Model head; auto: the one the adapter records, else detected like finetune."""
    layers: list[str] | None = None
    """Comma-separated layer-name suffixes or regexes (default: every adapted layer)."""
    device: str = "auto"
    """Where the SVDs run: auto (CUDA when available, else CPU), cpu, cuda, cuda:N, mps."""
    out: str = "analysis"
    """Output folder (replaced)."""


@dataclass
class SpectrumConfig(AdapterAnalysisConfig):
    """``pissa analyze spectrum``: singular values of W (before) and W + ΔW (after)."""

    out: str = "spectrum"
    """Output folder (replaced): spectrum.md, .csv, .png."""
    plot_layers: int = 6
    """Layers drawn in the plot (evenly spaced among the chosen ones)."""

    def __post_init__(self) -> None:
        if self.plot_layers < 1:
            raise PissaError(f"`plot_layers` must be >= 1, got {self.plot_layers}")


@dataclass
class IntrudersConfig(AdapterAnalysisConfig):
    """``pissa analyze intruders``: intruder dimensions per layer."""

    out: str = "intruders"
    """Output folder (replaced): intruders.md, .csv, .png."""
    k: int = 10
    """Top singular vectors of the fine-tuned weight examined per layer."""
    threshold: float = 0.5
    """A top vector is an intruder when its largest |cosine| with every base singular vector is below this."""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise PissaError(f"`k` must be >= 1, got {self.k}")
        if not 0.0 < self.threshold <= 1.0:
            raise PissaError(f"`threshold` must be in (0, 1], got {self.threshold}")
