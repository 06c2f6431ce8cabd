"""Options of ``pissa init``, ``export``, ``compress`` and ``merge-adapters`` (each field's docstring is its ``--help``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pissa.adapter.config import AdapterConfig
from pissa.errors import PissaError
from pissa.options import POSITIONAL, resume_safe_field
from pissa.runtime.hub import HeadKind


@dataclass
class InitConfig:
    """``pissa init``: a safetensors checkpoint on disk -> OUT/residual + OUT/adapter."""

    model: str
    """Hugging Face model folder: config.json and model.safetensors, or shards plus their index."""
    out: str
    """New output folder: OUT/residual (the residual checkpoint) and OUT/adapter."""
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    """The adapter (its fields are options of their own)."""
    device: str = "auto"
    """Where each streamed weight is decomposed (read from disk, sent there, its residual written back):
    auto (CUDA when available, else CPU), cpu, cuda, cuda:N, mps."""
    progress: bool = resume_safe_field(default=True)
    """Show a progress bar."""


@dataclass
class ExportConfig:
    """``pissa export``: a trained adapter -> a PEFT LoRA folder or a merged checkpoint."""

    adapter: str = field(metadata={POSITIONAL: True})
    """Adapter folder written by save_adapter / pissa finetune."""
    out: str
    """Output folder (replaced); with format gguf, the .gguf file (replaced)."""
    model: str | None = None
    """The base model the adapter was made from (embedded name or folder); default: the one the adapter records."""
    kind: HeadKind = "auto"
    """Model head; auto: the one the adapter records, else detected like finetune."""
    format: Literal["peft", "gguf"] = "peft"
    """peft: a Hugging Face PEFT LoRA folder; gguf: one llama.cpp LoRA adapter file (llama-cli --lora FILE,
    Ollama's ADAPTER line)."""
    merged: bool = False
    """Write a merged Hugging Face checkpoint (streamed shard by shard) instead of a PEFT LoRA."""
    max_rank: int | None = None
    """Truncate the PEFT LoRA to this rank (best rank-K approximation of each update; the error it adds is printed),
    e.g. to fit a server's max_lora_rank."""

    def __post_init__(self) -> None:
        if self.max_rank is not None and (self.merged or self.max_rank < 1):
            raise PissaError("`max_rank` takes an integer >= 1 and applies to the PEFT export, not to `merged`")
        if self.merged and self.format != "peft":
            raise PissaError(f"`format` {self.format} writes a LoRA adapter; `merged` writes a Hugging Face checkpoint")


@dataclass
class CompressConfig:
    """``pissa compress``: a checkpoint -> a WeLore-compressed checkpoint (low-rank factors where they save parameters)."""

    model: str = field(default="smollm2", metadata={POSITIONAL: True})
    """Embedded model name or Hugging Face model folder (config.json and safetensors)."""
    out: str = "compressed"
    """New output folder: the compressed checkpoint and its welore.json record."""
    reduction: float = 0.3
    """Fraction of the targeted matrices' parameters to remove, in (0, 1)."""
    targets: str | list[str] = "all-linear"
    """Layers to compress: all-linear (every Linear but the head) or module-name suffixes / regexes."""
    uniform: bool = False
    """The baseline instead of WeLore: cut the same fraction of rank from every matrix."""
    device: str = "auto"
    """Where each streamed weight's SVD runs: auto, cpu, cuda, cuda:N, mps."""
    progress: bool = resume_safe_field(default=True)
    """Show a progress bar."""


@dataclass
class MergeAdaptersConfig:
    """``pissa merge-adapters``: several adapters -> RMM's reversible basis, or one linear / TIES / DARE merge;
    with ``task``, a merged folder -> one task's adapter."""

    adapters: list[str] = field(metadata={POSITIONAL: True})
    """Adapter folders to merge (from one base, method, rank, targets and seed); with --task, the one merged folder."""
    out: str
    """Output folder (replaced): the merged folder (rmm), the merged adapter (linear, ties, dare) or, with --task,
    the task's adapter."""
    method: Literal["rmm", "linear", "ties", "dare"] = "rmm"
    """rmm: keep a basis of p components per position plus each task's coefficients (every task recoverable);
    linear, ties, dare: one adapter from the tasks' factor movements (mean; TIES trim, elect, average; DARE drop
    and rescale)."""
    p: int = 2
    """RMM: basis components per position (at most the number of adapters; p >= it rebuilds every adapter exactly)."""
    names: list[str] | None = None
    """Task names, one per adapter, comma-separated; default: the adapter folders' names."""
    density: float = 0.5
    """TIES: the share of each task's largest movements kept, in (0, 1]."""
    drop: float = 0.5
    """DARE: the probability an entry of a task's movement is dropped, in [0, 1)."""
    seed: int = 0
    """DARE: seed of the drops."""
    task: str | None = None
    """Rebuild this task's adapter (a normal adapter folder) from the merged folder given as the one ADAPTERS."""
    progress: bool = resume_safe_field(default=True)
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if self.task is not None:
            if len(self.adapters) != 1:
                raise PissaError(f"`task` rebuilds from one merged folder; got {len(self.adapters)} folders")
            return
        if len(self.adapters) < 2:
            raise PissaError(f"`adapters` takes at least 2 adapter folders to merge, got {len(self.adapters)}")
        if self.names is not None and len(self.names) != len(self.adapters):
            raise PissaError(f"`names` gives {len(self.names)} names for {len(self.adapters)} adapters")
        if isinstance(self.p, bool) or not isinstance(self.p, int) or self.p < 1:
            raise PissaError(f"`p` must be an integer >= 1, got {self.p!r}")
        if not 0 < self.density <= 1:
            raise PissaError(f"`density` must be in (0, 1], got {self.density}")
        if not 0 <= self.drop < 1:
            raise PissaError(f"`drop` must be in [0, 1), got {self.drop}")
