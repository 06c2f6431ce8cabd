"""``pissa compare``: several methods on the same data, seed and data order, side by side."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pissa.calibration.batches import calibration_batches
from pissa.calibration.collect import calibrate
from pissa.calibration.config import CALIBRATION_SAMPLES
from pissa.data.datasets import load_data
from pissa.files.atomic import atomic_write_text
from pissa.methods.registry import METHODS
from pissa.runtime import distributed, hub
from pissa.runtime.devices import resolve_device, torch_dtype
from pissa.training.checkpoint import CHECKPOINT
from pissa.training.config import CompareConfig, RunConfig
from pissa.training.metrics import RunMetrics
from pissa.training.report import plot_losses, write_report
from pissa.training.run import RUN_CONFIG, output_folder, resumed_config, run, write_config
from pissa.training.session import starts_at_base

log = logging.getLogger(__name__)

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
    """Calibrate ``cfg``'s model on the first :data:`~pissa.calibration.config.CALIBRATION_SAMPLES` examples of the
    very training split its runs train on (after the ``val_size`` carve-out) into ``path``, with gradients when one
    of ``methods`` reads them; a file of this model and data already there is reused.
    Returns (whether it was reused, the examples read)."""
    gradients = any("gradient" in METHODS[m].needs for m in methods)
    torch.set_num_threads(cfg.threads)
    kind = hub.resolve_kind(cfg.model, cfg.kind)
    dataset = load_data(cfg.data, cfg.val_size, cfg.eval_data, columns=cfg.columns, split_name=cfg.data_split)
    num_labels = len(dataset.labels) if kind == "seq-cls" and dataset.labels else None
    model, tokenizer = hub.load_model(cfg.model, kind=kind, num_labels=num_labels, dtype=torch_dtype(cfg.dtype))
    nn.Module.to(model, resolve_device(cfg.device))
    samples = min(CALIBRATION_SAMPLES, len(dataset.train))
    batches = calibration_batches(tokenizer, dataset, kind, samples, cfg.batch_size, cfg.max_length)
    stats = calibrate(model, batches, targets=cfg.adapter.targets, gradients=gradients, kind=kind, out=path, progress=True)
    return stats.reused, samples


@dataclass
class Comparison:
    """What :func:`compare` made: the report (markdown) and each method's metrics."""

    out: Path
    report: str
    results: dict[str, RunMetrics]


def compare(cfg: CompareConfig, out: str | Path | None = None, *, resume: bool = False,
            explicit: dict[str, Any] | None = None, sharded: bool = False, command: str | None = None) -> Comparison:
    """``pissa compare``: one :func:`~pissa.training.run.run` per method into ``out/<method>/`` (default
    ``runs/compare``), same data order and seed, plus ``out/report.md`` and ``out/loss.png`` with every curve.

    Data-aware methods without ``calibration`` get statistics of the runs' own training split, made once
    into ``out/calibration.safetensors`` (reused by a resumed or a new compare into ``out``). The base model is
    evaluated once for every run that starts at it. Finished runs of an interrupted compare are kept.
    ``command``: the command line, for each adapter's model card.
    """
    folder = Path(out or "runs/compare")
    with output_folder(folder, resume) as work:
        if resume:
            cfg = resumed_config(work / RUN_CONFIG, CompareConfig, explicit or {})
        elif distributed.is_main():
            work.mkdir(parents=True, exist_ok=True)
            write_config(work / RUN_CONFIG, cfg)
        aware = [m for m in cfg.methods if reads_statistics(m)] if cfg.adapter.calibration is None else []
        if aware:
            if distributed.is_main() and not (work / CALIBRATION_FILE).exists() and (folder / CALIBRATION_FILE).is_file():
                keep_file(folder / CALIBRATION_FILE, work / CALIBRATION_FILE)  # reused below if model and data still match
            distributed.barrier()
            reused, samples = own_calibration(cfg, aware, work / CALIBRATION_FILE)
            if distributed.is_main():
                log.info(f"{'reused' if reused else 'calibrated'} {folder / CALIBRATION_FILE} ({samples} training examples) "
                         f"for {', '.join(aware)}")
        results: dict[str, RunMetrics] = {}
        base_eval = None  # the base model's evaluation, from the first run that starts at it
        for one in cfg.runs():
            sub = work / one.method
            if (sub / "metrics.json").is_file():
                results[one.method] = RunMetrics.read(sub / "metrics.json")
            else:
                if one.method in aware:
                    one = with_calibration(one, work / CALIBRATION_FILE)
                results[one.method] = run(one, sub, resume=(sub / CHECKPOINT / "state.json").is_file(), sharded=sharded,
                                          base_eval=base_eval, experiment=folder.name, store=work, command=command)
                if one.method in aware and distributed.is_main():  # its config names the file where it will stay
                    write_config(sub / RUN_CONFIG, with_calibration(one, folder / CALIBRATION_FILE))
            if base_eval is None and starts_at_base(one):
                base_eval = results[one.method].eval_before
        report = write_report(results)
        if distributed.is_main():
            plot_losses({m: r.train_loss for m, r in results.items()}, work / "loss.png",
                        title=f"{cfg.model} on {cfg.data}, rank {cfg.adapter.rank}")
            atomic_write_text(work / "report.md", report)
    return Comparison(folder, report, results)
