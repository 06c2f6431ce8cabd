"""The SVD-adapter family on the embedded task: each method at the lr chosen on validation data, with intruder dimensions.

1. Sweep: every method x learning rate of its grid (``--lrs``; ``--core-lrs`` for SVFit, LoRA-XS
   and CLIP-SVD, whose only trainable part is a small core or the singular values) for ``--steps`` steps, same data order,
   seed, batch, schedule and targets (``pissa compare``'s runs), trained on the training data
   minus ``--val-size`` reviews carved from it; score: validation loss after training on those
   reviews. The test split is not read.
2. Each method at its chosen rate, an ordinary run in a fresh process (the whole training split, same steps):
   test loss and accuracy before and after on ``--eval-size`` held-out test reviews, and the
   intruder dimensions of its adapter (:mod:`pissa.analysis.spectra`: top-10 singular vectors of
   W + ΔW whose max |cos| with every singular vector of W is < 0.5, summed over the layers).
3. With ``--default-lr-steps N``: every method at its default learning rate
   (``pissa.METHODS[name].default_lr``) for N steps, same options otherwise, with intruders.
4. With ``--against pissa,lora``: each method's run of 2. next to those methods at their default rates,
   every run in a fresh process (``pissa finetune --config``, :func:`_common.measure`): test loss and accuracy,
   trainable parameters, seconds per training step (``train_seconds / steps``), peak RSS, and both as ratios to
   the first ``--against`` method's.

``--extend N``: a method whose best rate is an edge of its grid gets up to N more rates, ``--factor`` past that
edge (:func:`_validation.bracketed_sweep`), so the chosen rate is bracketed. A compressed method (``welore``:
WeLore-COFT, which trains the factors of a ``pissa compress`` model) runs on ``--model`` compressed at
``--reduction`` (all-linear targets; :func:`pissa.compress_checkpoint`, built once per model and reduction in
``--compressed-cache``, atomically, resumable), every other method on ``--model`` itself; its rows have no
intruders (it has no adapter over the original W).

    .venv/bin/python benchmarks/family.py                                   # the README's table
    .venv/bin/python benchmarks/family.py --methods pissa,svfit --steps 2 --eval-size 4 --val-size 4 \\
        --lrs 2e-4 --core-lrs 1e-3                                          # quick
    .venv/bin/python benchmarks/family.py --methods welore --lrs 1e-4,1e-3,3e-3,1e-2 --extend 4 \
        --against pissa,lora --name family_welore                           # WeLore-COFT's default lr

Runs live in ``--work`` (``WORK/{sweep,final,default,against}-<method>-lr<lr>/``; a finished run with the
same config is reused, so an interrupted benchmark resumes). Writes ``bench_out/family.md``
(``--update-results``: ``benchmarks/results/family.md``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from _common import measure
from _results import Results, add_results_options
from _validation import VAL_SEED, bracketed_sweep, run_cached
from pissa.adapter.compressed import Record, is_compressed
from pissa.adapter.config import AdapterConfig
from pissa.analysis.spectra import load_layers, max_cosines
from pissa.checkpoints.compress import compress_checkpoint
from pissa.methods.registry import METHODS as REGISTRY
from pissa.options import config_text
from pissa.runtime import hub
from pissa.training.config import RunConfig

METHODS = "pissa,lora,milora,olora,svfit,lora-xs,sorsa"
CORE_ONLY = {"svfit", "lora-xs", "clip-svd"}


def intruders(model: str, adapter: Path, k: int = 10, threshold: float = 0.5) -> tuple[int, int, int, float]:
    """(total intruders, layers with >= 1, layers, mean ||ΔW|| / ||W||) of an adapter on ``model``."""
    layers = load_layers(model, str(adapter), None, "causal-lm")
    counts = [int((max_cosines(lw.base, lw.tuned, k) < threshold).sum()) for lw in layers]
    rel = sum((lw.update.norm() / lw.base.norm()).item() for lw in layers) / len(layers)
    return sum(counts), sum(c > 0 for c in counts), len(layers), rel


RESULT_HEADER = ["method", "{lr}", "trainable params", "test loss before", "test loss after", "accuracy before",
                 "accuracy after", "intruders (layers hit / layers)", "mean ‖ΔW‖/‖W‖"]


def scores(m: dict) -> list[str]:
    """Trainable parameters, test loss and accuracy before and after, of a run's metrics."""
    return [f"{m['trainable_params']:,}", f"{m['eval_before']['loss']:.4f}", f"{m['eval_after']['loss']:.4f}",
            f"{m['eval_before']['accuracy']:.3f}", f"{m['eval_after']['accuracy']:.3f}"]


def result_row(method: str, m: dict, workdir: Path, model: str) -> list[str]:
    if REGISTRY[method].compressed:  # no adapter over the original W: the trained factors replace it
        return [method, f"{m['lr']:g}", *scores(m), "–", "–"]
    total, hit, n, rel = intruders(model, workdir / "adapter")
    return [method, f"{m['lr']:g}", *scores(m), f"{total} ({hit} / {n})", f"{rel:.2e}"]


