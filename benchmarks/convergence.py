"""Convergence: PiSSA vs LoRA on the embedded task, each at its best learning rate.

1. Sweep (``--lrs``): every method x learning rate for ``--sweep-steps`` steps (same data order,
   seed, batch and cosine schedule); the score is the mean training loss over the last 10
   steps. Every batch is new data (well under one epoch), so this is a held-out loss.
2. Final (``--steps``, >= 150 for the issue's benchmark): each method at its best rate from the
   sweep, as ``pissa compare`` runs it; loss at steps 10 and 50 and at the end, test accuracy
   before and after on ``--eval-size`` held-out reviews.

    .venv/bin/python benchmarks/convergence.py                                       # sweep + final
    .venv/bin/python benchmarks/convergence.py --sweep-steps 10 --steps 20 --eval-size 20   # quick
    .venv/bin/python benchmarks/convergence.py --skip-final                          # sweep only

Writes ``benchmarks/results/convergence.md`` (sweep table, then the final report).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from pissa.report import plot_losses, write_report
from pissa.train import RunConfig, run

SWEEP_WINDOW = 10


def sweep(args: argparse.Namespace, methods: list[str], lrs: list[float], work: Path) -> dict[str, dict[float, float]]:
    """``{method: {lr: mean training loss of the last 10 steps}}``."""
    scores: dict[str, dict[float, float]] = {}
    for method in methods:
        for lr in lrs:
            cfg = RunConfig(method=method, rank=args.rank, lr=lr, steps=args.sweep_steps, batch_size=args.batch_size,
                            eval_size=args.sweep_eval_size, threads=args.threads, save_every=0)
            m = run(cfg, work / f"sweep-{method}-{lr:g}", show=False)
            tail = [loss for _, loss in m["train_loss"][-SWEEP_WINDOW:]]
            scores.setdefault(method, {})[lr] = sum(tail) / len(tail)
            print(f"sweep {method} lr={lr:g}: loss {scores[method][lr]:.4f}", file=sys.stderr, flush=True)
    return scores


def sweep_table(scores: dict[str, dict[float, float]], args: argparse.Namespace) -> str:
    lrs = sorted({lr for s in scores.values() for lr in s})
    lines = [
        "## Learning-rate sweep",
        "",
        f"Rank {args.rank}, {args.sweep_steps} steps of batch {args.batch_size}, cosine schedule with 10 warm-up steps, "
        f"seed 0; mean training loss (completion tokens) over the last {SWEEP_WINDOW} steps; best per method in bold.",
        "",
        "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
        "|---|" + "---|" * len(lrs),
    ]
    for method, s in scores.items():
        best = min(s, key=s.get)
        cells = [("**{:.4f}**" if lr == best else "{:.4f}").format(s[lr]) if lr in s else "–" for lr in lrs]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="pissa,lora")
    p.add_argument("--lrs", default="2e-5,5e-5,1e-4,2e-4,5e-4", help="comma-separated sweep learning rates")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--sweep-steps", type=int, default=60)
    p.add_argument("--sweep-eval-size", type=int, default=1, help="test examples per sweep run (the score is the train loss)")
    p.add_argument("--steps", type=int, default=150, help="steps of the final comparison")
    p.add_argument("--eval-size", type=int, default=200)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--skip-sweep", action="store_true", help="final comparison at pissa.train.DEFAULT_LR")
    p.add_argument("--skip-final", action="store_true", help="sweep only")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "convergence.md"))
    args = p.parse_args()
    methods = args.methods.split(",")
    command = " ".join(["python", "benchmarks/convergence.py", *sys.argv[1:]])
    parts = [f"# Convergence on the embedded task (SmolLM2-135M-Instruct, Rotten Tomatoes)\n\n`{command}`, "
             f"{args.threads} thread(s), load average at the start {os.getloadavg()[0]:.1f} (shared CPU).\n"]
    with tempfile.TemporaryDirectory(prefix="convergence-") as tmp:
        work = Path(tmp)
        best: dict[str, float | None] = {m: None for m in methods}
        if not args.skip_sweep:
            scores = sweep(args, methods, [float(x) for x in args.lrs.split(",")], work)
            best = {m: min(s, key=s.get) for m, s in scores.items()}
            parts.append(sweep_table(scores, args))
        if not args.skip_final:
            results = {}
            for method in methods:
                cfg = RunConfig(method=method, rank=args.rank, lr=best[method], steps=args.steps,
                                batch_size=args.batch_size, eval_size=args.eval_size, threads=args.threads, save_every=0)
                results[method] = run(cfg, work / f"final-{method}")
            plot = Path(args.out).with_suffix(".png")
            plot_losses({m: r["train_loss"] for m, r in results.items()}, plot, title=f"rank {args.rank}, best lr each")
            parts.append("## Final comparison\n\n" + write_report(results).split("\n", 2)[2] + f"\n![loss curves]({plot.name})\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(parts))
    print("\n".join(parts))


if __name__ == "__main__":
    main()
