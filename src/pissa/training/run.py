"""The fine-tuning loop and the ``pissa finetune`` / ``pissa compare`` commands.

One run, top to bottom::

    prepare(cfg)              load model + data, encode, attach (or load a checkpoint): all validation
    evaluate                  test loss / accuracy before training
    for step in range(steps): train_step(micro-batches of step_indices(seed, step))   AdamW, clipping
        checkpoint every --save-every steps (and on Ctrl-C)
    evaluate                  after training; write metrics.json, loss.png, adapter/

The batch of step s is a pure function of ``(seed, s)`` (:func:`step_indices`) and the
learning rate a pure function of s (:func:`lr_at`), so a resumed run (or a data-parallel one)
sees exactly the batches and rates of an uninterrupted single run: only the adapter, the
optimizer moments, the RNG state and the step number need saving.

Outputs appear atomically: a run works in ``OUT.partial/`` (checkpoints included) and renames
it to ``OUT`` when done; bad input is caught before ``OUT.partial`` exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from pissa import options
from pissa.adapter.attach import adapted_layers, attach, regularization, trainable_parameters
from pissa.calibration.collect import calibrate, calibration_batches
from pissa.data import datasets as data_mod
from pissa.data.datasets import load_data
from pissa.data.encoding import Batch, Encoded, Kind, collate, collate_packed, encode_all, evaluate, loss_sum
from pissa.errors import PissaError
from pissa.files import adapter_dir as io
from pissa.inference import decoding as generation
from pissa.methods.registry import METHODS
from pissa.runtime import distributed, hub
from pissa.runtime.devices import autocast, enable_gradient_checkpointing, grad_scaler, resolve_device, torch_dtype
from pissa.training.config import CALIBRATION_SAMPLES, CompareConfig, Launch, RunConfig
from pissa.training.report import plot_losses, write_report

CHECKPOINT = "checkpoint"


# --- data order and learning rate: pure functions of (seed, step) -----------------------------


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n, generator=g).tolist())


def step_indices(n: int, seed: int, step: int, count: int) -> list[int]:
    """Training-example indices of step ``step`` (``count`` = batch size x grad accumulation).

    The data is read as a stream of epochs, each a permutation of ``range(n)`` seeded by
    ``(seed, epoch)``; step s takes stream positions ``[s * count, (s + 1) * count)``.
    """
    positions = range(step * count, (step + 1) * count)
    return [_epoch_order(n, seed, p // n)[p % n] for p in positions]


def lr_at(step: int, cfg: RunConfig) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up over ``warmup`` steps from
    ``lr / warmup``, then constant or cosine decay to 0 at ``steps``."""
    lr = cfg.learning_rate
    if step < cfg.warmup:
        return lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return lr
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


# --- the model and the data of a run -----------------------------------------------------------


@dataclass
class Session:
    """A loaded, adapted model with its encoded data, ready to train."""

    cfg: RunConfig
    kind: Kind
    model: nn.Module
    tokenizer: Any
    dataset: data_mod.Dataset
    train: list[Encoded]
    test: list[Encoded]
    label_ids: list[list[int]] | None
    device: torch.device
    eval_kind: generation.EvalKind = "likelihood"
    """How :meth:`evaluate` scores (``--eval`` resolved by :func:`pissa.generation.choose_eval`)."""
    references: list[str] = field(default_factory=list)
    """The reference completion of each ``test`` item (generation evaluation)."""
    sharded: bool = False
    """The model is sharded over the processes (FSDP2, ``--fsdp``)."""
    start: dict[str, float] | None = None
    """The start check of a fresh adapter (:func:`start_check`); None when resumed or fully fine-tuned."""

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def dtype(self) -> torch.dtype:
        """The frozen base's dtype (the autocast dtype when it is a half type)."""
        return torch_dtype(self.cfg.dtype)

    def batch(self, indices: Sequence[int]) -> Batch:
        """The training examples ``indices`` as one batch: padded rows, or packed ones (``--pack``)."""
        items = [self.train[i] for i in indices]
        if self.cfg.pack:
            return collate_packed(items, self.pad_id, self.cfg.max_length, self.dtype, self.device)
        return collate(items, self.pad_id, self.kind, self.device)

    def evaluate(self) -> dict[str, float]:
        """Test loss and accuracy; under torchrun each rank scores its share and the means are combined.

        A sharded model runs every forward on all ranks together (each all-gathers its blocks),
        so there every rank scores all items, in the same batches, and no combining is needed.
        """
        items = self.test if self.sharded else distributed.my_share(self.test)
        references = self.references if self.sharded else distributed.my_share(self.references)
        with autocast(self.device, self.dtype):
            if not items:
                result = {"loss": 0.0, "accuracy": 0.0}
            elif self.eval_kind == "generate":
                result = generation.evaluate_generation(
                    self.model, self.tokenizer, items, references, pad_id=self.pad_id,
                    max_new_tokens=self.cfg.max_new_tokens, batch_size=self.cfg.eval_batch_size)
            else:
                result = evaluate(self.model, items, self.dataset.labels, self.label_ids, self.kind, self.pad_id,
                                  batch_size=self.cfg.eval_batch_size)
        if self.sharded:
            return result
        loss_w, acc_w = self.metric_weights(items)
        loss, loss_n, acc, acc_n = distributed.all_sum([result["loss"] * loss_w, loss_w, result["accuracy"] * acc_w, acc_w])
        return {"loss": loss / loss_n, "accuracy": acc / acc_n}

    def metric_weights(self, items: Sequence[Encoded]) -> tuple[float, float]:
        """What :func:`~pissa.objective.evaluate` averages over: (loss terms, accuracy terms) of ``items``."""
        if self.kind == "seq-cls":
            return len(items), len(items)
        if self.eval_kind == "generate":  # target tokens for the loss, examples for exact match
            return sum(e.n_targets for e in items), len(items)
        if self.dataset.labels is None:  # free text: every completion token, for both
            tokens = sum(e.n_targets for e in items)
            return tokens, tokens
        assert self.label_ids is not None
        tokens = 0
        for e in items:
            assert e.label is not None  # labelled data: every item indexes a label
            tokens += len(self.label_ids[e.label])
        return tokens, len(items)