def compressed_model(model: str, reduction: float, cache: Path) -> Path:
    """``model`` compressed by :func:`pissa.compress_checkpoint` at ``reduction`` (all-linear), in ``cache`` under a
    name keyed by the model and the reduction; built once (atomically: an interrupted build resumes) and reused."""
    root = hub.resolve_model(model)
    key = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:8]
    out = cache / f"{Path(root).name}-{key}-reduction{reduction:g}"
    if not is_compressed(out):
        compress_checkpoint(model, out, reduction, "all-linear", progress=False)
    record = Record.read(out)
    if record.requested != reduction or record.plan != "welore":
        raise SystemExit(f"{out} holds a {record.plan} compression at {record.requested}, not welore at {reduction}")
    print(f"compressed {model} at reduction {reduction:g} (reached {record.reached:.4f}): {out}", file=sys.stderr)
    return out


def measured_run(cfg: RunConfig, workdir: Path) -> tuple[dict, int]:
    """``cfg`` as ``pissa finetune --config`` in a fresh process (:func:`_common.measure`): its metrics and its peak
    RSS (bytes); a finished run with the same config in ``workdir`` is reused."""
    record = {"config": json.loads(json.dumps(cfg.to_dict()))}
    record_file, metrics_file = workdir / "benchmark-run.json", workdir / "metrics.json"
    if record_file.is_file() and metrics_file.is_file():
        saved = json.loads(record_file.read_text())
        if saved["config"] == record["config"]:
            return json.loads(metrics_file.read_text()), saved["peak_rss"]
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.parent.mkdir(parents=True, exist_ok=True)
    config_file = workdir.parent / f"{workdir.name}.yaml"
    config_file.write_text(config_text(cfg))
    m = measure([sys.executable, "-m", "pissa", "finetune", "--config", str(config_file), "--out", str(workdir)],
                env={"OMP_NUM_THREADS": str(cfg.threads)})
    if not m.ok:
        raise RuntimeError(f"{cfg.method} at lr {cfg.lr}: {m.failure}")
    record_file.write_text(json.dumps({**record, "peak_rss": m.rss}, indent=2))
    return json.loads(metrics_file.read_text()), m.rss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=METHODS)
    p.add_argument("--model", default="smollm2", help="embedded model or folder (the compressed methods: its compression)")
    p.add_argument("--data", default="rotten_tomatoes")
    p.add_argument("--lrs", default="5e-5,2e-4,1e-3", help="sweep of methods that train full factors")
    p.add_argument("--core-lrs", default="2e-4,1e-3,1e-2,1e-1",
                   help="sweep of SVFit, LoRA-XS and CLIP-SVD (a small trainable core)")
    p.add_argument("--extend", type=int, default=0, help="rates added past a grid's edge when the best is there")
    p.add_argument("--factor", type=float, default=3.0, help="ratio between an added rate and the edge it extends")
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
    p.add_argument("--against", default="", help="methods run at their default lr next to each method at its chosen "
                   "lr, in fresh processes (step time, peak memory); ratios to the first")
    p.add_argument("--reduction", type=float, default=0.1,
                   help="the compressed methods (welore): the parameter reduction of the compressed model they train")
    p.add_argument("--compressed-cache", default=str(Path(tempfile.gettempdir()) / "pissa-benchmarks" / "compressed"),
                   help="folder of the compressed models, one per model and reduction, reused between runs")
    p.add_argument("--work", default=None, help="folder of the runs (default: a temporary folder)")
    add_results_options(p, "family")
    args = p.parse_args()
    methods = args.methods.split(",")
    against = [m for m in args.against.split(",") if m]
    if unknown := [m for m in methods + against if m not in REGISTRY]:
        raise SystemExit(f"unknown methods: {', '.join(unknown)}")
    grids = {m: [float(x) for x in (args.core_lrs if m in CORE_ONLY else args.lrs).split(",")] for m in methods}

    compressed = None
    if any(REGISTRY[m].compressed for m in methods + against):
        compressed = str(compressed_model(args.model, args.reduction, Path(args.compressed_cache)))

    def config(method: str, lr: float | None, steps: int) -> RunConfig:
        adapter = AdapterConfig(method=method, rank=args.rank, targets=args.targets.split(","))
        model = compressed if REGISTRY[method].compressed else args.model
        return RunConfig(model=model, data=args.data, adapter=adapter, lr=lr, steps=steps,
                         batch_size=args.batch_size, max_length=args.max_length, eval_size=args.eval_size,
                         warmup=args.warmup, reg_weight=args.reg_weight, threads=args.threads, save_every=0)

    title = f"The SVD-adapter family: {args.model}, {args.data}"
    if (args.model, args.data) == ("smollm2", "rotten_tomatoes"):
        title = "The SVD-adapter family on the embedded task (SmolLM2-135M-Instruct, Rotten Tomatoes)"
    with Results.from_args(args, title) as res, tempfile.TemporaryDirectory(prefix="family-") as tmp:
        work = Path(args.work or tmp)
        val: dict[str, dict[float, dict]] = {}
        best: dict[str, float] = {}
        for method in methods:
            def score(lr: float, method: str = method) -> float:
                m = run_cached(config(method, lr, args.steps), work / f"sweep-{method}-lr{lr:g}", val_size=args.val_size)
                val.setdefault(method, {})[lr] = m
                print(f"sweep {method} lr={lr:g}: validation loss {m['eval_after']['loss']:.4f}", file=sys.stderr, flush=True)
                return m["eval_after"]["loss"]

            _, best[method] = bracketed_sweep(score, grids[method], args.factor, args.extend)
        sweep_meta = next(iter(next(iter(val.values())).values()))
        rows, finals = [], {}
        for method in methods:
            workdir = work / f"final-{method}-lr{best[method]:g}"
            m, rss = measured_run(config(method, best[method], args.steps), workdir)
            finals[method] = (m, rss)
            print(f"final {method} lr={best[method]:g}: test loss {m['eval_after']['loss']:.4f}", file=sys.stderr, flush=True)
            rows.append(result_row(method, m, workdir, args.model))

        if compressed is not None:
            res.add(f"Compressed methods ({', '.join(m for m in methods + against if REGISTRY[m].compressed)}) train "
                    f"`pissa.compress_checkpoint({args.model!r}, DIR, {args.reduction:g})` (WeLore, all-linear targets; "
                    "their rank and targets do not apply: every factor of the compressed layers trains); the other "
                    f"methods adapt {args.model} itself.")
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
        lrs = sorted({lr for by_lr in val.values() for lr in by_lr})
        sweep_rows = []
        for method, by_lr in val.items():
            cells = []
            for lr in lrs:
                cell = f"{by_lr[lr]['eval_after']['loss']:.4f}" if lr in by_lr else "–"
                cells.append(f"**{cell}**" if lr == best[method] else cell)
            sweep_rows.append([method, *cells])
        res.table(["method", *(f"lr {lr:g}" for lr in lrs)], sweep_rows)
        edge = [m for m, by_lr in val.items() if best[m] in (min(by_lr), max(by_lr))]
        res.add(f"Not bracketed (the chosen rate is an edge of the rates run): {', '.join(edge)}." if edge else
                "Every chosen rate is bracketed: the methods' swept rates hold a higher and a lower one.")

        if args.default_lr_steps:
            rows = []
            for method in methods:
                workdir = work / f"default-{method}-steps{args.default_lr_steps}"
                m = run_cached(config(method, None, args.default_lr_steps), workdir)
                rows.append(result_row(method, m, workdir, args.model))
            res.heading(f"Each method at its default learning rate, {args.default_lr_steps} steps")
            res.add(f"Default rates: `pissa.METHODS[name].default_lr` (fallback for unmeasured methods); other options as "
                    f"above; test metrics on {args.eval_size} held-out test reviews.")
            res.table([h.format(lr="default lr") for h in RESULT_HEADER], rows)

        if against:
            compare_runs(res, finals, against, config, args, work)


