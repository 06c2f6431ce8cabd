"""The adapters that are not B A (SoKA, SaRA, CLIP-SVD) beside PiSSA and LoRA on the embedded task.

1. Sweep: each method of ``--sweep`` x learning rate, ``--steps`` steps, same data order, seed, batch,
   schedule and targets, trained on the training data minus ``--val-size`` reviews carved from it and
   scored by the validation loss after training (the test split is not read). A grid whose best rate
   is at its edge is extended by a factor of ``--factor`` on that side (up to ``--extend`` times), so
   every choice is bracketed: the table marks a choice that still sits on an edge.
2. Each method of ``--methods`` at its default learning rate (``pissa.METHODS[name].default_lr``), a whole
   ``pissa finetune`` run in a fresh process (the same options): test loss and accuracy on
   ``--eval-size`` held-out test reviews, trainable parameters, mean step time, peak RSS; ratios to
   PiSSA and to LoRA.

    .venv/bin/python benchmarks/shapes.py --update-results                 # benchmarks/results/shapes.md
    .venv/bin/python benchmarks/shapes.py --methods pissa,lora --sweep lora --lrs 1e-4,3e-4 --steps 2 \\
        --val-size 4 --eval-size 4                                         # quick

Sweep runs live in ``--work`` (a finished run with the same config is reused, so an interrupted benchmark
resumes); the whole runs are measured again each time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

import pissa
from _common import Setting, finetune_options, whole_run
from _results import Results, add_results_options
from _validation import VAL_SEED, bracketed_sweep, run_cached
from pissa.adapter.config import AdapterConfig
from pissa.training.config import RunConfig

METHODS = "soka,sara,clip-svd,pissa,lora"
SWEEP = "soka,sara,clip-svd"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=METHODS, help="methods of the default-lr comparison")
    p.add_argument("--sweep", default=SWEEP, help="methods whose learning rate is swept")
    p.add_argument("--lrs", default="1e-4,3e-4,1e-3,3e-3", help="the starting grid of every swept method")
    p.add_argument("--factor", type=float, default=3.0)
    p.add_argument("--extend", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--val-size", type=int, default=64)
    p.add_argument("--eval-size", type=int, default=64)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default=None, help="folder of the sweep runs (default: a temporary folder)")
    add_results_options(p, "shapes")
    args = p.parse_args()
    targets = args.targets.split(",")

    def config(method: str, lr: float | None) -> RunConfig:
        adapter = AdapterConfig(method=method, rank=args.rank, targets=targets)
        return RunConfig(adapter=adapter, lr=lr, steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                         eval_size=args.eval_size, warmup=args.warmup, threads=args.threads, save_every=0)

    title = "Adapters that are not B A beside PiSSA and LoRA (SmolLM2-135M-Instruct, Rotten Tomatoes)"
    with Results.from_args(args, title) as res, tempfile.TemporaryDirectory(prefix="shapes-") as tmp:
        work = Path(args.work or tmp)
        res.add(f"Rank {args.rank} (each method's own reading of it), targets {args.targets}, {args.steps} steps of batch "
                f"{args.batch_size} (max {args.max_length} tokens), cosine schedule with {args.warmup} warm-up steps, "
                f"seed 0, float32, {args.threads} thread(s) per run.")
        sweeps: dict[str, tuple[dict[float, float], float]] = {}
        grid = [float(x) for x in args.lrs.split(",")]
        for method in [m for m in args.sweep.split(",") if m]:
            def score(lr: float, method: str = method) -> float:
                m = run_cached(config(method, lr), work / f"sweep-{method}-lr{lr:g}", val_size=args.val_size)
                print(f"sweep {method} lr={lr:g}: validation loss {m['eval_after']['loss']:.4f}", file=sys.stderr, flush=True)
                return m["eval_after"]["loss"]

            sweeps[method] = bracketed_sweep(score, grid, args.factor, args.extend)

        rows, measured = [], {}
        options = finetune_options(model="smollm2", rank=args.rank, steps=args.steps, batch_size=args.batch_size,
                                   max_length=args.max_length, eval_size=args.eval_size, threads=args.threads,
                                   device=torch.device("cpu"))
        options += ["--targets", args.targets, "--warmup", str(args.warmup)]
        for method in args.methods.split(","):
            out = work / f"default-{method}"
            run = whole_run(method, Setting(), options, out, args.threads, cuda=False)
            if not run.measured.ok:
                raise SystemExit(f"{method}: {run.measured.failure}")
            m = json.loads((out / "metrics.json").read_text())
            measured[method] = m, run.measured.rss
            print(f"default {method}: test loss {m['eval_after']['loss']:.4f}", file=sys.stderr, flush=True)

        def ratio(method: str, other: str, value) -> str:
            return f"{value(method) / value(other):.2f}x" if other in measured else "–"

        def step_seconds(method: str) -> float:
            return measured[method][0]["train_seconds"] / measured[method][0]["steps"]

        def peak(method: str) -> float:
            return measured[method][1]

        for method, (m, rss) in measured.items():
            rows.append([method, f"{m['lr']:g}", f"{m['trainable_params']:,}", f"{m['eval_before']['loss']:.4f}",
                         f"{m['eval_after']['loss']:.4f}", f"{m['eval_after']['accuracy']:.3f}",
                         f"{step_seconds(method):.3f}", ratio(method, "pissa", step_seconds), ratio(method, "lora", step_seconds),
                         f"{rss / 2**20:,.0f}", ratio(method, "pissa", peak), ratio(method, "lora", peak)])
        res.heading("Each method at its default learning rate")
        res.add(f"Whole `pissa finetune` runs, each in a fresh process; test metrics on {args.eval_size} held-out test "
                "reviews (loss before is the base model's); step time: training seconds / steps; peak: the process's "
                "peak RSS (the model, data and evaluation included).")
        res.table(["method", "default lr", "trainable params", "test loss before", "test loss after", "test accuracy",
                   "s / step", "vs PiSSA", "vs LoRA", "peak RSS (MiB)", "vs PiSSA", "vs LoRA"], rows)
        if sweeps:
            res.heading("Learning-rate sweeps (validation loss after training; chosen rate in bold)")
            first = next(iter(sweeps))
            meta = run_cached(config(first, sweeps[first][1]), work / f"sweep-{first}-lr{sweeps[first][1]:g}",
                              val_size=args.val_size)
            res.add(f"Validation: {meta['eval_examples']} reviews carved from the training data (seed {VAL_SEED}); the "
                    f"sweep runs trained on the other {meta['train_examples']:,}. A grid is extended by x{args.factor:g} past "
                    "an edge that holds the best score; 'edge' marks a choice still on one after the extensions.")
            lrs = sorted({lr for scores, _ in sweeps.values() for lr in scores})
            sweep_rows = []
            for method, (scores, best) in sweeps.items():
                cells = [("**{:.4f}**" if lr == best else "{:.4f}").format(scores[lr]) if lr in scores else "–" for lr in lrs]
                edge = best in (min(scores), max(scores))
                default = pissa.METHODS[method].default_lr
                sweep_rows.append([method, *cells, f"{best:g}" + (" (edge)" if edge else ""),
                                   "–" if default is None else f"{default:g}"])
            res.table(["method", *(f"lr {lr:g}" for lr in lrs), "chosen", "record's default_lr"], sweep_rows)


if __name__ == "__main__":
    main()
