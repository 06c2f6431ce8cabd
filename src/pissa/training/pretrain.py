"""``pissa pretrain``: Llama-shaped models trained from scratch on a text corpus, one per architecture (full,
low-rank, LOST), at the same token budget, seed and data order, side by side.

One architecture, top to bottom::

    build_llama(seed) -> restructure (SVD of each random decoder linear)   the same init for every run
    validation loss at init
    for step in range(steps): train_step(rows of step_indices(seed, step))  AdamW / GaLore / DCT-AdamW, clipping
        checkpoint every ``save_every`` steps (and on Ctrl-C)
    validation and test loss; write model.safetensors, metrics.json

The rows of step s and its learning rate are pure functions of ``(seed, s)``, and the model is rebuilt from the
seed, so a run resumed from its checkpoint (trained weights, optimizer moments, RNG state, progress; written
atomically) takes exactly the steps of an uninterrupted one. ``OUT.partial/`` becomes ``OUT`` when every
architecture is done; a finished architecture of an interrupted run is kept.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from pissa.data.batches import Batch
from pissa.data.corpus import Corpus, load_corpus
from pissa.data.loss import loss_sum
from pissa.errors import PissaError
from pissa.files.atomic import atomic_write_text
from pissa.optim import build_optimizer, state_bytes
from pissa.runtime import hub
from pissa.runtime.devices import resolve_device
from pissa.training.architectures import LostLinear, build_llama, decoder_linears, parameter_count, restructure
from pissa.training.checkpoint import CHECKPOINT, Progress, load_checkpoint, restore_trained, save_checkpoint
from pissa.training.loop import deferred_interrupt, train_step
from pissa.training.pretrain_config import PretrainConfig
from pissa.training.pretrain_report import pretrain_report
from pissa.training.report import plot_losses
from pissa.training.run import RUN_CONFIG, output_folder, resumed_config, write_config
from pissa.training.schedule import lr_at, step_indices

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
VOCABULARY = "vocabulary.json"
"""With ``vocab_size``: the tokenizer id of each model id but the last, the unknown token."""


def rows_batch(rows: Tensor, device: torch.device) -> Batch:
    """Token rows (B, T) as a batch whose targets are every token after the first (next-token prediction)."""
    target = torch.ones_like(rows, dtype=torch.bool)
    target[:, 0] = False
    b = Batch(rows, torch.ones_like(rows), target, torch.full((rows.shape[0],), -1))
    return b if device.type == "cpu" else b.to(device)


@torch.no_grad()
def evaluate_rows(model: nn.Module, rows: Tensor, batch_size: int, device: torch.device) -> dict[str, float]:
    """Mean next-token loss over ``rows`` (N, T) in eval mode and its perplexity ``exp(loss)``."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, rows.shape[0], batch_size):
        b = rows_batch(rows[i : i + batch_size], device)
        total += float(loss_sum(model, b, "causal-lm"))
        count += b.targets
    model.train(was)
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


def make_model(cfg: PretrainConfig, architecture: str, vocab_size: int, device: torch.device) -> nn.Module:
    """The run's model of ``architecture`` at init, on ``device``: the same random Llama of ``vocab_size`` tokens for
    every architecture
    (``cfg.seed``), restructured (:func:`~pissa.training.architectures.restructure`), every parameter trainable."""
    model = build_llama(vocab_size, cfg.layers, cfg.hidden, cfg.heads, cfg.intermediate, cfg.seq_len, cfg.seed)
    restructure(model, architecture, cfg.rank, cfg.sparse_channels)
    model.requires_grad_(True)
    return model.to(device)


@dataclass
class Inputs:
    """What every architecture of a run shares: the tokenizer, the corpus rows, the device."""

    tokenizer: Any
    corpus: Corpus
    device: torch.device