def prepare(cfg: RunConfig, checkpoint: Path | None = None, sharded: bool = False) -> Session:
    """Load, encode and adapt (``checkpoint``: restore its adapter instead of a fresh attach);
    ``sharded``: then shard the model over the processes (:func:`pissa.distributed.shard`).

    Every user error surfaces here, before any output exists.
    """
    cfg.validate()
    if sharded and distributed.world()[1] == 1:
        raise PissaError("--fsdp shards the model over processes: add --nproc N (N >= 2) or launch under torchrun")
    if sharded and cfg.reg_weight > 0:
        raise PissaError("--reg-weight (SORSA's penalty on whole factors) does not run on sharded factors; "
                         "drop --fsdp (data-parallel --nproc N works) or set --reg-weight 0")
    if cfg.batch_size < distributed.world()[1]:
        raise PissaError(f"--batch-size {cfg.batch_size} is smaller than the {distributed.world()[1]} processes; "
                         "each process takes a share of every micro-batch")
    torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    kind = hub.resolve_kind(cfg.model, cfg.kind)
    dataset = load_data(cfg.data, cfg.val_size, cfg.eval_data)
    if kind == "seq-cls" and cfg.pack:
        raise PissaError(f"--pack joins examples of a causal LM; {cfg.model} is a sequence classifier: drop --pack")
    if kind == "seq-cls" and dataset.labels is None:
        raise PissaError(f"{cfg.model} is a sequence classifier: it needs labelled data (text,label columns), "
                         f"but {cfg.data} has prompt,completion")
    torch.manual_seed(cfg.seed)  # a seq-cls head is drawn from the global RNG
    num_labels = len(dataset.labels) if kind == "seq-cls" and dataset.labels else None
    model, tokenizer = hub.load_model(cfg.model, kind=kind, num_labels=num_labels, dtype=torch_dtype(cfg.dtype))
    nn.Module.to(model, device)  # before attach, so the SVD runs where the weights are
    train = encode_all(tokenizer, dataset.train, dataset.labels, kind, cfg.max_length)
    test = encode_all(tokenizer, dataset.test[: cfg.eval_size], dataset.labels, kind, cfg.max_length)
    references = [e.completion for e in dataset.test[: cfg.eval_size]]
    eval_kind = generation.choose_eval(cfg.eval, kind, dataset.labels, references, cfg.eval_data or cfg.data)
    label_ids = None
    if kind == "causal-lm" and dataset.labels is not None:
        label_ids = [list(tokenizer(label, add_special_tokens=False)["input_ids"]) for label in dataset.labels]
    start = None
    if checkpoint is not None:
        restore_trained(model, checkpoint)
    elif not METHODS[cfg.method].adapter:  # full fine-tuning: every weight trains
        model.requires_grad_(True)
    else:
        first = collate([train[i] for i in step_indices(len(train), cfg.seed, 0, cfg.batch_size)], tokenizer.pad_token_id,
                        kind, device)
        base_loss = batch_loss(model, first, kind, torch_dtype(cfg.dtype))
        attach(model, cfg.adapter, progress=True)
        if kind == "seq-cls":
            mark_head_trainable(model)
        start = start_check(cfg, base_loss, batch_loss(model, first, kind, torch_dtype(cfg.dtype)))
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if sharded:
        distributed.shard(model, device)
    model.train()
    return Session(cfg, kind, model, tokenizer, dataset, train, test, label_ids, device, eval_kind, references, sharded, start)


