"""Every option of the library and the command line, typed and validated in one place.

:class:`AdapterConfig` is how an adapter is made; :class:`RunConfig` a fine-tuning run (it holds
an AdapterConfig); the other classes are the remaining commands' options. Each field's docstring
is its ``--help`` text (:mod:`pissa.options` generates the command line from these classes).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from pissa.errors import PissaError
from pissa.methods.registry import METHODS, get_method
from pissa.methods.svd import BLOCK, SVDMethod
from pissa.options import CHOICES, POSITIONAL, RESUME_SAFE
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
    quantize: Literal["nf4"] | None = None
    """None, or "nf4" to hold the frozen residual in 4-bit NF4 (QPiSSA)."""
    quant_iters: int = 5
    """QPiSSA iterations with quantize="nf4", from PiSSA's B A: each quantizes W - B A,
    then B A = rank-r SVD of W - nf4(W - B A)."""
    seed: int = 0
    """Seed of the random parts of the init (randomized SVD sketch, LoRA's A)."""
    svd: SVDMethod = "krylov"
    """SVD for SVD-based methods: "krylov" (randomized block Krylov, within 0.1% of exact) or "exact"."""
    niter: int | None = None
    """Block Lanczos steps of the "krylov" SVD, two passes over W each (more = closer to exact);
    None: the rank's default (:func:`pissa.svd.krylov_steps`)."""
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
    eora, lora-ga, lora-sb) and by QPiSSA's last step (quantize nf4); pissa compare without it calibrates
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

    def __post_init__(self) -> None:
        get_method(self.method)
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
            if name.endswith("." + key) or _fullmatch(key, name):
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


def _fullmatch(pattern: str, name: str) -> bool:
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _resume_safe(**kw: Any) -> Any:
    """A field (``default=`` or ``default_factory=``) that cannot change a run's result: ``--resume`` accepts a new value."""
    return field(metadata={RESUME_SAFE: True}, **kw)


HeadKind = Literal["auto", "causal-lm", "seq-cls"]


