"""Default learning rates of PiSSA and LoRA: a bracketed validation sweep over seeds, then ``pissa compare`` on the test split.

1. Sweep: each method (``--methods``) x learning rate of its grid (``--grid METHOD=LR,LR,...``) x seed (``--seeds``)
   at the default budget (``RunConfig``: 150 steps of batch 8, cosine schedule, rank 16), trained on the training
   data minus ``--val-size`` reviews carved from it; score: the validation loss after training, averaged over the
   seeds. A method whose best rate is an edge of its grid gets the next rate ``--factor`` past that edge (at most
   ``--extend`` times, :func:`_validation.bracketed_sweep`'s rule), so the chosen rate is bracketed. The test
   split is not read.
2. Final: for each seed, ``pissa compare --methods ...`` (:func:`pissa.training.compare.compare`) at the
   methods' default learning rates (``pissa.METHODS[name].default_lr``), which must be the rates chosen in 1.
   (the script refuses otherwise: update the method records first, e.g. after a ``--skip-final`` run). Test loss
   and accuracy on ``--eval-size`` test reviews, training loss early (step 10) and at the end, per seed and as
   mean +- sd, and the paired differences: whether PiSSA ends ahead of LoRA, and by how much.

Every run is one process of ``--jobs`` workers with one torch thread each (a pool of fresh processes), cached in
``--work`` (a finished run with the same config is reused, so an interrupted benchmark resumes where it stopped).

    .venv/bin/python benchmarks/default_lr.py --skip-final --work /tmp/bench/lr         # 1. (about 1.5 h here)
    .venv/bin/python benchmarks/default_lr.py --work /tmp/bench/lr --update-results      # 1. reused + 2.
    .venv/bin/python benchmarks/default_lr.py --steps 2 --val-size 4 --eval-size 4 --seeds 0 \\
        --grid pissa=1e-4,1e-3 --grid lora=1e-4,1e-3 --skip-final                         # quick

Writes ``bench_out/default_lr.md`` (``--update-results``: ``benchmarks/results/default_lr.md``).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from _results import Results, add_results_options
from _validation import VAL_SEED, run_cached
from pissa.adapter.config import AdapterConfig
from pissa.methods.registry import METHODS
from pissa.options import config_text
from pissa.training.compare import compare
from pissa.training.config import CompareConfig, RunConfig
from pissa.training.report import WINDOW, window_mean
from pissa.training.run import RUN_CONFIG

GRIDS = {"pissa": (5e-4, 1e-3, 2e-3), "lora": (2e-4, 5e-4, 1e-3)}
"""Starting grids: the 30- and 60-step sweeps chose 5e-4 (PiSSA, the top of their grids) and 2e-4 (LoRA)."""
EARLY = 10


def sweep_run(cfg: RunConfig, workdir: str, val_size: int) -> dict[str, Any]:
    """One validation run (a pool worker's job)."""
    return run_cached(cfg, Path(workdir), val_size=val_size)


def compare_run(cfg: CompareConfig, workdir: str) -> dict[str, dict[str, Any]]:
    """One ``pissa compare`` into ``workdir`` (a pool worker's job), or the finished one with the same config there:
    ``{method: metrics}``."""
    out = Path(workdir)
    if (out / "report.md").is_file() and (out / RUN_CONFIG).read_text() == config_text(cfg):
        return {m: json.loads((out / m / "metrics.json").read_text()) for m in cfg.methods}
    return {m: r.to_dict() for m, r in compare(cfg, out, resume=Path(workdir + ".partial").is_dir()).results.items()}


def next_rate(scores: dict[float, float], factor: float) -> float | None:
    """The rate one ``factor`` past the edge holding the lowest score, or None when the best is inside the grid."""
    lrs, best = sorted(scores), min(scores, key=scores.__getitem__)
    if best not in (lrs[0], lrs[-1]) or len(lrs) == 1:
        return None
    return float(f"{(lrs[0] / factor if best == lrs[0] else lrs[-1] * factor):.3g}")


def mean_sd(xs: Sequence[float], fmt: str = ".4f") -> str:
    """``mean +- sd`` of ``xs`` (sd: sample standard deviation; none for one value)."""
    m = statistics.fmean(xs)
    return f"{m:{fmt}}" if len(xs) < 2 else f"{m:{fmt}} ± {statistics.stdev(xs):{fmt}}"


def parse_grids(items: Sequence[str], methods: Sequence[str]) -> dict[str, list[float]]:
    """``METHOD=LR,LR`` items over the defaults of :data:`GRIDS` (a method with neither gets its default_lr x {1/3, 1, 3})."""
    grids = {m: list(GRIDS.get(m, ())) for m in methods}
    for item in items:
        name, _, lrs = item.partition("=")
        if name not in grids or not lrs:
            raise SystemExit(f"--grid {item!r}: expected METHOD=LR,LR,... with METHOD one of {','.join(methods)}")
        grids[name] = [float(x) for x in lrs.split(",")]
    for m, grid in grids.items():
        if not grid:
            lr = METHODS[m].learning_rate
            grids[m] = [float(f"{lr / 3:.3g}"), lr, float(f"{lr * 3:.3g}")]
    return grids


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=RunConfig.model)
    p.add_argument("--data", default=RunConfig.data)
    p.add_argument("--methods", default="pissa,lora")
    p.add_argument("--grid", action="append", default=[], help="METHOD=LR,LR,... (repeatable; default: GRIDS)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=RunConfig.steps, help="steps of every run (the default budget)")
    p.add_argument("--rank", type=int, default=AdapterConfig.rank)
    p.add_argument("--batch-size", type=int, default=RunConfig.batch_size)
    p.add_argument("--val-size", type=int, default=200, help="validation reviews carved from the training data")
    p.add_argument("--eval-size", type=int, default=200, help="test reviews of the final comparison")
    p.add_argument("--factor", type=float, default=2.0, help="step past a grid's edge")
    p.add_argument("--extend", type=int, default=3, help="most rates added past an edge per method")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (one torch thread each)")
    p.add_argument("--skip-final", action="store_true", help="the sweep only")
    p.add_argument("--work", default=None, help="folder of the runs (default: a temporary folder); finished runs are reused")
    add_results_options(p, "default_lr")
    args = p.parse_args()
    methods, seeds = args.methods.split(","), [int(s) for s in args.seeds.split(",")]
    grids = parse_grids(args.grid, methods)

    def config(method: str, lr: float | None, seed: int) -> RunConfig:
        return RunConfig(model=args.model, data=args.data, adapter=AdapterConfig(method=method, rank=args.rank, seed=seed),
                         lr=lr, steps=args.steps, batch_size=args.batch_size, eval_size=args.eval_size, threads=1,
                         save_every=0)

    title = "Default learning rates of PiSSA and LoRA (SmolLM2-135M-Instruct, Rotten Tomatoes)"
    ctx = multiprocessing.get_context("spawn")
    with (Results.from_args(args, title) as res, tempfile.TemporaryDirectory(prefix="default-lr-") as tmp,
          cf.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool):
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        runs: dict[tuple[str, float, int], dict[str, Any]] = {}
        pending = {m: list(g) for m, g in grids.items()}
        added = dict.fromkeys(methods, 0)
        while any(pending.values()):  # one round: every pending (method, lr, seed) at once
            jobs = {pool.submit(sweep_run, config(m, lr, s), str(work / f"sweep-{m}-lr{lr:g}-seed{s}"), args.val_size):
                    (m, lr, s) for m, lrs in pending.items() for lr in lrs for s in seeds}
            for job in cf.as_completed(jobs):
                runs[jobs[job]] = metrics = job.result()
                print(f"sweep {jobs[job]}: validation loss {metrics['eval_after']['loss']:.4f}", file=sys.stderr, flush=True)
            for m in methods:
                nxt = next_rate(val_scores(runs, m, seeds), args.factor)
                pending[m] = [nxt] if nxt is not None and added[m] < args.extend else []
                added[m] += bool(pending[m])
        chosen = {m: min(scores, key=scores.__getitem__) for m in methods if (scores := val_scores(runs, m, seeds))}
        sweep_section(res, args, runs, methods, seeds, chosen)
        if args.skip_final:
            return
        wrong = {m: METHODS[m].default_lr for m in methods if METHODS[m].default_lr != chosen[m]}
        if wrong:
            raise SystemExit(f"default_lr of {wrong} differs from the chosen {chosen}: set the method records "
                             "(pissa/methods/registry.py) to the chosen rates, then rerun with the same --work")
        jobs = {pool.submit(compare_run, CompareConfig(model=args.model, data=args.data, methods=methods,
                                                       adapter=AdapterConfig(rank=args.rank, seed=s), steps=args.steps,
                                                       batch_size=args.batch_size, eval_size=args.eval_size, threads=1,
                                                       save_every=0),
                            str(work / f"final-seed{s}")): s for s in seeds}
        final = {jobs[job]: job.result() for job in cf.as_completed(jobs)}
        final_section(res, args, final, methods, seeds, chosen)


def val_scores(runs: dict[tuple[str, float, int], dict[str, Any]], method: str, seeds: Sequence[int]) -> dict[float, float]:
    """``{lr: mean validation loss over seeds}`` of ``method``'s finished sweep rates."""
    lrs = sorted({lr for m, lr, _ in runs if m == method})
    return {lr: statistics.fmean(runs[method, lr, s]["eval_after"]["loss"] for s in seeds) for lr in lrs}


def sweep_section(res: Results, args: argparse.Namespace, runs: dict, methods: Sequence[str], seeds: Sequence[int],
                  chosen: dict[str, float]) -> None:
    meta = next(iter(runs.values()))
    res.heading("Learning-rate sweep (validation split)")
    res.add(f"{args.model}, rank {args.rank}, {args.steps} steps of batch {args.batch_size}, cosine schedule with 10 "
            f"warm-up steps (the defaults: rank {AdapterConfig.rank}, {RunConfig.steps} steps of batch "
            f"{RunConfig.batch_size}), seeds "
            f"{', '.join(map(str, seeds))}, one torch thread per run, {args.jobs} runs at once. Trained on "
            f"{meta['train_examples']:,} training reviews; validation: the other {meta['eval_examples']} reviews of the "
            f"training split (hash of the prompt, seed {VAL_SEED}). The test split was not read. Score: validation loss "
            f"after training, mean ± sd over the seeds; chosen rate (lowest mean) in bold. Grids were extended by x"
            f"{args.factor:g} past an edge holding the best mean (at most {args.extend} times).")
    for what, value in (("Validation loss", lambda m: m["eval_after"]["loss"]),
                        ("Validation accuracy", lambda m: m["eval_after"]["accuracy"])):
        res.add(f"{what} after training (mean ± sd; then seed by seed):")
        rows = []
        for method in methods:
            for lr in sorted({lr for m, lr, _ in runs if m == method}):
                xs = [value(runs[method, lr, s]) for s in seeds]
                cell = mean_sd(xs, ".4f" if what.endswith("loss") else ".3f")
                rows.append([method, f"{lr:g}", f"**{cell}**" if lr == chosen[method] else cell,
                             *(f"{x:.4f}" if what.endswith("loss") else f"{x:.3f}" for x in xs)])
        res.table(["method", "lr", "mean ± sd", *(f"seed {s}" for s in seeds)], rows)
    bracketed = {m: (min(g := sorted({lr for mm, lr, _ in runs if mm == m})) < chosen[m] < max(g)) for m in methods}
    res.add("Chosen: " + "; ".join(f"{m} {chosen[m]:g} ({'bracketed' if bracketed[m] else 'NOT bracketed: an edge'})"
                                   for m in methods) + ".")


def final_section(res: Results, args: argparse.Namespace, final: dict[int, dict[str, dict]], methods: Sequence[str],
                  seeds: Sequence[int], chosen: dict[str, float]) -> None:
    res.heading("pissa compare at the new defaults (test split)")
    res.add(f"For each seed, `pissa compare --methods {','.join(methods)} --seed S --threads 1` on {args.model} "
            f"(pissa.training.compare.compare; {', '.join(f'{m} lr {chosen[m]:g}' for m in methods)}, the method records' "
            f"default_lr), {args.steps} steps on the whole training split, {args.eval_size} test reviews scored before and "
            f"after. Training losses: mean over the {WINDOW} steps ending at the step shown.")
    early = min(EARLY, args.steps)
    cols: list[tuple[str, Callable[[dict], float | None]]] = [
        ("test loss after", lambda m: m["eval_after"]["loss"]), ("test accuracy after", lambda m: m["eval_after"]["accuracy"]),
        (f"train loss step {early}", lambda m: window_mean(m["train_loss"], early)),
        (f"train loss step {args.steps}", lambda m: window_mean(m["train_loss"], args.steps))]
    rows = []
    for method in methods:
        for name, get in cols:
            xs = [float(get(final[s][method])) for s in seeds]
            fmt = ".3f" if "accuracy" in name else ".4f"
            rows.append([method, name, mean_sd(xs, fmt), *(f"{x:{fmt}}" for x in xs)])
    res.table(["method", "metric", "mean ± sd", *(f"seed {s}" for s in seeds)], rows)
    res.add(f"Test loss and accuracy before training (the base, same for every seed): loss "
            f"{final[seeds[0]][methods[0]]['eval_before']['loss']:.4f}, accuracy "
            f"{final[seeds[0]][methods[0]]['eval_before']['accuracy']:.3f}.")
    if len(methods) < 2:
        return
    a, b = methods[:2]
    res.heading(f"Does {a} end ahead of {b}?")
    res.add(f"Paired differences {a} - {b} (same seed, so same data order); negative loss / positive accuracy: {a} ahead. "
            f"The accuracy's sampling error on {args.eval_size} reviews is about ±"
            f"{(0.25 / max(args.eval_size, 1)) ** 0.5:.3f} (one sd at p = 0.5).")
    rows = []
    for name, get in cols:
        diffs = [float(get(final[s][a])) - float(get(final[s][b])) for s in seeds]
        better = sum((d > 0) if "accuracy" in name else (d < 0) for d in diffs)
        rows.append([name, mean_sd(diffs), *(f"{d:+.4f}" for d in diffs), f"{better} of {len(seeds)}"])
    res.table(["metric", "mean ± sd", *(f"seed {s}" for s in seeds), f"seeds {a} ahead"], rows)


if __name__ == "__main__":
    main()
