"""One fine-tuning run, start to finish, and the output folder it works in (``pissa finetune``).

One run, top to bottom::

    prepare(cfg)              load model + data, encode, attach (or load a checkpoint): all validation
    evaluate                  held-out loss / accuracy before training
    for step in range(steps): train_step(micro-batches of step_indices(seed, step))   AdamW, clipping
        checkpoint every ``save_every`` steps (and on Ctrl-C)
    evaluate                  after training; write metrics.json, loss.png, adapter/

The batch of step s is a pure function of ``(seed, s)`` (:func:`~pissa.training.loop.step_indices`)
and the learning rate a pure function of s (:func:`~pissa.training.loop.lr_at`), so a resumed run
(or a data-parallel one) sees exactly the batches and rates of an uninterrupted single run: only
the adapter, the optimizer moments, the RNG state and the step number need saving.

Outputs appear atomically: a run works in ``OUT.partial/`` (checkpoints included) and renames
it to ``OUT`` when done; bad input is caught before ``OUT.partial`` exists.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pissa import options
from pissa.adapter.save_load import save_adapter
from pissa.errors import PissaError
from pissa.files.atomic import atomic_write_text, publish_dir
from pissa.files.card import training_record
from pissa.integrations.tracking import open_tracker, prefixed
from pissa.methods.registry import METHODS
from pissa.options import C
from pissa.runtime import distributed
from pissa.runtime.devices import grad_scaler
from pissa.training.checkpoint import (
    CHECKPOINT,
    Progress,
    checkpoint_step,
    load_checkpoint,
    save_checkpoint,
    save_model,
    verify_checkpoint,
)
from pissa.training.config import RunConfig
from pissa.training.loop import Abort, make_optimizer, train
from pissa.training.metrics import Evaluation, RunMetrics
from pissa.training.report import plot_losses
from pissa.training.session import lr_warning, prepare, starts_at_base
from pissa.training.streamed import SCRATCH

log = logging.getLogger(__name__)


def run(cfg: RunConfig, workdir: Path, resume: bool = False, show: bool = True, sharded: bool = False,
        base_eval: Evaluation | None = None, experiment: str | None = None, store: Path | None = None,
        command: str | None = None) -> RunMetrics:
    """One fine-tuning run in ``workdir`` (created here, after validation); returns its metrics.

    Writes ``workdir/{config.yaml, metrics.json, loss.png, adapter/}`` (``model/`` for full
    fine-tuning); ``checkpoint/`` exists while the run is unfinished. ``resume``: continue from
    ``workdir/checkpoint``. ``sharded``: FSDP2 over the torchrun processes. ``base_eval``: the
    evaluation of a model that starts where this one does (:func:`~pissa.training.session.starts_at_base`),
    reported as ``eval_before`` instead of evaluating again (``pissa compare`` evaluates the base once).
    ``cfg.tracking``'s trackers get the run named ``cfg.method`` in ``experiment`` (default: ``workdir``'s name), MLflow's
    default store in ``store`` (default ``workdir``): the config, every step's train metrics and both evaluations
    (``eval/*`` at step 0 and at step ``steps``), the same values as metrics.json.
    ``command``: the command line that started the run, for the adapter's model card (``adapter/README.md``).
    """
    started = time.perf_counter()
    ckpt = workdir / CHECKPOINT
    if resume:
        verify_checkpoint(ckpt)  # before anything is loaded: a damaged checkpoint is refused at once
    session = prepare(cfg, ckpt if resume else None, sharded, scratch=workdir / SCRATCH)
    warning = lr_warning(cfg)
    if warning and distributed.is_main():
        log.warning(warning)
    workdir.mkdir(parents=True, exist_ok=True)
    if not resume and distributed.is_main():  # under torchrun rank 0 writes every file
        write_config(workdir / RUN_CONFIG, cfg)
    optimizer = make_optimizer(session.model, cfg)
    scaler = grad_scaler(session.device, session.dtype)
    progress = load_checkpoint(ckpt, optimizer, scaler) if resume else Progress()
    progress._mark = started  # loading and attaching count towards ``seconds`` too
    tracker = open_tracker(cfg.tracking, workdir, cfg.method, experiment=experiment or workdir.name, store=store,
                           config=options.flatten(cfg), resume_step=progress.step if resume else None)
    ok = False
    try:
        if progress.eval_before is None:
            shared = base_eval if base_eval is not None and starts_at_base(cfg) else None
            progress.eval_before = dict(shared) if shared is not None else session.evaluate()
            tracker.log_metrics(0, prefixed("eval", progress.eval_before))
            if distributed.is_main():
                log.info(f"{cfg.method}: before training: {_fmt(progress.eval_before)}"
                         + (" (the base model's, evaluated once for the comparison)" if shared is not None else ""))
        train(session, workdir, progress, optimizer, scaler, show=show, tracker=tracker)
        eval_after = session.evaluate()
        tracker.log_metrics(cfg.steps, prefixed("eval", eval_after))
        ok = True
    except Abort:
        raise
    except KeyboardInterrupt:  # outside a step (evaluation): the model matches ``progress``
        if distributed.any_rank(distributed.is_main() and progress.step > 0 and checkpoint_step(ckpt) != progress.step):
            save_checkpoint(ckpt, session.model, optimizer, progress, scaler)
        if checkpoint_step(ckpt) is not None and distributed.is_main():
            log.info(f"\ninterrupted at step {progress.step}; checkpoint in {ckpt}; continue with `resume`")
        raise
    finally:
        tracker.close(ok)
    if distributed.is_main():
        log.info(f"{cfg.method}: after {cfg.steps} steps: {_fmt(eval_after)}")
    progress.tick()
    metrics = RunMetrics.of(cfg, session, progress, eval_after, sharded)
    if METHODS[cfg.method].adapter:  # gathered on every rank when sharded; rank 0 writes
        training = training_record(cfg.data, cfg.steps, metrics.lr, metrics.eval_before, metrics.eval_after, command)
        save_adapter(session.model, workdir / "adapter", training=training)
    else:
        save_model(session.model, session.tokenizer, workdir / "model")
    if distributed.is_main():
        plot_losses({cfg.method: progress.train_loss}, workdir / "loss.png", title=f"{cfg.model} on {cfg.data}")
        atomic_write_text(workdir / "metrics.json", json.dumps(metrics.to_dict(), indent=2))
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(workdir / SCRATCH, ignore_errors=True)  # the streamed decomposition (a model-sized residual)
    return metrics


def finetune(cfg: RunConfig, out: str | Path | None = None, *, resume: bool = False, explicit: dict[str, Any] | None = None,
             sharded: bool = False, command: str | None = None) -> tuple[Path, RunMetrics]:
    """``pissa finetune``: :func:`run` in ``out`` (default ``runs/finetune-METHOD``) through its ``OUT.partial``
    folder. ``resume``: continue the interrupted run there, with its saved config; ``explicit`` (the values
    the user set now) may change only resume-safe fields (:func:`resumed_config`); ``command``: the command line,
    for the adapter's model card. Returns ``(out, metrics)``."""
    folder = Path(out or f"runs/finetune-{cfg.method}")
    with output_folder(folder, resume) as work:
        if resume:
            cfg = resumed_config(work / RUN_CONFIG, RunConfig, explicit or {})
        metrics = run(cfg, work, resume=resume, sharded=sharded, experiment=folder.name, command=command)
    return folder, metrics


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
                         f"no interrupted run at {work}; start without `resume`")
    if not resume and work.exists():
        raise PissaError(f"{work} holds an interrupted run; continue it with `resume` or delete that folder")
    if not distributed.is_main():  # under torchrun rank 0 renames or cleans up
        yield work
        return
    try:
        yield work
    except BaseException:
        if work.exists() and not any(work.rglob(f"{CHECKPOINT}/state.json")):
            shutil.rmtree(work, ignore_errors=True)
        raise
    publish_dir(work, out)  # replaces an older OUT


RUN_CONFIG = "config.yaml"
"""The resolved run configuration every run writes into OUT (``--config`` reads it back)."""


def write_config(path: Path, cfg: Any) -> None:
    """A config dataclass (a RunConfig, a PretrainConfig) as ``path``'s YAML, atomically."""
    atomic_write_text(path, options.config_text(cfg))


def resumed_config(saved: Path, cls: type[C], explicit: dict[str, Any]) -> C:
    """The interrupted run's config; an option given now (on the command line or in ``--config``) that
    changes the run is an error naming it and both values. Resume-safe options (threads, the
    checkpoint interval) take their new values."""
    if not saved.is_file():
        raise PissaError(f"{saved} is missing, so the interrupted run cannot be checked; start it again without `resume`")
    old_values = options.read_config_file(saved)
    old = options.build(cls, old_values)
    safe = options.resume_safe(cls)
    new = options.build(cls, {**old_values, **explicit})
    before, after = options.flatten(old), options.flatten(new)
    for key in explicit:
        if key not in safe and before.get(key) != after.get(key):
            option = f"`{key}`"
            raise PissaError(f"{option} {options.show(after[key])} differs from the interrupted run's "
                             f"{options.show(before[key])}; drop it to resume, or start a new run")
    return options.build(cls, {**old_values, **{k: v for k, v in explicit.items() if k in safe}})
