"""Every option of the library and the command line, typed and validated in one place.

:class:`AdapterConfig` is how an adapter is made; :class:`RunConfig` a fine-tuning run (it holds
an AdapterConfig); the other classes are the remaining commands' options. Each field's docstring
is its ``--help`` text (:mod:`pissa.options` generates the command line from these classes).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from pissa.adapter.config import AdapterConfig
from pissa.data.formats import parse_columns
from pissa.errors import PissaError
from pissa.integrations.tracking import TrackingConfig
from pissa.methods.registry import METHODS, get_method
from pissa.optim.config import OptimizerConfig
from pissa.options import resume_safe_field
from pissa.runtime.hub import HeadKind


@dataclass
class RunConfig:
    """Everything a fine-tuning run depends on (written to ``OUT/config.yaml``; ``--config`` reads it back)."""

    model: str = "smollm2"
    """Embedded model (smollm2, minilm) or a local Hugging Face model folder."""
    data: str = "rotten_tomatoes"
    """Embedded dataset (rotten_tomatoes, arithmetic: chat word problems, use --max-length 160), a .jsonl/.json/.csv/.parquet
    file, a datasets save_to_disk folder or a Hub dataset already in the local datasets cache, with messages (chat),
    conversations (ShareGPT), instruction,output (Alpaca), prompt,completion, prompt,chosen,rejected (preference, for
    --objective dpo) or text,label columns."""
    columns: list[str] = field(default_factory=list)
    """Rename the data's columns to the names above: comma-separated TARGET=SOURCE, e.g. prompt=question,completion=answer."""
    data_split: str | None = None
    """The split of a DatasetDict folder or cached Hub dataset to read (default: train, or its only split)."""
    kind: HeadKind = "auto"
    """Model head; auto: the embedded model's, else from config.json's architectures."""
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    """The adapter (its fields are options of their own)."""
    device: str = "auto"
    """Where the model, factors, batches and optimizer state live: auto (CUDA when available, else CPU),
    cpu, cuda, cuda:N, mps."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the frozen base and residual; the factors keep factor_dtype, and a half base runs under autocast
    (float16 with a gradient scaler)."""
    gradient_checkpointing: bool = False
    """Recompute the decoder blocks' activations in backward instead of storing them (less memory, ~30% more time)."""
    lr: float | None = None
    """Peak learning rate; None: the method's default measured on the embedded task (pissa.METHODS[m].learning_rate)."""
    steps: int = 150
    """Optimizer steps."""
    batch_size: int = 8
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_length: int = 64
    """Max tokens per example (longer prompts lose their start)."""
    pack: bool = False
    """Pack each micro-batch's examples into rows of up to --max-length tokens (less padding); each example
    keeps its own positions and attends only to itself, so the loss is the unpacked one (causal LMs)."""
    eval_size: int = 200
    """Held-out examples scored before and after training."""
    val_size: int = 0
    """Training examples held out as a validation split (disjoint from the test split); when > 0 the
    evaluations score it instead of the test split: choose hyper-parameters this way, never on the test split."""
    eval: Literal["auto", "generate", "likelihood"] = "auto"
    """How held-out examples are scored. likelihood: loss, and accuracy = best label (labelled data) or argmax token;
    generate: greedy decoding, accuracy = exact match of the final answer ("#### N", "The answer is N", else the last
    number); auto: generate for unlabelled data whose references all state a final answer, else likelihood."""
    eval_data: str | None = None
    """A separate held-out file or folder (same formats as --data) to score instead of a split of --data,
    which then trains in full."""
    max_new_tokens: int = 80
    """Most tokens generated per example by --eval generate (the embedded arithmetic answers take at most 64)."""
    eval_batch_size: int = resume_safe_field(default=64)
    """Held-out examples per evaluation batch; generation decodes this many rows together, so each token step
    reads the weights once for all of them (benchmarks/results/generation_eval.md). Lower it when evaluation
    runs out of memory."""
    eval_dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the evaluations' forward passes. float32: the exact scores of the model as it trains. bfloat16:
    while scoring, each adapted layer is merged (W_res + s B A formed in float32, then rounded to bfloat16) and
    the whole model computes in bfloat16 on copies (the other linear layers, the output head, embeddings and
    norms; attention and the KV cache follow), about 2x faster on CPUs with AVX512-BF16 or AMX and on GPUs; the
    loss is taken in float32 from the bfloat16 logits. The copies take 2 bytes per weight while scoring; greedy
    answers may differ where logits nearly tie
    (accuracy within its sampling error on arithmetic: benchmarks/results/generation_eval.md). Not with
    --objective dpo."""
    warmup: int = 10
    """Linear warm-up steps."""
    schedule: Literal["constant", "cosine"] = "cosine"
    """Learning rate after warm-up."""
    max_grad_norm: float = 1.0
    """Gradient clipping (global L2 norm)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (0: decay would pull PiSSA's factors, and W, towards zero)."""
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    """The optimizer (its fields are options of their own)."""
    objective: Literal["sft", "dpo"] = "sft"
    """What training minimizes. sft: the loss of the completions (of the labels for a classifier); dpo: DPO's
    preference loss on prompt,chosen,rejected rows, with the model at its initial factors as the reference
    (pissa.reference: the exact base for PiSSA, no second copy of the model)."""
    beta: float = 0.1
    """DPO's beta: how far the policy's log-ratio to the reference is scaled (larger: stay closer to the reference)."""
    reg_weight: float = 0.0
    """Weight of pissa.regularization in the loss (SORSA's orthonormality penalty; SaRA's nuclear norm of its update)."""
    progressive_step: int = 0
    """SaRA's progressive step: after this many steps each mask shrinks to the entries still below their threshold,
    the others freeze at their trained values (0: never)."""
    save_every: int = resume_safe_field(default=50)
    """Checkpoint every N steps (0: only on Ctrl-C)."""
    threads: int = resume_safe_field(default_factory=lambda: len(os.sched_getaffinity(0)))
    """CPU threads (default: the cores available to this process)."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Experiment trackers (its fields are options of their own)."""

    def __post_init__(self) -> None:
        if isinstance(self.adapter, dict):
            self.adapter = AdapterConfig(**self.adapter)
        if isinstance(self.optim, dict):
            self.optim = OptimizerConfig(**self.optim)
        if isinstance(self.tracking, dict):
            self.tracking = TrackingConfig(**self.tracking)
        self.validate()

    def validate(self) -> None:
        """Raise PissaError for any out-of-range option (before anything is loaded or written)."""
        parse_columns(self.columns)
        for name in ("steps", "batch_size", "grad_accum", "eval_size", "threads", "warmup", "save_every", "val_size",
                     "max_new_tokens", "eval_batch_size", "progressive_step"):
            value = getattr(self, name)
            low = 0 if name in ("steps", "warmup", "save_every", "val_size", "progressive_step") else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise PissaError(f"`{name}` must be an integer >= {low}, got {value!r}")
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise PissaError(f"`max_length` must be >= 2 (a prompt token and a completion token), got {self.max_length!r}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise PissaError(f"`lr` must be a positive number, got {self.lr}")
        if not self.max_grad_norm > 0 or self.weight_decay < 0 or self.reg_weight < 0:
            raise PissaError("`max_grad_norm` must be > 0, `weight_decay` and `reg_weight` >= 0")
        if self.schedule not in ("constant", "cosine"):
            raise PissaError(f"`schedule` must be constant or cosine, got {self.schedule!r}")
        if self.kind not in ("auto", "causal-lm", "seq-cls"):
            raise PissaError(f"`kind` must be auto, causal-lm or seq-cls, got {self.kind!r}")
        if self.eval not in ("auto", "generate", "likelihood"):
            raise PissaError(f"`eval` must be auto, generate or likelihood, got {self.eval!r}")
        if self.objective not in ("sft", "dpo"):
            raise PissaError(f"`objective` must be sft or dpo, got {self.objective!r}")
        if self.eval_dtype not in ("float32", "bfloat16"):
            raise PissaError(f"`eval_dtype` must be float32 or bfloat16, got {self.eval_dtype!r}")
        if self.eval_dtype != "float32" and self.objective == "dpo":
            raise PissaError("`eval_dtype` bfloat16 merges the adapted layers; DPO's evaluation needs them unmerged "
                             "for its reference: drop `eval_dtype` or use `objective` sft")
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise PissaError(f"`beta` must be a positive number, got {self.beta}")
        if self.objective == "dpo" and self.pack:
            raise PissaError("`pack` joins examples into rows; DPO scores each answer on its own: drop `pack`")
        if self.eval_data is not None and self.val_size:
            raise PissaError("`eval_data` and `val_size` both choose what is scored; pass one of them")
        spec = METHODS.get(self.method)
        if self.optim.optimizer != "adamw" and spec is not None and (spec.adapter or spec.compressed):
            raise PissaError(f"`optimizer` {self.optim.optimizer} projects the gradients of whole weights: use it with "
                             f"`method` full, or `optimizer` adamw for {self.method}")

    @property
    def method(self) -> str:
        return self.adapter.method

    @property
    def seed(self) -> int:
        """The run's one seed: the init (AdapterConfig.seed), the data order and dropout."""
        return self.adapter.seed

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else METHODS[self.method].learning_rate

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class CompareConfig(RunConfig):
    """A run per method, everything else equal (``pissa compare``)."""

    methods: list[str] = field(default_factory=lambda: ["pissa", "lora"])
    """Comma-separated method names (pissa.METHODS), default pissa,lora."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise PissaError(f"`methods` needs distinct comma-separated method names, got {','.join(self.methods)!r}")
        for m in self.methods:
            get_method(m)

    def runs(self) -> list[RunConfig]:
        """One RunConfig per method."""
        base = {f.name: getattr(self, f.name) for f in dataclasses.fields(RunConfig)}
        return [RunConfig(**{**base, "adapter": dataclasses.replace(self.adapter, method=m)}) for m in self.methods]


@dataclass
class Launch:
    """Where a command writes and how it runs (not part of the run's result)."""

    out: str | None = None
    """Output folder; default: runs/finetune-METHOD (finetune), runs/compare (compare), runs/pretrain (pretrain)."""
    resume: bool = False
    """Continue the interrupted run in OUT.partial; an option that differs from the interrupted run's is refused."""
    nproc: int = 1
    """Data-parallel processes on this machine (relaunches under torchrun; gloo on the CPU, NCCL on GPUs);
    the cores are split between them. Under an existing torchrun (e.g. several machines with
    torchrun --nnodes) leave it at 1: the launched processes are used as they are."""
    fsdp: bool = False
    """Shard the model over the processes (FSDP2, one unit per decoder block) instead of replicating it:
    each holds 1/N of the frozen base. Checkpoints hold the whole adapter and optimizer state,
    so a run may resume with another --nproc, with or without --fsdp."""
    config: str | None = None
    """A run configuration file (.yaml or .json, e.g. the OUT/config.yaml a run wrote);
    options given on the command line override it."""

    def __post_init__(self) -> None:
        if not isinstance(self.nproc, int) or self.nproc < 1:
            raise PissaError(f"`nproc` must be an integer >= 1, got {self.nproc!r}")
