"""The optimizer loop: one step (gradient accumulation, clipping, AdamW) and the steps of a run, with checkpoints and
Ctrl-C handling (the first Ctrl-C finishes the step and checkpoints; a second stops at once).
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from pissa.adapter.attach import regularization
from pissa.adapter.progressive import shrink
from pissa.data.batches import Batch
from pissa.data.loss import loss_sum
from pissa.errors import PissaError
from pissa.integrations.tracking import TRAIN_METRICS, Tracker, Trackers
from pissa.optim import build_optimizer, move_grads
from pissa.runtime import distributed
from pissa.runtime.devices import DTypeName, autocast, torch_dtype
from pissa.runtime.hub import Kind
from pissa.runtime.memory import trim_heap
from pissa.training.checkpoint import CHECKPOINT, Progress, save_checkpoint
from pissa.training.config import RunConfig
from pissa.training.preference import PairBatch, dpo_loss_sum
from pissa.training.schedule import lr_at, step_indices
from pissa.training.session import Session


class StepOptions(Protocol):
    """What :func:`train_step` reads of a run's config (a RunConfig, a PretrainConfig)."""

    @property
    def dtype(self) -> DTypeName: ...
    @property
    def reg_weight(self) -> float: ...
    @property
    def max_grad_norm(self) -> float: ...


def make_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """The run's optimizer (``cfg.optim``: AdamW, GaLore or DCT-AdamW) over the trainable parameters."""
    return build_optimizer(model, cfg.optim, lr_at(0, cfg), cfg.weight_decay)


def train_step(model: nn.Module, micro_batches: Sequence[Batch | PairBatch], kind: Kind, optimizer: torch.optim.Optimizer,
               lr: float, cfg: StepOptions, scaler: torch.amp.GradScaler | None = None) -> tuple[float, float]:
    """Accumulate gradients over ``micro_batches``, clip, and take one AdamW step at ``lr``.

    The loss is the completions' (:func:`~pissa.data.loss.loss_sum`), or DPO's for preference pairs
    (:func:`~pissa.training.preference.dpo_loss_sum`, ``cfg.beta``, one term per pair).
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
                summed = dpo_loss_sum(model, b, _beta(cfg)) if isinstance(b, PairBatch) else loss_sum(model, b, kind)
                loss = summed / total
            step_loss += loss.item()
            if last and cfg.reg_weight > 0:
                reg = regularization(model)
                if reg.requires_grad:  # a constant zero (no graph) for methods without orthonormal factors
                    loss = loss + cfg.reg_weight * reg / ranks
            scaled = loss * ranks  # DDP averages over ranks; times ranks: the sum, i.e. the whole step's gradient
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
    step_loss = distributed.all_sum([step_loss])[0]
    move_grads(optimizer)  # float16/bfloat16 weights' gradients to their float32 masters, before unscaling and clipping
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


def _beta(cfg: StepOptions) -> float:
    """DPO's beta of a config that has one (a RunConfig; preference pairs come only from its runs)."""
    beta = getattr(cfg, "beta", None)
    if beta is None:
        raise TypeError(f"preference pairs need a config with `beta`, not {type(cfg).__name__}")
    return float(beta)


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


def train(session: Session, workdir: Path, progress: Progress, optimizer: torch.optim.Optimizer,
          scaler: torch.amp.GradScaler | None = None, show: bool = True, tracker: Tracker | None = None) -> Progress:
    """Run steps ``progress.step .. steps - 1``, checkpointing into ``workdir/checkpoint``; each step's loss, learning
    rate and gradient norm go to ``tracker`` as :data:`~pissa.integrations.tracking.TRAIN_METRICS`.

    On Ctrl-C: finish the current step, checkpoint, raise KeyboardInterrupt. After ``cfg.progressive_step`` steps
    the adapters' masks shrink (:func:`pissa.adapter.progressive.shrink`) before the next step (a run resumed from
    a checkpoint of that step shrinks there too; one resumed later already holds the shrunk adapter).
    """
    cfg, model = session.cfg, distributed.data_parallel(session.model)
    count = cfg.batch_size * cfg.grad_accum
    bar = tqdm(total=cfg.steps, initial=progress.step, desc=f"{cfg.method} lr={cfg.learning_rate:g}",
               unit="step", disable=not show or not distributed.is_main(), dynamic_ncols=True)
    smooth, tracker = None, tracker or Trackers()
    with deferred_interrupt() as interrupted:
        while progress.step < cfg.steps:
            if cfg.progressive_step and progress.step == cfg.progressive_step:
                if distributed.world()[1] > 1:
                    raise PissaError("`progressive_step` changes parameter shapes, which a multi-process run cannot "
                                     "follow; run it in one process or set `progressive_step` 0")
                shrink(session.model, optimizer)
            if session.sharded:  # the last step's freed small blocks, before this step's activations
                trim_heap()
            start = time.perf_counter()
            idx = step_indices(len(session.train), cfg.seed, progress.step, count)
            micro = [session.batch(distributed.my_share(idx[j : j + cfg.batch_size])) for j in range(0, count, cfg.batch_size)]
            lr = lr_at(progress.step, cfg)
            loss, norm = train_step(model, micro, session.kind, optimizer, lr, cfg, scaler)
            if not math.isfinite(loss):
                raise PissaError(f"the loss diverged (became {loss}) at step {progress.step + 1}; lower `lr` "
                                 f"(now {cfg.learning_rate:g})")
            progress.step += 1
            tokens = int(distributed.all_sum([sum(b.tokens for b in micro)])[0])
            progress.tokens += tokens
            progress.train_loss.append([progress.step, loss])
            progress.grad_norm.append([progress.step, norm])
            tracker.log_metrics(progress.step, dict(zip(TRAIN_METRICS, (loss, lr, norm))))
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
