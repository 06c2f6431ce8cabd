"""Convergence: PiSSA vs LoRA (or any registered methods) on the embedded task, each at the lr chosen on validation data.

1. Sweep (``--lrs``): every method x learning rate for ``--sweep-steps`` steps (same data order,
   seed, batch and cosine schedule), trained on the training data minus ``--val-size`` reviews
   carved from it; the score is the validation loss after training on those reviews (the mean
   training loss of the last 10 steps is listed too). The test split is not read.
2. Final (``--steps``, 150 for the README's table): each method at its chosen rate, as
   ``pissa compare`` runs it (the whole training split, in one process, one method after the
   other); loss at steps 10 and 50 and at the end, test loss and accuracy before and after on
   ``--eval-size`` held-out test reviews, and a plot of the loss curves.

Data-aware methods (``Method.needs`` covariance or gradient) get their statistics as ``pissa compare``
makes them (:func:`pissa.training.compare.own_calibration`): one pass over the first 256 examples of the very
training split the runs train on (so the sweep's calibration never sees its validation reviews),
with gradients when one of the methods reads them.

    .venv/bin/python benchmarks/convergence.py                                       # sweep + final
    .venv/bin/python benchmarks/convergence.py --lrs 5e-5,2e-4 --sweep-steps 30 --skip-final --name convergence_sweep
    .venv/bin/python benchmarks/convergence.py --sweep-steps 2 --steps 2 --lrs 5e-5,2e-4 --val-size 4 --eval-size 4  # quick
    .venv/bin/python benchmarks/convergence.py --skip-sweep                          # final only, default rates
    .venv/bin/python benchmarks/convergence.py --methods pissa,lora,corda,eva,lora-ga,lora-sb,loldu \
        --lrs 5e-5,2e-4,5e-4 --sweep-steps 20 --val-size 100 --steps 30 --name convergence_data_aware

Writes ``bench_out/NAME.md`` and ``NAME.png`` (``--update-results``: ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from pathlib import Path

from _results import Results, add_results_options
from _validation import VAL_SEED, run_cached
from pissa.adapter.config import AdapterConfig
from pissa.calibration.config import CALIBRATION_SAMPLES
from pissa.training.compare import own_calibration, reads_statistics, with_calibration
from pissa.training.config import RunConfig
from pissa.training.report import plot_losses, write_report

SWEEP_WINDOW = 10


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="pissa,lora")
    p.add_argument("--lrs", default="2e-5,5e-5,1e-4,2e-4,5e-4", help="comma-separated sweep learning rates")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--sweep-steps", type=int, default=60)
    p.add_argument("--val-size", type=int, default=200, help="validation reviews carved from the training data (sweep score)")
    p.add_argument("--steps", type=int, default=150, help="steps of the final comparison")
    p.add_argument("--eval-size", type=int, default=200, help="test reviews scored in the final comparison")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--skip-sweep", action="store_true", help="final comparison at each method's default lr (pissa.METHODS)")
    p.add_argument("--skip-final", action="store_true", help="sweep only")
    p.add_argument("--work", default=None, help="folder of the runs (default: a temporary folder); finished runs are reused")
    add_results_options(p, "convergence")
    args = p.parse_args()
    if args.skip_sweep and args.skip_final:
        p.error("--skip-sweep and --skip-final leave nothing to run")
    methods = args.methods.split(",")
    lrs = [float(x) for x in args.lrs.split(",")]

    aware = [m for m in methods if reads_statistics(m)]
    title = "Convergence on the embedded task (SmolLM2-135M-Instruct, Rotten Tomatoes)"
    with Results.from_args(args, title) as res, tempfile.TemporaryDirectory(prefix="convergence-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)

        def config(method: str, lr: float | None, steps: int, val_size: int = 0) -> RunConfig:
            cfg = RunConfig(adapter=AdapterConfig(method=method, rank=args.rank), lr=lr, steps=steps,
                            batch_size=args.batch_size, eval_size=args.eval_size, threads=args.threads, save_every=0)
            if method not in aware:
                return cfg
            path = work / f"calibration-val{val_size}.safetensors"  # reused when model and data match
            if path not in calibrated:
                own_calibration(dataclasses.replace(cfg, val_size=val_size), aware, path)
                calibrated.add(path)
            return with_calibration(cfg, path)

        calibrated: set[Path] = set()
        if aware:
            res.add(f"Data-aware methods ({', '.join(aware)}) read statistics of the first {CALIBRATION_SAMPLES} examples of "
                    "the training "
                    "split their runs train on (pissa.training.compare.own_calibration, as `pissa compare` makes them), "
                    "gradients included.")

        best: dict[str, float | None] = {m: None for m in methods}
        if not args.skip_sweep:
            sweep: dict[str, dict[float, dict]] = {}
            for method in methods:
                for lr in lrs:
                    m = run_cached(config(method, lr, args.sweep_steps, args.val_size), work / f"sweep-{method}-lr{lr:g}",
                                   val_size=args.val_size)
                    sweep.setdefault(method, {})[lr] = m
                    print(f"sweep {method} lr={lr:g}: validation loss {m['eval_after']['loss']:.4f}", file=sys.stderr, flush=True)
            best = {method: min(by_lr, key=lambda lr: by_lr[lr]["eval_after"]["loss"]) for method, by_lr in sweep.items()}
            meta = sweep[methods[0]][lrs[0]]
            res.heading("Learning-rate sweep")
            res.add(f"Rank {args.rank}, {args.sweep_steps} steps of batch {args.batch_size}, cosine schedule with 10 "
                    f"warm-up steps, seed 0, {args.threads} thread(s). Trained on {meta['train_examples']:,} training "
                    f"reviews; validation: the other {meta['eval_examples']} reviews of the training split (hash of the "
                    f"prompt, seed {VAL_SEED}). The test split was not read. Chosen rate (lowest validation loss) in bold.")

            def grid(value) -> list[list[str]]:
                rows = []
                for method, by_lr in sweep.items():
                    cells = [value(by_lr[lr]) for lr in lrs]
                    rows.append([method, *(f"**{c}**" if lr == best[method] else c for lr, c in zip(lrs, cells))])
                return rows

            header = ["method", *(f"lr {lr:g}" for lr in lrs)]
            res.add("Validation loss after training:")
            res.table(header, grid(lambda m: f"{m['eval_after']['loss']:.4f}"))
            res.add("Validation accuracy after training:")
            res.table(header, grid(lambda m: f"{m['eval_after']['accuracy']:.3f}"))
            res.add(f"Mean training loss (completion tokens) of the last {SWEEP_WINDOW} steps (not used for the choice):")
            def last_mean(m) -> str:
                tail = m["train_loss"][-SWEEP_WINDOW:]
                return f"{sum(x for _, x in tail) / len(tail):.4f}"

            res.table(header, grid(last_mean))
        if not args.skip_final:
            results = {}
            for method in methods:
                lr_tag = "default" if best[method] is None else format(best[method], "g")
                results[method] = run_cached(config(method, best[method], args.steps), work / f"final-{method}-lr{lr_tag}")
            chosen = ("the learning rate chosen on validation data (above)" if not args.skip_sweep
                      else "its default learning rate (pissa.METHODS[name].default_lr)")
            res.heading("Final comparison")
            res.add(f"Each method at {chosen}, {args.threads} thread(s), the methods run one after the other in this "
                    "process.")
            res.add(write_report(results).split("\n", 2)[2])
            res.add("time (s): each run's whole wall time as `pissa.training.run.run` reports it (model load, init, training, "
                    "both evaluations).")
            plot = res.artifact(f"{args.name}.png")
            plot_losses({m: r["train_loss"] for m, r in results.items()}, plot,
                        title=f"rank {args.rank}, lr " + ", ".join(f"{m} {r['lr']:g}" for m, r in results.items()))
            res.add(f"![loss curves]({args.name}.png)")


if __name__ == "__main__":
    main()