START_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
"""Largest relative change of the first batch's loss that attach may cause with an exact method, per base dtype:
the residual ``W - s B0 A0`` is rounded to that dtype once (measured: benchmarks/results/init_exactness.md)."""


@torch.no_grad()
def batch_loss(model: nn.Module, batch: Batch, kind: Kind, dtype: torch.dtype) -> float:
    """Mean per-target loss of ``batch`` in eval mode (no dropout), under the run's autocast."""
    was_training = model.training
    model.eval()
    with autocast(batch.input_ids.device, dtype):
        loss = loss_sum(model, batch, kind).item() / max(1, batch.targets)
    model.train(was_training)
    return loss


def start_check(cfg: RunConfig, base: float, adapted: float) -> dict[str, float]:
    """Compare the first batch's loss before and after attach; a PissaError when a method that promises
    an exact start (:attr:`~pissa.decompose.Method.exact_start`, without ``quantize``) moved it by more
    than the dtype allows. A 4-bit residual or a method that starts elsewhere by design (LoRA-SB)
    reports its measured distance instead."""
    gap = abs(adapted - base) / max(abs(base), 1e-8)
    tolerance = START_TOLERANCE[cfg.dtype]
    exact = cfg.adapter.quantize is None and METHODS[cfg.method].exact_start
    if exact and not gap <= tolerance:
        raise PissaError(f"inexact init: attaching {cfg.method} moved the first batch's loss from {base:.4f} to {adapted:.4f} "
                         f"(relative {gap:.2e} > {tolerance:g} allowed in {cfg.dtype}); the adapted model must start where "
                         "the base is: report this with the model and options")
    if distributed.is_main():
        note = "" if exact else " (starts off the base by design)"
        print(f"{cfg.method}: start check: first batch loss {base:.4f} (base) -> {adapted:.4f} (adapted), "
              f"relative change {gap:.1e}{note}", flush=True)
    return {"base_loss": base, "adapted_loss": adapted, "relative_change": gap}


LR_WARN = 10.0
"""Warn when the learning rate exceeds the method's measured default by this factor."""


def lr_warning(cfg: RunConfig) -> str | None:
    """A warning when ``--lr`` is far above the method's measured default (PiSSA's large principal factors
    diverge at LoRA's rates); None otherwise."""
    method = METHODS[cfg.method]
    if cfg.lr is None or method.default_lr is None or cfg.lr <= LR_WARN * method.default_lr:
        return None
    return (f"warning: --lr {cfg.lr:g} is {cfg.lr / method.default_lr:.0f}x {cfg.method}'s measured default "
            f"{method.default_lr:g}; if the loss rises or the gradient norm grows, lower it")


def mark_head_trainable(model: nn.Module) -> list[str]:
    """Make a classifier's freshly initialised head (``classifier``/``score`` modules) trainable;
    it is saved with the adapter. Returns the parameter names."""
    names = [n for n, p in model.named_parameters() if any(part in ("classifier", "score") for part in n.split("."))]
    for n, p in model.named_parameters():
        if n in names:
            p.requires_grad_(True)
    return names


# --- one optimizer step ------------------------------------------------------------------------


def make_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr_at(0, cfg), weight_decay=cfg.weight_decay)


def train_step(model: nn.Module, micro_batches: Sequence[Batch], kind: Kind, optimizer: torch.optim.Optimizer,
               lr: float, cfg: RunConfig, scaler: torch.amp.GradScaler | None = None) -> tuple[float, float]:
    """Accumulate gradients over ``micro_batches``, clip, and take one AdamW step at ``lr``.

    Each micro-batch's summed loss is divided by the step's total number of targets, so the
    gradient is that of the mean loss over the whole step whatever the split (over micro-batches
    and, under torchrun, over ranks: ``model`` is then DDP and each rank holds a share). Adds
    ``reg_weight * pissa.regularization(model)`` (SORSA) when ``reg_weight > 0``. The forward runs
    under autocast for a half-precision base (``cfg.dtype``); ``scaler`` (float16) scales the loss
    before backward and unscales the gradients before clipping (a step with inf/NaN gradients is
    skipped). Returns the step's mean loss and the gradient's global L2 norm before clipping.
    """
    device, dtype = micro_batches[0].input_ids.device, torch_dtype(cfg.dtype)
    ranks = distributed.world()[1]
    total = distributed.all_sum([sum(b.targets for b in micro_batches)])[0]
    step_loss = 0.0
    for i, b in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with distributed.no_sync(model, skip=not last):  # DDP all-reduces in the last backward only
            with autocast(device, dtype):
                loss = loss_sum(model, b, kind) / total
            step_loss += loss.item()
            if last and cfg.reg_weight > 0:
                reg = regularization(model)
                if reg.requires_grad:  # a constant zero (no graph) for methods without orthonormal factors
                    loss = loss + cfg.reg_weight * reg / ranks
            scaled = loss * ranks  # DDP averages over ranks; times ranks: the sum, i.e. the whole step's gradient
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
    step_loss = distributed.all_sum([step_loss])[0]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = float(distributed.full(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)))
    for group in optimizer.param_groups:
        group["lr"] = lr
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, norm


