"""Pieces the benchmark scripts share: the variants they compare, a timed training step, whole runs
measured in a fresh process, and an init's residual error relative to the optimal one.

Variants (:data:`OURS`, :data:`PEFT_LORA`, :data:`PEFT_PISSA`, :data:`FLOOR`) are built by
:func:`build` for one :class:`Setting` (base dtype, activation checkpointing) on one device:

- ours: ``load_model(dtype=...)`` then ``pissa.attach`` (factors in float32 whatever the base
  dtype) and, with checkpointing, ``pissa.runtime.devices.enable_gradient_checkpointing``;
- PEFT: the same load, then ``get_peft_model`` (its default ``autocast_adapter_dtype=True`` keeps
  the LoRA weights of a half-precision model in float32) and, with checkpointing, what a PEFT user
  does: ``gradient_checkpointing_enable()`` with Hugging Face's defaults (``activation_checkpointing_enable``
  from transformers 5 on, the same function without the deprecation warning) and
  ``enable_input_require_grads()``;
- the floor: the frozen base alone, its embedding output made to require grad so that backward
  runs through every layer (the part of a step that no adapter layer can avoid).

Every variant steps through :func:`pissa.training.loop.train_step` (forward under ``pissa.runtime.devices.autocast``
for a half base, completion-only loss, backward, clipping, AdamW); the floor does the forward and
the backward only. Whole runs (:func:`measure`) start from a small wrapper interpreter, so the
child's peak RSS (``os.wait4``) is its own and not the benchmark process's (Linux carries a
parent's high-water mark into a child across fork/vfork + exec); on CUDA the child also reports
``torch.cuda.max_memory_allocated``. :func:`stage_peaks` splits a fresh process's peak RSS by
stage (load, init, training steps).
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import pissa
from pissa.adapter.base_layers import dense_weight
from pissa.adapter.config import AdapterConfig
from pissa.data.batches import Batch, collate
from pissa.data.datasets import load_data
from pissa.data.encoding import encode_all
from pissa.data.loss import loss_sum
from pissa.runtime.devices import autocast, enable_gradient_checkpointing, torch_dtype
from pissa.runtime.hub import load_model, resolve_model
from pissa.training.config import RunConfig
from pissa.training.loop import make_optimizer, train_step
from pissa.training.schedule import step_indices

BENCHMARKS = Path(__file__).resolve().parent

OURS = "pissa (ours)"
PEFT_LORA = "peft lora"
PEFT_PISSA = "peft pissa"
FLOOR = "frozen base (floor)"
PEFT_INIT = {PEFT_LORA: True, PEFT_PISSA: "pissa_niter_4"}


@dataclass(frozen=True)
class Setting:
    """What a training step depends on besides the adapter: the frozen base's dtype and activation checkpointing."""

    dtype: str = "float32"
    checkpointing: bool = False

    @property
    def label(self) -> str:
        return self.dtype + (" + ckpt" if self.checkpointing else "")


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- variants ------------------------------------------------------------------------------------


def peft_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing as a PEFT user sets it: Hugging Face's defaults, plus input grads."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5 (the old name warns)
    if callable(enable):
        enable()
    else:
        model.gradient_checkpointing_enable()
    model.enable_input_require_grads()


def adapt(variant: str, model: nn.Module, setting: Setting, rank: int, **adapter: Any) -> nn.Module:
    """``model`` (loaded in ``setting.dtype``) made into ``variant``, in train mode (see the module docstring);
    ``adapter``: more :class:`~pissa.AdapterConfig` fields for ours (e.g. ``method="lora"``, ``quantize="nf4"``)."""
    if variant == OURS:
        pissa.attach(model, AdapterConfig(rank=rank, **adapter))
        if setting.checkpointing:
            enable_gradient_checkpointing(model)
    elif variant in PEFT_INIT:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear", lora_dropout=0.0,
                                                 init_lora_weights=PEFT_INIT[variant]))
        if setting.checkpointing:
            peft_checkpointing(model)
    elif variant == FLOOR:
        model.requires_grad_(False)
        model.enable_input_require_grads()
        if setting.checkpointing:
            enable_gradient_checkpointing(model)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return model.train()


