"""The ``pissa pretrain`` report: one row per architecture from its metrics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pissa.training.pretrain_config import PretrainConfig
from pissa.training.report import WINDOW, window_mean

MIB = 2**20


def pretrain_table(results: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """``(header, rows)`` of the table of :func:`pretrain_report`: one row per key of ``results`` (its label), with
    its parameters and optimizer state also as ratios to the first row's."""
    head = ["architecture", "optimizer", "lr", "params", "decoder linear params", "optimizer state (MiB)",
            "tokens", "tokens/s", f"train loss (end, mean of {WINDOW})", "validation loss", "validation ppl",
            "test loss", "test ppl", "params / first", "state / first"]
    rows = []
    first = next(iter(results.values()))
    for key, r in results.items():
        end = window_mean(r["train_loss"], r["steps"])
        row = [key, r["optimizer"], f"{r['lr']:g}", f"{r['params']:,}", f"{r['linear_params']:,}",
               f"{r['optimizer_state_bytes'] / MIB:.2f}", f"{r['tokens']:,}", f"{r['tokens_per_second']:.0f}",
               "–" if end is None else f"{end:.4f}", f"{r['validation']['loss']:.4f}",
               f"{r['validation']['perplexity']:.1f}", f"{r['test']['loss']:.4f}", f"{r['test']['perplexity']:.1f}",
               f"{r['params'] / first['params']:.3f}",
               f"{r['optimizer_state_bytes'] / max(1, first['optimizer_state_bytes']):.3f}"]
        rows.append(row)
    return head, rows


def pretrain_report(cfg: PretrainConfig, results: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown: the run's settings and :func:`pretrain_table`."""
    lines = [
        f"# Pre-training on {cfg.corpus}: " + " vs ".join(results),
        "",
        f"A Llama of {cfg.layers} layers, width {cfg.hidden}, {cfg.heads} heads, MLP {cfg.intermediate}, the "
        f"{cfg.tokenizer} tokenizer's vocabulary (tied embeddings), from the same random init (seed {cfg.seed}); "
        f"rank {cfg.rank}, sparse channels {cfg.sparse_channels:g}; {cfg.steps} steps of {cfg.batch_size} rows x "
        f"{cfg.seq_len} tokens, {cfg.schedule} schedule after {cfg.warmup} warm-up steps, same data order for every "
        f"architecture. Held-out losses are mean next-token losses over "
        f"{'all' if cfg.eval_rows == 0 else cfg.eval_rows} rows of each split; ppl = exp(loss).",
        "",
    ]
    head, rows = pretrain_table(results)
    lines += ["| " + " | ".join(cells) + " |" for cells in (head, ["---"] * len(head), *rows)]
    return "\n".join(lines) + "\n"
