"""The SVD-adapter family on the embedded task: each method at its best lr from a small sweep, with intruder dimensions.

1. Sweep: every method x learning rate of its grid (``--lrs``; ``--core-lrs`` for SVFit and
   LoRA-XS, whose only trainable part is a small core) for ``--steps`` steps, same data order,
   seed, batch, schedule and targets (``pissa compare``'s runs); score: test loss after training
   on ``--eval-size`` held-out reviews.
2. The best run of each method (same steps for all) is its row of the table, with the intruder
   dimensions of its adapter (:mod:`pissa.intruders`: top-10 singular vectors of W + ΔW whose
   max |cos| with every singular vector of W is < 0.5, summed over the adapted layers).

    .venv/bin/python benchmarks/family.py                                   # the README's table
    .venv/bin/python benchmarks/family.py --steps 5 --eval-size 8 --lrs 2e-4 --core-lrs 1e-3   # quick

Runs live in ``--work`` (``WORK/<method>-lr<lr>/``, a finished run is reused, so an interrupted
benchmark resumes); writes ``benchmarks/results/family.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from pissa.intruders import load_layers, max_cosines
from pissa.train import RunConfig, run

METHODS = "pissa,lora,milora,olora,svfit,lora-xs,sorsa"
CORE_ONLY = {"svfit", "lora-xs"}


def run_or_reuse(cfg: RunConfig, workdir: Path) -> dict:
    import json

    if (workdir / "metrics.json").is_file():
        return json.loads((workdir / "metrics.json").read_text())
    return run(cfg, workdir, show=False)


def intruders(adapter: Path, k: int = 10, threshold: float = 0.5) -> tuple[int, int, int, float]:
    """(total intruders, layers with >= 1, layers, mean ||ΔW|| / ||W||) of an adapter on the embedded SmolLM2."""
    layers = load_layers("smollm2", str(adapter), None, "causal-lm")
    counts = [int((max_cosines(lw.base, lw.tuned, k) < threshold).sum()) for lw in layers]
    rel = sum((lw.update.norm() / lw.base.norm()).item() for lw in layers) / len(layers)
    return sum(counts), sum(c > 0 for c in counts), len(layers), rel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=METHODS)
    p.add_argument("--lrs", default="5e-5,2e-4,1e-3", help="sweep of methods that train full factors")
    p.add_argument("--core-lrs", default="2e-4,1e-3,1e-2", help="sweep of SVFit and LoRA-XS (a small trainable core)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--eval-size", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reg-weight", type=float, default=1e-3, help="SORSA's regularizer weight (no effect on the others)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default=None, help="folder of the runs (default: a temporary folder)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "family.md"))
    args = p.parse_args()
    methods = args.methods.split(",")
    grids = {m: [float(x) for x in (args.core_lrs if m in CORE_ONLY else args.lrs).split(",")] for m in methods}
    command = " ".join(["python", "benchmarks/family.py", *sys.argv[1:]])
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="family-") as tmp:
        work = Path(args.work or tmp)
        results: dict[str, dict[float, dict]] = {}
        for method in methods:
            for lr in grids[method]:
                cfg = RunConfig(method=method, rank=args.rank, targets=args.targets.split(","), lr=lr, steps=args.steps,
                                batch_size=args.batch_size, max_length=args.max_length, eval_size=args.eval_size,
                                warmup=args.warmup, reg_weight=args.reg_weight, threads=args.threads, save_every=0)
                m = run_or_reuse(cfg, work / f"{method}-lr{lr:g}")
                results.setdefault(method, {})[lr] = m
                print(f"{method} lr={lr:g}: test loss {m['eval_after']['loss']:.4f}", file=sys.stderr, flush=True)
        lrs = sorted({lr for g in grids.values() for lr in g})
        sweep = ["| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
        table = [
            "| method | best lr | trainable params | test loss before | test loss after | accuracy before | accuracy after "
            "| intruders (layers hit / layers) | mean ‖ΔW‖/‖W‖ |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for method, by_lr in results.items():
            best = min(by_lr, key=lambda lr: by_lr[lr]["eval_after"]["loss"])
            cells = []
            for lr in lrs:
                cell = f"{by_lr[lr]['eval_after']['loss']:.4f}" if lr in by_lr else "–"
                cells.append(f"**{cell}**" if lr == best else cell)
            sweep.append(f"| {method} | " + " | ".join(cells) + " |")
            m = by_lr[best]
            total, hit, n, rel = intruders(work / f"{method}-lr{best:g}" / "adapter")
            table.append(
                f"| {method} | {best:g} | {m['trainable_params']:,} | {m['eval_before']['loss']:.4f} | "
                f"{m['eval_after']['loss']:.4f} | {m['eval_before']['accuracy']:.3f} | {m['eval_after']['accuracy']:.3f} | "
                f"{total} ({hit} / {n}) | {rel:.2e} |"
            )
    text = "\n".join([
        "# The SVD-adapter family on the embedded task (SmolLM2-135M-Instruct, Rotten Tomatoes)",
        "",
        f"`{command}`; {args.threads} thread(s), load average {load:.1f} at the start (shared CPU).",
        f"Rank {args.rank}, targets {args.targets}, {args.steps} steps of batch {args.batch_size} (max {args.max_length} "
        f"tokens), cosine schedule with {args.warmup} warm-up steps, seed 0, SORSA's --reg-weight {args.reg_weight:g}; "
        f"test metrics on {args.eval_size} held-out reviews.",
        "",
        "## Each method at its best learning rate",
        "",
        *table,
        "",
        "Intruders: top-10 singular vectors of W + ΔW whose largest |cosine| with every singular vector of W is below 0.5 "
        "(Shuttleworth et al., 2024), summed over the adapted layers.",
        "",
        "## Learning-rate sweep (test loss after training; best in bold)",
        "",
        *sweep,
        "",
    ])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