def build(variant: str, setting: Setting, model_name: str, rank: int, device: torch.device, **adapter: Any) -> nn.Module:
    """:func:`adapt` of the model loaded in ``setting.dtype`` onto ``device``."""
    model, _ = load_model(model_name, dtype=torch_dtype(setting.dtype))
    nn.Module.to(model, device)
    return adapt(variant, model, setting, rank, **adapter)


def training_batch(model_name: str, batch_size: int, max_length: int, device: torch.device) -> Batch:
    """The first batch of a seed-0 run on the embedded Rotten Tomatoes reviews."""
    from transformers import AutoTokenizer

    data = load_data("rotten_tomatoes")
    tok = AutoTokenizer.from_pretrained(resolve_model(model_name), local_files_only=True)  # the tokenizer alone
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id  # load_model's rule
    train = encode_all(tok, data.train[: 64 * batch_size], data.labels, "causal-lm", max_length)
    return collate([train[i] for i in step_indices(len(train), 0, 0, batch_size)], pad, "causal-lm", device)


def step_config(setting: Setting, batch: Batch, threads: int) -> RunConfig:
    """The RunConfig :func:`pissa.training.loop.train_step` reads (dtype, clipping, regularizer)."""
    return RunConfig(dtype=setting.dtype, batch_size=batch.input_ids.shape[0], lr=1e-5, threads=threads)  # type: ignore[arg-type]


@dataclass
class Trainee:
    """A variant's model and optimizer (None for the floor, which does forward and backward only)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None

    @classmethod
    def of(cls, model: nn.Module, cfg: RunConfig) -> Trainee:
        trainable = any(p.requires_grad for p in model.parameters())
        return cls(model, make_optimizer(model, cfg) if trainable else None)

    def step(self, batch: Batch, cfg: RunConfig) -> None:
        """One training step (the floor: forward and backward)."""
        if self.optimizer is not None:
            train_step(self.model, [batch], "causal-lm", self.optimizer, cfg.learning_rate, cfg)
            return
        with autocast(batch.input_ids.device, torch_dtype(cfg.dtype)):
            loss = loss_sum(self.model, batch, "causal-lm") / batch.targets
        loss.backward()
        loss.item()  # waits for the work, as train_step's loss.item() does


@dataclass
class Timings:
    """Per-variant step times (s) of the timed rounds, and each round's order."""

    times: dict[str, list[float]]
    orders: list[list[str]]
    step_peak: dict[str, list[int]]
    """CUDA only: bytes allocated above the step's starting point at its peak (empty lists on the CPU)."""

    def median(self, variant: str) -> float:
        return statistics.median(self.times[variant])


def interleaved_times(trainees: dict[str, Trainee], batch: Batch, cfg: RunConfig, rounds: int,
                      log: Callable[[str], None] | None = None) -> Timings:
    """``rounds`` timed rounds after one untimed warm-up round; in round i every variant takes one
    step on ``batch``, in the order of the variants rotated by i (so a changing load hits all alike)."""
    names = list(trainees)
    device = batch.input_ids.device
    out = Timings({v: [] for v in names}, [], {v: [] for v in names})
    for i in range(rounds + 1):
        order = names[i % len(names):] + names[: i % len(names)]
        for v in order:
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                resident = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            trainees[v].step(batch, cfg)
            sync(device)
            seconds = time.perf_counter() - start
            if i:
                out.times[v].append(seconds)
                if device.type == "cuda":
                    out.step_peak[v].append(torch.cuda.max_memory_allocated(device) - resident)
        if i:
            out.orders.append(order)
        if log is not None:
            log(f"round {i}: " + ", ".join(f"{v} {out.times[v][-1]:.2f} s" for v in names) if i else "round 0 (warm-up) done")
    return out