def compare_runs(res: Results, finals: dict[str, tuple[dict, int]], against: list[str],
                 config: Callable[..., RunConfig], args: argparse.Namespace, work: Path) -> None:
    """Section 4 of the module docstring: ``finals`` (method -> metrics and peak RSS of its run at the chosen rate)
    next to each of ``against`` at its default rate."""
    measured = [(method, "chosen", m, m["train_seconds"] / m["steps"], rss) for method, (m, rss) in finals.items()]
    for method in against:
        cfg = config(method, None, args.steps)
        m, rss = measured_run(cfg, work / f"against-{method}-lr{cfg.learning_rate:g}")
        print(f"against {method} lr={cfg.learning_rate:g}: test loss {m['eval_after']['loss']:.4f}", file=sys.stderr,
              flush=True)
        measured.append((method, "default", m, m["train_seconds"] / m["steps"], rss))
    anchor, _, _, anchor_step, anchor_rss = measured[len(finals)]
    rows = [[method, "compressed" if REGISTRY[method].compressed else "original", f"{m['lr']:g} ({which})", *scores(m),
             f"{step:.3f}", f"{step / anchor_step:.2f}x", f"{rss / 2**20:,.0f}", f"{rss / anchor_rss:.2f}x"]
            for method, which, m, step, rss in measured]
    res.heading(f"At the chosen rate, next to {', '.join(against)} at their defaults")
    res.add(f"The runs of the first table and {', '.join(against)} at their default rates, each in a fresh process "
            f"(`pissa finetune --config`, same options as above, {args.threads} thread(s)): "
            f"test metrics on {args.eval_size} held-out test reviews; step: training seconds / steps (includes the "
            "loss logging; a shared machine, so a rough figure); peak RSS of the whole process (load, evaluation and "
            f"training); ratios to {anchor}'s. model: compressed = the WeLore checkpoint at reduction "
            f"{args.reduction:g}, original = {args.model}.")
    res.table(["method", "model", "lr", "trainable params", "test loss before", "test loss after", "accuracy before",
               "accuracy after", "s / step", f"step / {anchor}'s", "peak RSS (MiB)", f"peak / {anchor}'s"], rows)


if __name__ == "__main__":
    main()