@dataclass
class RunConfig:
    """Everything a fine-tuning run depends on (written to ``OUT/config.yaml``; ``--config`` reads it back)."""

    model: str = "smollm2"
    """Embedded model (smollm2, minilm) or a local Hugging Face model folder."""
    data: str = "rotten_tomatoes"
    """Embedded dataset (rotten_tomatoes, arithmetic: chat word problems, use --max-length 160), a .jsonl/.json/.csv/.parquet
    file or a datasets save_to_disk folder with messages (chat), prompt,completion or text,label columns."""
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
    eval_batch_size: int = _resume_safe(default=64)
    """Held-out examples per evaluation batch. Decoding a few rows at a time reads every weight per token
    for little work: 200 generated answers took 206 s at 64 rows against 317 s at 16 on one CPU thread
    (benchmarks/results/generation_eval.md); lower it when evaluation runs out of memory."""
    warmup: int = 10
    """Linear warm-up steps."""
    schedule: Literal["constant", "cosine"] = "cosine"
    """Learning rate after warm-up."""
    max_grad_norm: float = 1.0
    """Gradient clipping (global L2 norm)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (0: decay would pull PiSSA's factors, and W, towards zero)."""
    reg_weight: float = 0.0
    """Weight of pissa.regularization (SORSA's orthonormality penalty) in the loss."""
    save_every: int = _resume_safe(default=50)
    """Checkpoint every N steps (0: only on Ctrl-C)."""
    threads: int = _resume_safe(default_factory=lambda: len(os.sched_getaffinity(0)))
    """CPU threads (default: the cores available to this process)."""

    def __post_init__(self) -> None:
        if isinstance(self.adapter, dict):
            self.adapter = AdapterConfig(**self.adapter)
        self.validate()

    def validate(self) -> None:
        """Raise PissaError for any out-of-range option (before anything is loaded or written)."""
        for name in ("steps", "batch_size", "grad_accum", "eval_size", "threads", "warmup", "save_every", "val_size",
                     "max_new_tokens", "eval_batch_size"):
            value = getattr(self, name)
            low = 0 if name in ("steps", "warmup", "save_every", "val_size") else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise PissaError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise PissaError(f"--max-length must be >= 2 (a prompt token and a completion token), got {self.max_length!r}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise PissaError(f"--lr must be a positive number, got {self.lr}")
        if not self.max_grad_norm > 0 or self.weight_decay < 0 or self.reg_weight < 0:
            raise PissaError("--max-grad-norm must be > 0, --weight-decay and --reg-weight >= 0")
        if self.schedule not in ("constant", "cosine"):
            raise PissaError(f"--schedule must be constant or cosine, got {self.schedule!r}")
        if self.kind not in ("auto", "causal-lm", "seq-cls"):
            raise PissaError(f"--kind must be auto, causal-lm or seq-cls, got {self.kind!r}")
        if self.eval not in ("auto", "generate", "likelihood"):
            raise PissaError(f"--eval must be auto, generate or likelihood, got {self.eval!r}")
        if self.eval_data is not None and self.val_size:
            raise PissaError("--eval-data and --val-size both choose what is scored; pass one of them")

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
            raise PissaError(f"--methods needs distinct comma-separated method names, got {','.join(self.methods)!r}")
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
    """Output folder; default: runs/finetune-METHOD (finetune), runs/compare (compare)."""
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
            raise PissaError(f"--nproc must be an integer >= 1, got {self.nproc!r}")


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
    progress: bool = _resume_safe(default=True)
    """Show a progress bar."""


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
                raise PissaError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
        if isinstance(self.targets, str) and self.targets != "all-linear":
            self.targets = [self.targets]


@dataclass
class ExportConfig:
    """``pissa export``: a trained adapter -> a PEFT LoRA folder or a merged checkpoint."""

    adapter: str = field(metadata={POSITIONAL: True})
    """Adapter folder written by save_adapter / pissa finetune."""
    out: str
    """Output folder (replaced)."""
    model: str | None = None
    """The base model the adapter was made from (embedded name or folder); default: the one the adapter records."""
    kind: HeadKind = "auto"
    """Model head; auto: the one the adapter records, else detected like finetune."""
    merged: bool = False
    """Write a merged Hugging Face checkpoint (streamed shard by shard) instead of a PEFT LoRA."""
    max_rank: int | None = None
    """Truncate the PEFT LoRA to this rank (best rank-K approximation of each update; the error it adds is printed),
    e.g. to fit a server's max_lora_rank."""

    def __post_init__(self) -> None:
        if self.max_rank is not None and (self.merged or self.max_rank < 1):
            raise PissaError("--max-rank takes an integer >= 1 and applies to the PEFT export, not to --merged")


@dataclass
class QuantErrorConfig:
    """``pissa analyze quant-error``: NF4 error reduction of QPiSSA vs LoftQ vs QLoRA per projection."""

    model: str = "smollm2"
    """Embedded model (smollm2, minilm) or a local Hugging Face folder."""
    kind: HeadKind = "auto"
    """Model head; auto: the embedded model's, else from config.json's architectures."""
    rank: int = 16
    """Adapter rank r."""
    iters: list[int] = field(default_factory=lambda: [1, 5])
    """Comma-separated LoftQ / QPiSSA iteration counts to report."""
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
            raise PissaError("--rank, --iters and --sample must be >= 1")


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
            raise PissaError(f"--plot-layers must be >= 1, got {self.plot_layers}")


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
            raise PissaError(f"--k must be >= 1, got {self.k}")
        if not 0.0 < self.threshold <= 1.0:
            raise PissaError(f"--threshold must be in (0, 1], got {self.threshold}")


@dataclass
class GenerateConfig:
    """``pissa generate``: text from a model, with or without an adapter; ``--chat`` for a conversation."""

    prompt: str = field(default="-", metadata={POSITIONAL: True})
    """The prompt; "-" or none: read from stdin (with --chat: an optional first message, the turns then come from stdin)."""
    model: str | None = None
    """Embedded model (smollm2) or a local Hugging Face causal-LM folder; default: the base the adapter records, else smollm2."""
    adapter: str | None = None
    """Adapter folder (save_adapter / pissa finetune) applied to the model."""
    chat: bool = False
    """Interactive chat: one message a line from stdin, the history rendered with the tokenizer's chat template;
    Ctrl-C stops a reply, Ctrl-D (or Ctrl-C at the prompt) ends."""
    raw: bool = False
    """Give the prompt to the model as it is. Without it, a tokenizer that has a chat template (smollm2's has)
    renders the prompt as one user message (after --system) followed by the assistant's turn."""
    system: str | None = None
    """A system message opening the conversation (needs the chat template)."""
    max_new_tokens: int = 256
    """Most tokens generated per reply (fewer when the model's context is full)."""
    temperature: float = 0.0
    """Sampling temperature; 0: greedy decoding (deterministic)."""
    top_p: float = 1.0
    """Nucleus sampling with temperature > 0: sample among the most likely tokens holding this probability mass."""
    seed: int = 0
    """Seed of the sampling."""
    device: str = "auto"
    """Where the model runs: auto (CUDA when available, else CPU), cpu, cuda, cuda:N, mps."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the frozen base (a half one runs under autocast); an adapter made on another dtype is converted."""
    threads: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    """CPU threads (default: the cores available to this process)."""

    def __post_init__(self) -> None:
        for name, low in (("max_new_tokens", 1), ("threads", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise PissaError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise PissaError(f"--temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise PissaError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.chat and self.raw:
            raise PissaError("--chat renders the conversation with the chat template; drop --raw")
        if self.raw and self.system is not None:
            raise PissaError("--system needs the chat template, which --raw bypasses; drop one of them")