def saved_activation_bytes(model: nn.Module, batch: Batch, dtype: torch.dtype) -> int:
    """Bytes of the distinct storages autograd keeps for backward during one forward pass (frozen weights excluded).

    Exact without activation checkpointing; with it, the checkpointed blocks keep their inputs
    outside autograd's saved tensors, so this would undercount (callers do not use it there).
    """
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(batch.input_ids.device, dtype):
        loss = loss_sum(model, batch, "causal-lm")
    loss.backward()
    model.zero_grad(set_to_none=True)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params)


# --- whole runs in a fresh process ------------------------------------------------------------------

_WRAPPER = """
import json, os, subprocess, sys, time
def status(pid):
    out = {}
    try:
        for line in open(f"/proc/{pid}/status"):
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out
t0 = time.perf_counter()
with open(sys.argv[2], "wb") as log:
    proc = subprocess.Popen(sys.argv[3:], stdout=log, stderr=subprocess.STDOUT)
    peak = {}
    while True:
        pid, code, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        for key, value in status(proc.pid).items():
            peak[key] = max(peak.get(key, 0), value)
        time.sleep(0.005)
json.dump([time.perf_counter() - t0, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(code), peak], open(sys.argv[1], "w"))
"""
"""Runs ``argv[3:]`` with its output in ``argv[2]``; writes [seconds, peak RSS, exit code, sampled peaks] to ``argv[1]``."""

_CUDA_PEAK = """
import atexit, json, os, runpy, sys
def report():
    torch = sys.modules.get("torch")
    used = torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized()
    with open(os.environ["BENCH_CUDA_PEAK"], "w") as f:
        json.dump(torch.cuda.max_memory_allocated() if used else None, f)
atexit.register(report)
if sys.argv[1] == "-m":
    sys.argv = sys.argv[2:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
    runpy.run_path(sys.argv[0], run_name="__main__")
"""
"""``python -c _CUDA_PEAK -m MODULE ARGS`` or ``... SCRIPT ARGS``: runs it, then writes its
``torch.cuda.max_memory_allocated`` (null when CUDA was never used) to ``$BENCH_CUDA_PEAK``."""