# --- checkpoints (no pickle: safetensors + JSON) -----------------------------------------------


@dataclass
class Progress:
    """The loop's state besides the model and optimizer."""

    step: int = 0
    train_loss: list[list[float]] = field(default_factory=list)
    grad_norm: list[list[float]] = field(default_factory=list)
    """``[step, L2 norm of the whole gradient before clipping]`` per step."""
    eval_before: dict[str, float] | None = None
    seconds: float = 0.0
    """Wall time of the run so far, every session (load, evaluation, training) included."""
    train_seconds: float = 0.0
    """Time spent in training steps."""
    tokens: int = 0

    def __post_init__(self) -> None:
        self._mark = time.perf_counter()

    def tick(self) -> None:
        """Add the wall time since the last tick (or since this session started) to ``seconds``."""
        now = time.perf_counter()
        self.seconds += now - self._mark
        self._mark = now


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, progress: Progress,
                    scaler: torch.amp.GradScaler | None = None) -> None:
    """Write ``path`` atomically: ``adapter/`` (save_adapter), ``state.safetensors`` (optimizer
    moments, torch RNG states), ``state.json`` (step, losses, optimizer hyper-parameters, the
    float16 gradient scaler's state).

    Under torchrun every rank calls this and rank 0 writes. A sharded model's adapter and optimizer
    moments are gathered whole, so the checkpoint is the same whether the run was sharded or not.
    """
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    for i, state in sd["state"].items():
        for k, v in state.items():
            tensors[f"optimizer.{i}.{k}"] = distributed.full(v.detach()).contiguous().cpu()
    trained = gather_trained(model)
    progress.tick()
    if not distributed.is_main():
        return
    doc = {"progress": dataclasses.asdict(progress), "param_groups": sd["param_groups"],
           "scaler": None if scaler is None else scaler.state_dict()}
    with io.atomic_dir(path) as tmp:
        if isinstance(trained, io.AdapterContents):
            trained.write(tmp / "adapter")
        else:
            save_file(trained, str(tmp / WEIGHTS))
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(doc))


WEIGHTS = "weights.safetensors"
"""A full fine-tuning checkpoint's trained weights (an adapter run's checkpoint holds ``adapter/`` instead)."""


