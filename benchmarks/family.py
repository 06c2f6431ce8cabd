"""The SVD-adapter family on the embedded task: each method at the lr chosen on validation data, with intruder dimensions.

1. Sweep: every method x learning rate of its grid (``--lrs``; ``--core-lrs`` for SVFit, LoRA-XS
   and CLIP-SVD, whose only trainable part is a small core or the singular values) for ``--steps`` steps, same data order,
   seed, batch, schedule and targets (``pissa compare``'s runs), trained on the training data
   minus ``--val-size`` reviews carved from it; score: validation loss after training on those
   reviews. The test split is not read.
2. Each method at its chosen rate, an ordinary run (the whole training split, same steps):
   test loss and accuracy before and after on ``--eval-size`` held-out test reviews, and the
   intruder dimensions of its adapter (:mod:`pissa.analysis.spectra`: top-10 singular vectors of
   W + ΔW whose max |cos| with every singular vector of W is < 0.5, summed over the layers).
3. With ``--default-lr-steps N``: every method at its default learning rate
   (``pissa.METHODS[name].default_lr``) for N steps, same options otherwise, with intruders.

    .venv/bin/python benchmarks/family.py                                   # the README's table
    .venv/bin/python benchmarks/family.py --methods pissa,svfit --steps 2 --eval-size 4 --val-size 4 \\
        --lrs 2e-4 --core-lrs 1e-3                                          # quick

Runs live in ``--work`` (``WORK/{sweep,final,default}-<method>-lr<lr>/``; a finished run with the
same config is reused, so an interrupted benchmark resumes). Writes ``bench_out/family.md``
(``--update-results``: ``benchmarks/results/family.md``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from _results import Results, add_results_options
from _validation import VAL_SEED, run_cached
from pissa.adapter.config import AdapterConfig
from pissa.analysis.spectra import load_layers, max_cosines
from pissa.training.config import RunConfig

METHODS = "pissa,lora,milora,olora,svfit,lora-xs,sorsa"
CORE_ONLY = {"svfit", "lora-xs", "clip-svd"}


def intruders(adapter: Path, k: int = 10, threshold: float = 0.5) -> tuple[int, int, int, float]:
    """(total intruders, layers with >= 1, layers, mean ||ΔW|| / ||W||) of an adapter on the embedded SmolLM2."""
    layers = load_layers("smollm2", str(adapter), None, "causal-lm")
    counts = [int((max_cosines(lw.base, lw.tuned, k) < threshold).sum()) for lw in layers]
    rel = sum((lw.update.norm() / lw.base.norm()).item() for lw in layers) / len(layers)
    return sum(counts), sum(c > 0 for c in counts), len(layers), rel


RESULT_HEADER = ["method", "{lr}", "trainable params", "test loss before", "test loss after", "accuracy before",
                 "accuracy after", "intruders (layers hit / layers)", "mean ‖ΔW‖/‖W‖"]


def result_row(method: str, m: dict, workdir: Path) -> list[str]:
    total, hit, n, rel = intruders(workdir / "adapter")
    return [method, f"{m['lr']:g}", f"{m['trainable_params']:,}", f"{m['eval_before']['loss']:.4f}",
            f"{m['eval_after']['loss']:.4f}", f"{m['eval_before']['accuracy']:.3f}", f"{m['eval_after']['accuracy']:.3f}",
            f"{total} ({hit} / {n})", f"{rel:.2e}"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=METHODS)
    p.add_argument("--lrs", default="5e-5,2e-4,1e-3", help="sweep of methods that train full factors")
    p.add_argument("--core-lrs", default="2e-4,1e-3,1e-2,1e-1",
                   help="sweep of SVFit, LoRA-XS and CLIP-SVD (a small trainable core)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--val-size", type=int, default=64, help="validation reviews carved from the training data (sweep score)")
    p.add_argument("--eval-size", type=int, default=32, help="test reviews scored in the reported runs")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reg-weight", type=float, default=1e-3, help="SORSA's regularizer weight (no effect on the others)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--default-lr-steps", type=int, default=0,
                   help="also run every method at its default lr for this many steps (0: skip)")
    p.add_argument("--work", default=None, help="folder of the runs (default: a temporary folder)")
    add_results_options(p, "family")
    args = p.parse_args()
    methods = args.methods.split(",")
    grids = {m: [float(x) for x in (args.core_lrs if m in CORE_ONLY else args.lrs).split(",")] for m in methods}

    def config(method: str, lr: float | None, steps: int) -> RunConfig:
        adapter = AdapterConfig(method=method, rank=args.rank, targets=args.targets.split(","))
        return RunConfig(adapter=adapter, lr=lr, steps=steps,
                         batch_size=args.batch_size, max_length=args.max_length, eval_size=args.eval_size,
                         warmup=args.warmup, reg_weight=args.reg_weight, threads=args.threads, save_every=0)

    title = "The SVD-adapter family on the embedded task (SmolLM2-135M-Instruct, Rotten Tomatoes)"
    with Results.from_args(args, title) as res, tempfile.TemporaryDirectory(prefix="family-") as tmp:
        work = Path(args.work or tmp)
        val: dict[str, dict[float, dict]] = {}
        for method in methods:
            for lr in grids[method]:
                m = run_cached(config(method, lr, args.steps), work / f"sweep-{method}-lr{lr:g}", val_size=args.val_size)
                val.setdefault(method, {})[lr] = m
                print(f"sweep {method} lr={lr:g}: validation loss {m['eval_after']['loss']:.4f}", file=sys.stderr, flush=True)
        best = {method: min(by_lr, key=lambda lr: by_lr[lr]["eval_after"]["loss"]) for method, by_lr in val.items()}
        sweep_meta = next(iter(next(iter(val.values())).values()))
        rows = []
        for method in methods:
            workdir = work / f"final-{method}-lr{best[method]:g}"
            m = run_cached(config(method, best[method], args.steps), workdir)
            print(f"final {method} lr={best[method]:g}: test loss {m['eval_after']['loss']:.4f}", file=sys.stderr, flush=True)
            rows.append(result_row(method, m, workdir))

        res.add(f"Rank {args.rank}, targets {args.targets}, {args.steps} steps of batch {args.batch_size} (max "
                f"{args.max_length} tokens), cosine schedule with {args.warmup} warm-up steps, seed 0, SORSA's "
                f"--reg-weight {args.reg_weight:g}, {args.threads} thread(s) per run.")
        res.heading("Each method at the learning rate chosen on validation data")
        res.add(f"lr: the grid's rate with the lowest validation loss (below). Each row is then an ordinary run at that "
                f"rate on the whole training split; test metrics on {args.eval_size} held-out test reviews, which no "
                "choice was made on.")
        res.table([h.format(lr="chosen lr") for h in RESULT_HEADER], rows)
        res.add("Intruders: top-10 singular vectors of W + ΔW whose largest |cosine| with every singular vector of W is "
                "below 0.5 (Shuttleworth et al., 2024), summed over the adapted layers.")
        res.heading("Learning-rate sweep (validation loss after training; chosen rate in bold)")
        res.add(f"Validation: {sweep_meta['eval_examples']} reviews carved from the training data (hash of the prompt, "
                f"seed {VAL_SEED}); the sweep runs trained on the other {sweep_meta['train_examples']:,} training "
                "reviews. The test split was not read.")
        lrs = sorted({lr for g in grids.values() for lr in g})
        sweep_rows = []
        for method, by_lr in val.items():
            cells = []
            for lr in lrs:
                cell = f"{by_lr[lr]['eval_after']['loss']:.4f}" if lr in by_lr else "–"
                cells.append(f"**{cell}**" if lr == best[method] else cell)
            sweep_rows.append([method, *cells])
        res.table(["method", *(f"lr {lr:g}" for lr in lrs)], sweep_rows)

        if args.default_lr_steps:
            rows = []
            for method in methods:
                workdir = work / f"default-{method}-steps{args.default_lr_steps}"
                m = run_cached(config(method, None, args.default_lr_steps), workdir)
                rows.append(result_row(method, m, workdir))
            res.heading(f"Each method at its default learning rate, {args.default_lr_steps} steps")
            res.add(f"Default rates: `pissa.METHODS[name].default_lr` (fallback for unmeasured methods); other options as "
                    f"above; test metrics on {args.eval_size} held-out test reviews.")
            res.table([h.format(lr="default lr") for h in RESULT_HEADER], rows)


if __name__ == "__main__":
    main()