@dataclass
class Measured:
    """A command run in a fresh process: wall seconds, peak RSS of the largest process of its tree
    (bytes, ``os.wait4``), sampled peaks of its own RssAnon / RssFile, CUDA peak (bytes, None
    without CUDA), its exit code and, when it failed, the last line it printed."""

    seconds: float
    rss: int
    anon: int | None
    file: int | None
    cuda_peak: int | None
    code: int
    failure: str | None
    log: str

    @property
    def ok(self) -> bool:
        return self.code == 0


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def measure(cmd: Sequence[str], env: dict[str, str] | None = None, cuda_peak: bool = False) -> Measured:
    """Run ``cmd`` from the small wrapper interpreter (see the module docstring); never raises for a failing command.

    ``cuda_peak``: ``cmd`` is ``[python, -m, MODULE, ...]`` or ``[python, SCRIPT, ...]``, run through
    the CUDA-peak prelude.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        result, log, peak = Path(tmp, "result.json"), Path(tmp, "log.txt"), Path(tmp, "cuda.json")
        if cuda_peak:
            cmd = [cmd[0], "-c", _CUDA_PEAK, *cmd[1:]]
            env["BENCH_CUDA_PEAK"] = str(peak)
        subprocess.run([sys.executable, "-c", _WRAPPER, str(result), str(log), *cmd], env=env, check=True)
        seconds, rss, code, sampled = json.loads(result.read_text())
        text = log.read_text(errors="replace")
        cuda = json.loads(peak.read_text()) if peak.is_file() else None
    return Measured(seconds, rss, sampled.get("RssAnon"), sampled.get("RssFile"), cuda, code,
                    None if code == 0 else last_line(text), text)


FINETUNE_RUNS = ("pissa", "lora", PEFT_LORA, PEFT_PISSA)
"""Whole runs compared: ``pissa finetune --method pissa`` / ``--method lora``, and the PEFT equivalents."""


def finetune_command(run: str, setting: Setting, options: Sequence[str]) -> list[str]:
    """``pissa finetune --method RUN`` (ours) or, for a PEFT variant, ``benchmarks/_peft_finetune.py`` with the same options."""
    ckpt = ["--gradient-checkpointing"] if setting.checkpointing else []
    common = ["--dtype", setting.dtype, *ckpt, *options]
    if run in PEFT_INIT:
        method = "lora" if run == PEFT_LORA else "pissa"
        return [sys.executable, str(BENCHMARKS / "_peft_finetune.py"), "--method", method, *common]
    return [sys.executable, "-m", "pissa", "finetune", "--method", run, *common]


def final_loss(out: Path) -> float | None:
    """The last training loss in ``out/metrics.json`` (None without one)."""
    path = out / "metrics.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())["train_loss"][-1][1]


def finetune_options(*, model: str, rank: int, steps: int, batch_size: int, max_length: int, eval_size: int,
                     threads: int, device: torch.device) -> list[str]:
    """The options every whole run shares (no checkpoints mid-run)."""
    return ["--model", model, "--rank", str(rank), "--steps", str(steps), "--batch-size", str(batch_size),
            "--max-length", str(max_length), "--eval-size", str(eval_size), "--threads", str(threads),
            "--device", str(device), "--save-every", "0"]


@dataclass
class WholeRun:
    """A whole run's measurements and its last training loss (None when it failed)."""

    measured: Measured
    loss: float | None

    def peak(self, cuda: bool) -> int | None:
        """The memory the targets compare: CUDA's peak allocation on a GPU, else peak RSS (None for a failed run)."""
        if not self.measured.ok:
            return None
        return self.measured.cuda_peak if cuda else self.measured.rss


def whole_run(run: str, setting: Setting, options: Sequence[str], out: Path, threads: int, cuda: bool) -> WholeRun:
    """:func:`finetune_command` into ``out``, measured in a fresh process (``OMP_NUM_THREADS=threads``)."""
    m = measure(finetune_command(run, setting, [*options, "--out", str(out)]), env={"OMP_NUM_THREADS": str(threads)},
                cuda_peak=cuda)
    return WholeRun(m, final_loss(out))


# --- where a run's memory goes --------------------------------------------------------------------------

STAGES = ("imports and data", "load", "init", "step 1", "step 2")
"""The stages of :func:`stage_peaks`, each with its own high-water mark."""