def prepare_inputs(cfg: PretrainConfig) -> Inputs:
    """Load the tokenizer and the corpus (every user error surfaces here, before any output exists)."""
    torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    tokenizer = hub.load_tokenizer(cfg.tokenizer)
    corpus = load_corpus(cfg.corpus, tokenizer, cfg.seq_len, cfg.val_fraction, cfg.test_fraction, cfg.vocab_size)
    if corpus.train.shape[0] < cfg.batch_size:
        raise PissaError(f"the training split has {corpus.train.shape[0]} rows of `seq_len` {cfg.seq_len}, fewer than "
                         f"`batch_size` {cfg.batch_size}")
    return Inputs(tokenizer, corpus, device)


def held_out(rows: Tensor, cfg: PretrainConfig) -> Tensor:
    return rows if cfg.eval_rows == 0 else rows[: cfg.eval_rows]


def train_architecture(cfg: PretrainConfig, architecture: str, inputs: Inputs, work: Path, show: bool = True) -> dict[str, Any]:
    """Train one architecture in ``work`` (resuming ``work/checkpoint`` when it holds one); returns its metrics, also
    written to ``work/metrics.json`` beside ``work/model.safetensors``."""
    ckpt, device, train_rows = work / CHECKPOINT, inputs.device, inputs.corpus.train
    resume = (ckpt / "state.json").is_file()
    vocab = inputs.corpus.vocab_size or len(inputs.tokenizer)
    model = make_model(cfg, architecture, vocab, device)
    if resume:
        restore_trained(model, ckpt)
    optimizer = build_optimizer(model, cfg.optim, lr_at(0, cfg), cfg.weight_decay)
    progress = load_checkpoint(ckpt, optimizer) if resume else Progress()
    work.mkdir(parents=True, exist_ok=True)
    if progress.eval_before is None:
        progress.eval_before = evaluate_rows(model, held_out(inputs.corpus.validation, cfg), cfg.batch_size, device)
    bar = tqdm(total=cfg.steps, initial=progress.step, desc=f"{architecture} lr={cfg.lr:g}", unit="step",
               disable=not show, dynamic_ncols=True)
    with deferred_interrupt() as interrupted:
        while progress.step < cfg.steps:
            start = time.perf_counter()
            idx = step_indices(train_rows.shape[0], cfg.seed, progress.step, cfg.batch_size)
            batch = rows_batch(train_rows[idx], device)
            loss, norm = train_step(model, [batch], "causal-lm", optimizer, lr_at(progress.step, cfg), cfg)
            if not math.isfinite(loss):
                raise PissaError(f"{architecture}: the loss diverged (became {loss}) at step {progress.step + 1}; "
                                 f"lower `lr` (now {cfg.lr:g})")
            elapsed = time.perf_counter() - start
            progress.step += 1
            progress.tokens += batch.tokens
            progress.train_seconds += elapsed
            progress.train_loss.append([progress.step, loss])
            progress.grad_norm.append([progress.step, norm])
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{batch.tokens / elapsed:.0f}")
            bar.update(1)
            due = cfg.save_every and progress.step % cfg.save_every == 0 and progress.step < cfg.steps
            if due or interrupted[0]:
                save_checkpoint(ckpt, model, optimizer, progress)
            if interrupted[0]:
                bar.close()
                log.info(f"\ninterrupted at step {progress.step}; checkpoint in {ckpt}; continue with `resume`")
                raise KeyboardInterrupt
    bar.close()
    metrics = {
        "architecture": architecture, "optimizer": cfg.optim.optimizer, "lr": cfg.lr, "rank": cfg.rank,
        "sparse_channels": cfg.sparse_channels, "steps": cfg.steps, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size,
        "seed": cfg.seed, "vocab_size": vocab, "tokens": progress.tokens, "params": parameter_count(model),
        "linear_params": linear_params(model),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "optimizer_state_bytes": state_bytes(optimizer), "train_loss": progress.train_loss,
        "grad_norm": progress.grad_norm, "validation_before": progress.eval_before,
        "validation": evaluate_rows(model, held_out(inputs.corpus.validation, cfg), cfg.batch_size, device),
        "test": evaluate_rows(model, held_out(inputs.corpus.test, cfg), cfg.batch_size, device),
        "train_seconds": round(progress.train_seconds, 3),
        "tokens_per_second": progress.tokens / progress.train_seconds if progress.train_seconds else 0.0,
        "device": str(device),
    }
    save_file(distinct_state(model), str(work / MODEL_FILE))
    atomic_write_text(work / "metrics.json", json.dumps(metrics, indent=2))  # last: marks the architecture done
    shutil.rmtree(ckpt, ignore_errors=True)
    return metrics


