"""Options of ``pissa calibrate`` (each field's docstring is its ``--help``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from pissa.errors import PissaError
from pissa.runtime.hub import HeadKind

CALIBRATION_SAMPLES = 256
"""Training examples a calibration pass reads by default (pissa calibrate --samples; pissa compare's own pass)."""


@dataclass
class CalibrateConfig:
    """``pissa calibrate``: per-layer activation statistics (and loss gradients) of a model over data."""

    out: str
    """The statistics file to write (safetensors); one with the same model fingerprint and data digest is reused."""
    model: str = "smollm2"
    """Embedded model (smollm2, minilm) or a local Hugging Face model folder."""
    data: str = "rotten_tomatoes"
    """Embedded dataset or a data file (the formats of pissa finetune); its training split is used."""
    columns: list[str] = field(default_factory=list)
    """As pissa finetune --columns: rename the data's columns, comma-separated TARGET=SOURCE."""
    data_split: str | None = None
    """As pissa finetune --data-split: the split of a DatasetDict folder or cached Hub dataset."""
    kind: HeadKind = "auto"
    """Model head; auto: the embedded model's, else from config.json's architectures."""
    samples: int = CALIBRATION_SAMPLES
    """Training examples passed through the model (the first ones of the training split)."""
    val_size: int = 0
    """As pissa finetune --val-size: the validation examples are carved out of the training split first,
    so the statistics read exactly the examples that run trains on."""
    batch_size: int = 8
    """Examples per forward pass (padding is left out of the statistics)."""
    max_length: int = 64
    """Max tokens per example, as in pissa finetune."""
    targets: str | list[str] = "all-linear"
    """The layers to collect statistics for, as AdapterConfig.targets."""
    gradients: bool = False
    """Also accumulate the loss gradient w.r.t. each target weight (lora-ga, lora-sb): one backward per batch."""
    device: str = "auto"
    """Where the model runs: auto (CUDA when available, else CPU), cpu, cuda, cuda:N, mps."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the model (the statistics are accumulated in float32)."""
    threads: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    """CPU threads (default: the cores available to this process)."""

    def __post_init__(self) -> None:
        for name in ("samples", "batch_size", "max_length", "threads", "val_size"):
            value, low = getattr(self, name), 0 if name == "val_size" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise PissaError(f"`{name}` must be an integer >= {low}, got {value!r}")
        if isinstance(self.targets, str) and self.targets != "all-linear":
            self.targets = [self.targets]