def gather_trained(model: nn.Module) -> io.AdapterContents | dict[str, Tensor]:
    """What a checkpoint keeps of the model, whole and on the CPU (a collective for a sharded model):
    its adapter, or, with full fine-tuning, every trainable weight."""
    if any(True for _ in adapted_layers(model)):
        return io.gather_adapter(model)
    return {n: distributed.full(p.detach()).contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def restore_trained(model: nn.Module, checkpoint: Path) -> None:
    """Put a checkpoint's adapter (or fully fine-tuned weights) into the freshly loaded base ``model``."""
    if (checkpoint / "adapter").is_dir():
        io.load_adapter(model, checkpoint / "adapter")
        return
    weights = load_file(str(checkpoint / WEIGHTS))
    model.requires_grad_(True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weights[name])


def save_model(model: nn.Module, tokenizer: Any, path: Path) -> None:
    """The fully fine-tuned model as a Hugging Face folder (``save_pretrained`` + tokenizer), written
    atomically by rank 0 (a sharded model is gathered first, on every rank)."""
    state = {n: distributed.full(t.detach()).contiguous().cpu() for n, t in model.state_dict().items()}
    if distributed.is_main():
        with io.atomic_dir(path) as tmp:
            model.save_pretrained(tmp, state_dict=state)  # type: ignore[operator]
            tokenizer.save_pretrained(tmp)


def load_checkpoint(path: Path, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None) -> Progress:
    """Restore the optimizer, scaler and RNG states from ``path`` (the adapter is restored by :func:`prepare`).

    The moments of a sharded parameter are cut to this rank's shard.
    """
    doc = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "state.safetensors"))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state: dict[int, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith("optimizer."):
            _, i, k = key.split(".", 2)
            param = params[int(i)]
            state.setdefault(int(i), {})[k] = distributed.like(t, param) if t.shape == param.shape else t
    optimizer.load_state_dict({"state": state, "param_groups": doc["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    if scaler is not None and doc.get("scaler"):
        scaler.load_state_dict(doc["scaler"])
    return Progress(**doc["progress"])


class Abort(KeyboardInterrupt):
    """A second Ctrl-C during a step: stop at once, without a checkpoint of a half-done step."""


@contextmanager
def deferred_interrupt() -> Iterator[list[bool]]:
    """Within the block, the first Ctrl-C only sets ``flag[0]`` (the loop checkpoints at the end
    of the step and stops); a second one raises :class:`Abort` at once."""
    flag = [False]

    def handler(signum, frame):
        if flag[0]:
            raise Abort
        flag[0] = True

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: leave Ctrl-C alone
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


# --- a whole run -------------------------------------------------------------------------------


def train(session: Session, workdir: Path, progress: Progress, optimizer: torch.optim.Optimizer,
          scaler: torch.amp.GradScaler | None = None, show: bool = True) -> Progress:
    """Run steps ``progress.step .. steps - 1``, checkpointing into ``workdir/checkpoint``.

    On Ctrl-C: finish the current step, checkpoint, raise KeyboardInterrupt.
    """
    cfg, model = session.cfg, distributed.data_parallel(session.model)
    count = cfg.batch_size * cfg.grad_accum
    bar = tqdm(total=cfg.steps, initial=progress.step, desc=f"{cfg.method} lr={cfg.learning_rate:g}",
               unit="step", disable=not show or not distributed.is_main(), dynamic_ncols=True)
    smooth = None
    with deferred_interrupt() as interrupted:
        while progress.step < cfg.steps:
            start = time.perf_counter()
            idx = step_indices(len(session.train), cfg.seed, progress.step, count)
            micro = [session.batch(distributed.my_share(idx[j : j + cfg.batch_size])) for j in range(0, count, cfg.batch_size)]
            loss, norm = train_step(model, micro, session.kind, optimizer, lr_at(progress.step, cfg), cfg, scaler)
            if not math.isfinite(loss):
                raise PissaError(f"the loss diverged (became {loss}) at step {progress.step + 1}; lower --lr "
                                 f"(now {cfg.learning_rate:g})")
            progress.step += 1
            tokens = int(distributed.all_sum([sum(b.tokens for b in micro)])[0])
            progress.tokens += tokens
            progress.train_loss.append([progress.step, loss])
            progress.grad_norm.append([progress.step, norm])
            elapsed = time.perf_counter() - start
            progress.train_seconds += elapsed
            smooth = loss if smooth is None else 0.9 * smooth + 0.1 * loss
            bar.set_postfix(loss=f"{smooth:.4f}", grad_norm=f"{norm:.3g}", tok_s=f"{tokens / elapsed:.0f}")
            bar.update(1)
            due = cfg.save_every and progress.step % cfg.save_every == 0 and progress.step < cfg.steps
            stop = distributed.any_rank(interrupted[0])  # all ranks stop at the same step
            if due or stop:
                save_checkpoint(workdir / CHECKPOINT, session.model, optimizer, progress, scaler)
            if stop:
                bar.close()
                raise KeyboardInterrupt
    bar.close()
    return progress


def run(cfg: RunConfig, workdir: Path, resume: bool = False, show: bool = True, sharded: bool = False,
        base_eval: dict[str, float] | None = None) -> dict[str, Any]:
    """One fine-tuning run in ``workdir`` (created here, after validation); returns the metrics.

    Writes ``workdir/{config.yaml, metrics.json, loss.png, adapter/}``; ``checkpoint/`` exists
    while the run is unfinished. ``resume``: continue from ``workdir/checkpoint``. ``sharded``:
    FSDP2 over the torchrun processes (``--fsdp``). ``base_eval``: the evaluation of a model that
    starts where this one does (:func:`starts_at_base`), reported as ``eval_before`` instead of
    evaluating again (``pissa compare`` evaluates the base once).
    """
    started = time.perf_counter()
    ckpt = workdir / CHECKPOINT
    session = prepare(cfg, ckpt if resume else None, sharded)
    warning = lr_warning(cfg)
    if warning and distributed.is_main():
        print(warning, file=sys.stderr, flush=True)
    workdir.mkdir(parents=True, exist_ok=True)
    if not resume and distributed.is_main():  # under torchrun rank 0 writes every file
        write_config(workdir / CONFIG_FILE, cfg)
    optimizer = make_optimizer(session.model, cfg)
    scaler = grad_scaler(session.device, session.dtype)
    progress = load_checkpoint(ckpt, optimizer, scaler) if resume else Progress()
    progress._mark = started  # loading and attaching count towards ``seconds`` too
    try:
        if progress.eval_before is None:
            shared = base_eval if base_eval is not None and starts_at_base(cfg) else None
            progress.eval_before = dict(shared) if shared is not None else session.evaluate()
            print(f"{cfg.method}: before training: {_fmt(progress.eval_before)}"
                  + (" (the base model's, evaluated once for the comparison)" if shared is not None else ""), flush=True)
        train(session, workdir, progress, optimizer, scaler, show=show)
        eval_after = session.evaluate()
    except Abort:
        raise
    except KeyboardInterrupt:  # outside a step (evaluation): the model matches ``progress``
        if distributed.any_rank(distributed.is_main() and progress.step > 0 and _checkpoint_step(ckpt) != progress.step):
            save_checkpoint(ckpt, session.model, optimizer, progress, scaler)
        if _checkpoint_step(ckpt) is not None:
            print(f"\ninterrupted at step {progress.step}; checkpoint in {ckpt}; continue with --resume", flush=True)
        raise
    print(f"{cfg.method}: after {cfg.steps} steps: {_fmt(eval_after)}", flush=True)
    progress.tick()
    metrics = {
        "method": cfg.method,
        "model": cfg.model,
        "data": cfg.data,
        "rank": cfg.adapter.rank,
        "steps": cfg.steps,
        "lr": cfg.learning_rate,
        "train_loss": progress.train_loss,
        "grad_norm": progress.grad_norm,
        "start_check": session.start,
        "eval_before": progress.eval_before,
        "eval_after": eval_after,
        "trainable_params": trainable_parameters(session.model),
        "seconds": round(progress.seconds, 2),
        "train_seconds": round(progress.train_seconds, 2),
        "kind": session.kind,
        "device": str(session.device),
        "dtype": cfg.dtype,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "processes": distributed.world()[1],
        "fsdp": sharded,
        "alpha": cfg.adapter.alpha,
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "max_length": cfg.max_length,
        "schedule": cfg.schedule,
        "warmup": cfg.warmup,
        "seed": cfg.seed,
        "train_examples": len(session.train),
        "eval_examples": len(session.test),
        "eval_split": "validation" if cfg.val_size else "eval_data" if cfg.eval_data else "test",
        "eval_kind": session.eval_kind,
        "accuracy_kind": "exact_match" if session.eval_kind == "generate" else
                         "label" if session.dataset.labels is not None else "token",
        "tokens": progress.tokens,
    }
    if METHODS[cfg.method].adapter:  # gathered on every rank when sharded; rank 0 writes
        io.save_adapter(session.model, workdir / "adapter")
    else:
        save_model(session.model, session.tokenizer, workdir / "model")
    if distributed.is_main():
        plot_losses({cfg.method: progress.train_loss}, workdir / "loss.png", title=f"{cfg.model} on {cfg.data}")
        io.atomic_write_text(workdir / "metrics.json", json.dumps(metrics, indent=2))
        shutil.rmtree(ckpt, ignore_errors=True)
    return metrics


def _checkpoint_step(ckpt: Path) -> int | None:
    """The step of the checkpoint on disk, None if there is none."""
    if not (ckpt / "state.json").is_file():
        return None
    return json.loads((ckpt / "state.json").read_text())["progress"]["step"]


def _fmt(ev: dict[str, float]) -> str:
    return f"loss {ev['loss']:.4f}, accuracy {ev['accuracy']:.3f}"


# --- output folders and the commands -----------------------------------------------------------


def partial_dir(out: Path) -> Path:
    """Where a run into ``out`` works until it is finished."""
    return out.with_name(out.name + ".partial")


@contextmanager
def output_folder(out: Path, resume: bool) -> Iterator[Path]:
    """Yield the working folder ``OUT.partial``; rename it to ``OUT`` (replacing it) on success.

    On failure it is deleted unless it holds a checkpoint (a resumable run is never thrown away).
    """
    work = partial_dir(out)
    if resume and not work.is_dir():
        done = (out / "metrics.json").is_file() or (out / "report.md").is_file()
        raise PissaError(f"{out} is a finished run; nothing to resume" if done else
                         f"no interrupted run at {work}; start without --resume")
    if not resume and work.exists():
        raise PissaError(f"{work} holds an interrupted run; continue it with --resume or delete that folder")
    if not distributed.is_main():  # under torchrun rank 0 renames or cleans up
        yield work
        return
    try:
        yield work
    except BaseException:
        if work.exists() and not any(work.rglob(f"{CHECKPOINT}/state.json")):
            shutil.rmtree(work, ignore_errors=True)
        raise
    io.replace_dir(work, out)  # replaces an older OUT


CONFIG_FILE = "config.yaml"
"""The resolved run configuration every run writes into OUT (``--config`` reads it back)."""


def write_config(path: Path, cfg: RunConfig) -> None:
    io.atomic_write_text(path, options.config_text(cfg))


def resumed_config(saved: Path, cls: type[RunConfig], explicit: dict[str, Any]) -> RunConfig:
    """The interrupted run's config; an option given now (on the command line or in ``--config``) that
    changes the run is an error naming it and both values. Resume-safe options (threads, the
    checkpoint interval) take their new values."""
    if not saved.is_file():
        raise PissaError(f"{saved} is missing, so the interrupted run cannot be checked; start it again without --resume")
    old_values = options.read_config_file(saved)
    old = options.build(cls, old_values)
    safe = options.resume_safe(cls)
    new = options.build(cls, {**old_values, **explicit})
    before, after = options.flatten(old), options.flatten(new)
    for key in explicit:
        if key not in safe and before.get(key) != after.get(key):
            option = "--" + key.replace("_", "-")
            raise PissaError(f"{option} {options.show(after[key])} differs from the interrupted run's "
                             f"{options.show(before[key])}; drop it to resume, or start a new run")
    return options.build(cls, {**old_values, **{k: v for k, v in explicit.items() if k in safe}})


def relaunch(argv: Sequence[str], nproc: int, threads_given: bool, threads: int) -> int:
    """``--nproc N``: rerun the same command line under torchrun with N processes, the cores split between them."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    if not threads_given:
        rest += ["--threads", str(max(1, threads // nproc))]
    return distributed.launch(nproc, rest)


def _start(cls: type[RunConfig], args: argparse.Namespace) -> tuple[RunConfig, Launch, dict[str, Any]]:
    """The command's config (defaults < --config < command line), its launch options and the explicit values."""
    launch, _ = options.resolve(Launch, args)
    if launch.nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise PissaError(f"already running under torchrun ({os.environ['WORLD_SIZE']} processes): drop --nproc; "
                         "the launched processes are used as they are")
    cfg, explicit = options.resolve(cls, args, launch.config)
    if cfg.batch_size < launch.nproc:
        raise PissaError(f"--batch-size {cfg.batch_size} is smaller than --nproc {launch.nproc}; "
                         "each process takes a share of every micro-batch")
    return cfg, launch, explicit


def command_finetune(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """``pissa finetune``: one method; writes OUT/{config.yaml, metrics.json, loss.png, adapter/}."""
    options.add_options(parser, RunConfig)
    options.add_options(parser, Launch)

    def run_cmd(args: argparse.Namespace) -> int:
        cfg, launch, explicit = _start(RunConfig, args)
        if launch.nproc > 1:
            return relaunch(args.argv, launch.nproc, "threads" in explicit, cfg.threads)
        distributed.init_from_env()
        out = Path(launch.out or f"runs/finetune-{cfg.method}")
        with output_folder(out, launch.resume) as work:
            if launch.resume:
                cfg = resumed_config(work / CONFIG_FILE, RunConfig, explicit)
            run(cfg, work, resume=launch.resume, sharded=launch.fsdp)
        if distributed.is_main():
            print(f"wrote {out}/config.yaml, metrics.json, loss.png, {'adapter' if METHODS[cfg.method].adapter else 'model'}/")
        return 0

    return run_cmd


CALIBRATION_FILE = "calibration.safetensors"
"""The statistics ``pissa compare`` makes for its data-aware methods when no --calibration is given."""


def reads_statistics(method: str) -> bool:
    """Whether ``method``'s init reads calibration statistics (covariance or gradient)."""
    return any(n != "weight" for n in METHODS[method].needs)


def with_calibration(cfg: RunConfig, path: Path) -> RunConfig:
    """``cfg`` with the statistics file ``path``."""
    return dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, calibration=str(path)))


def keep_file(src: Path, dst: Path) -> None:
    """``dst`` becomes ``src`` (a hard link, else a copy), its modification time kept."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def own_calibration(cfg: RunConfig, methods: Sequence[str], path: Path) -> tuple[bool, int]:
    """Calibrate ``cfg``'s model on the first :data:`~pissa.config.CALIBRATION_SAMPLES` examples of the very
    training split its runs train on (after the --val-size carve-out) into ``path``, with gradients when one
    of ``methods`` reads them; a file of this model and data already there is reused.
    Returns (whether it was reused, the examples read)."""
    gradients = any("gradient" in METHODS[m].needs for m in methods)
    torch.set_num_threads(cfg.threads)
    kind = hub.resolve_kind(cfg.model, cfg.kind)
    dataset = load_data(cfg.data, cfg.val_size, cfg.eval_data)
    num_labels = len(dataset.labels) if kind == "seq-cls" and dataset.labels else None
    model, tokenizer = hub.load_model(cfg.model, kind=kind, num_labels=num_labels, dtype=torch_dtype(cfg.dtype))
    nn.Module.to(model, resolve_device(cfg.device))
    samples = min(CALIBRATION_SAMPLES, len(dataset.train))
    batches = calibration_batches(tokenizer, dataset, kind, samples, cfg.batch_size, cfg.max_length)
    before = path.stat().st_mtime_ns if path.is_file() else None
    calibrate(model, batches, targets=cfg.adapter.targets, gradients=gradients, kind=kind, out=path, progress=True)
    return before is not None and path.stat().st_mtime_ns == before, samples


def starts_at_base(cfg: RunConfig) -> bool:
    """Whether the run's model before training computes what the float32 base computes (to float32
    rounding, which the start check bounds by 1e-4): full fine-tuning, or an exact-start method
    (:attr:`~pissa.decompose.Method.exact_start`) on a float32 base without ``quantize``."""
    exact = not METHODS[cfg.method].adapter or (METHODS[cfg.method].exact_start and cfg.adapter.quantize is None)
    return exact and cfg.dtype == "float32"


def command_compare(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """``pissa compare --methods pissa,lora``: each method on the same data order and seed;
    OUT/<method>/ per method plus OUT/report.md and OUT/loss.png with every curve."""
    options.add_options(parser, CompareConfig, skip=frozenset({"method"}))
    options.add_options(parser, Launch)

    def run_cmd(args: argparse.Namespace) -> int:
        cfg, launch, explicit = _start(CompareConfig, args)
        if launch.nproc > 1:
            return relaunch(args.argv, launch.nproc, "threads" in explicit, cfg.threads)
        distributed.init_from_env()
        out = Path(launch.out or "runs/compare")
        with output_folder(out, launch.resume) as work:
            if launch.resume:
                cfg = resumed_config(work / CONFIG_FILE, CompareConfig, explicit)
            elif distributed.is_main():
                work.mkdir(parents=True, exist_ok=True)
                write_config(work / CONFIG_FILE, cfg)
            assert isinstance(cfg, CompareConfig)
            aware = [m for m in cfg.methods if reads_statistics(m)] if cfg.adapter.calibration is None else []
            if aware:
                if distributed.is_main() and not (work / CALIBRATION_FILE).exists() and (out / CALIBRATION_FILE).is_file():
                    keep_file(out / CALIBRATION_FILE, work / CALIBRATION_FILE)  # reused below if model and data still match
                distributed.barrier()
                reused, samples = own_calibration(cfg, aware, work / CALIBRATION_FILE)
                if distributed.is_main():
                    print(f"{'reused' if reused else 'calibrated'} {out / CALIBRATION_FILE} ({samples} training examples) "
                          f"for {', '.join(aware)}", flush=True)
            results = {}
            base_eval = None  # the base model's evaluation, from the first run that starts at it
            for one in cfg.runs():
                sub = work / one.method
                if (sub / "metrics.json").is_file():
                    results[one.method] = json.loads((sub / "metrics.json").read_text())
                else:
                    if one.method in aware:
                        one = with_calibration(one, work / CALIBRATION_FILE)
                    results[one.method] = run(one, sub, resume=(sub / CHECKPOINT / "state.json").is_file(),
                                              sharded=launch.fsdp, base_eval=base_eval)
                    if one.method in aware and distributed.is_main():  # its config names the file where it will stay
                        write_config(sub / CONFIG_FILE, with_calibration(one, out / CALIBRATION_FILE))
                if base_eval is None and starts_at_base(one):
                    base_eval = results[one.method]["eval_before"]
            plot_losses({m: r["train_loss"] for m, r in results.items()}, work / "loss.png",
                        title=f"{cfg.model} on {cfg.data}, rank {cfg.adapter.rank}")
            io.atomic_write_text(work / "report.md", write_report(results))
        print((out / "report.md").read_text())
        print(f"wrote {out}/report.md, loss.png, config.yaml and one folder per method")
        return 0

    return run_cmd