def _proc_memory() -> dict[str, int]:
    """This process's VmHWM (peak RSS since the last reset), VmRSS, RssAnon and RssFile, bytes (Linux)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _stages_child(argv: list[str]) -> None:
    """The child of :func:`stage_peaks`: ``OUT VARIANT METHOD DTYPE MODEL RANK BATCH MAX_LENGTH THREADS DEVICE``."""
    out, variant, method, dtype, model_name, rank, batch_size, max_length, threads, device_name = argv
    torch.set_num_threads(int(threads))
    device = torch.device(device_name)
    setting = Setting(dtype)
    batch = training_batch(model_name, int(batch_size), int(max_length), device)
    marks: dict[str, dict[str, int | None]] = {}

    def mark(stage: str) -> None:
        gc.collect()
        marks[stage] = {**_proc_memory(), "cuda_peak": None}
        if device.type == "cuda":
            marks[stage]["cuda_peak"] = torch.cuda.max_memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS, so the next stage's peak is its own

    mark(STAGES[0])
    model, _ = load_model(model_name, dtype=torch_dtype(dtype))
    nn.Module.to(model, device)
    mark(STAGES[1])
    model = adapt(variant, model, setting, int(rank), **({"method": method} if variant == OURS else {}))
    mark(STAGES[2])
    cfg = step_config(setting, batch, int(threads))
    trainee = Trainee.of(model, cfg)
    for stage in STAGES[3:]:
        trainee.step(batch, cfg)
        mark(stage)
    Path(out).write_text(json.dumps(marks))


def stage_peaks(variant: str, method: str, setting: Setting, *, model: str, rank: int, batch_size: int, max_length: int,
                threads: int, device: torch.device) -> dict[str, dict[str, int | None]]:
    """Per stage (:data:`STAGES`) of a fresh process that loads, adapts and steps twice: its peak RSS in the
    stage (``VmHWM``, reset between stages), RSS / RssAnon / RssFile at the stage's end and, on CUDA, the
    stage's peak allocation. ``method``: ours' AdapterConfig method (PEFT variants ignore it)."""
    if setting.checkpointing:
        raise ValueError("stage_peaks measures settings without activation checkpointing")
    code = f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); import _common; _common._stages_child(sys.argv[1:])"
    with tempfile.TemporaryDirectory(prefix="bench-stages-") as tmp:
        out = Path(tmp, "stages.json")
        args = [variant, method, setting.dtype, model, rank, batch_size, max_length, threads, device]
        done = subprocess.run([sys.executable, "-c", code, str(out), *map(str, args)], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        if done.returncode != 0:
            raise RuntimeError(f"stage_peaks({variant}, {method}, {setting.label}) failed: {last_line(done.stderr)}")
        return json.loads(out.read_text())


# --- init error ------------------------------------------------------------------------------------


def optimal_residuals(model: nn.Module, names: list[str], rank: int) -> dict[str, float]:
    """Exact sqrt(sum of discarded S^2) per layer, from float64 singular values."""
    out = {}
    for n in names:
        S = torch.linalg.svdvals(dense_weight(model.get_submodule(n)).detach().double())
        out[n] = S[rank:].pow(2).sum().sqrt().item()
    return out


def timed_init(model: nn.Module, rank: int, targets: str | list[str],
               peft_init: str | None = None, cpu: list[float] | None = None) -> tuple[float, dict[str, torch.Tensor]]:
    """(seconds of the init call alone, {layer name: residual weight}) of one init on ``model``:
    ``pissa.attach`` when ``peft_init`` is None, else ``get_peft_model(init_lora_weights=peft_init)``.
    The clock stops after the device finished the work (CUDA synchronize). ``cpu``: gets the process's CPU
    seconds of the same region appended (less sensitive than wall time to other processes on a shared CPU)."""
    from peft import LoraConfig, get_peft_model

    device = next(model.parameters()).device
    sync(device)
    if peft_init is None:
        cfg = pissa.AdapterConfig(rank=rank, targets=targets)
        start, cpu_start = time.perf_counter(), time.process_time()
        pissa.attach(model, cfg)
        sync(device)
        seconds = time.perf_counter() - start
        if cpu is not None:
            cpu.append(time.process_time() - cpu_start)
        return seconds, {n: dense_weight(layer.residual).detach() for n, layer in pissa.adapted_layers(model)}
    lora = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=peft_init, target_modules=targets)  # type: ignore[arg-type]
    start, cpu_start = time.perf_counter(), time.process_time()
    peft_model = get_peft_model(model, lora)
    sync(device)
    seconds = time.perf_counter() - start
    if cpu is not None:
        cpu.append(time.process_time() - cpu_start)
    prefix = "base_model.model."
    residuals = {
        n[len(prefix):]: m.base_layer.weight.detach()
        for n, m in peft_model.named_modules()
        if hasattr(m, "base_layer") and hasattr(m, "lora_A") and n.startswith(prefix)
    }
    return seconds, residuals


def residual_ratios(residuals: dict[str, torch.Tensor], optimal: dict[str, float]) -> list[float]:
    """||W - B A||_F / optimal per layer (1.0 = the exact rank-r SVD), in ``optimal``'s layer order."""
    assert sorted(residuals) == sorted(optimal), "the init adapted a different set of layers"
    return [residuals[n].double().norm().item() / optimal[n] for n in optimal]