def linear_params(model: nn.Module) -> int:
    """Parameters of the decoder's weight layers: its linears (full) or its LOST layers (their B, A and values)."""
    layers: list[nn.Module] = [m for _, _, m in decoder_linears(model)]
    layers += [m for m in model.modules() if isinstance(m, LostLinear)]
    return sum(p.numel() for m in layers for p in m.parameters())


def distinct_state(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` on the CPU with each shared tensor once (the tied head is its embedding)."""
    seen: set[int] = set()
    out = {}
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        out[name] = t.detach().contiguous().cpu()
    return out


@dataclass
class Pretraining:
    """What :func:`pretrain` made: the folder, the report (markdown) and each architecture's metrics."""

    out: Path
    report: str
    results: dict[str, dict[str, Any]]


def pretrain(cfg: PretrainConfig, out: str | Path | None = None, *, resume: bool = False,
             explicit: dict[str, Any] | None = None, show: bool = True) -> Pretraining:
    """``pissa pretrain``: :func:`train_architecture` for each architecture into ``out/<architecture>/`` (default
    ``runs/pretrain``), plus ``out/report.md``, ``out/loss.png`` and ``out/config.yaml``. ``resume``: continue the
    interrupted run there with its saved config (``explicit``: the values set now, resume-safe ones only)."""
    folder = Path(out or "runs/pretrain")
    if not resume:
        inputs = prepare_inputs(cfg)  # bad input fails before OUT.partial exists
    with output_folder(folder, resume) as work:
        if resume:
            cfg = resumed_config(work / RUN_CONFIG, PretrainConfig, explicit or {})
            inputs = prepare_inputs(cfg)
        else:
            work.mkdir(parents=True, exist_ok=True)
            write_config(work / RUN_CONFIG, cfg)
            if inputs.corpus.vocabulary is not None:  # model id -> tokenizer id (the last model id: unknown)
                atomic_write_text(work / VOCABULARY, json.dumps(inputs.corpus.vocabulary.tolist()))
        log.info(f"corpus {cfg.corpus}: {inputs.corpus.tokens['train']:,} training tokens, "
                 f"{inputs.corpus.tokens['validation']:,} validation, {inputs.corpus.tokens['test']:,} test; "
                 f"{cfg.steps} steps x {cfg.batch_size * cfg.seq_len} tokens")
        results: dict[str, dict[str, Any]] = {}
        for architecture in cfg.architecture:
            sub = work / architecture
            if (sub / "metrics.json").is_file():
                results[architecture] = json.loads((sub / "metrics.json").read_text())
            else:
                results[architecture] = train_architecture(cfg, architecture, inputs, sub, show)
            v = results[architecture]["validation"]
            log.info(f"{architecture}: validation loss {v['loss']:.4f} (perplexity {v['perplexity']:.1f})")
        report = pretrain_report(cfg, results)
        plot_losses({a: r["train_loss"] for a, r in results.items()}, work / "loss.png", ylabel="training loss (next token)",
                    title=f"pre-training on {cfg.corpus}: {cfg.layers} layers, width {cfg.hidden}, rank {cfg.rank}")
        atomic_write_text(work / "report.md", report)
    return Pretraining(folder, report, results)
