"""Instruction tuning on the embedded generative task: PiSSA vs LoRA vs full fine-tuning, QPiSSA vs QLoRA.

SmolLM2-135M-Instruct on ``--data arithmetic`` (chat word problems, ``#### N`` answers), scored by
exact match of greedily generated answers (``pissa.inference.decoding``). A small-scale check sized for a
small CPU; the sizes are options and the results file states them.

1. Sweep: every method at each of its ``--lrs-*`` rates, seed 0, ``--steps`` steps, trained on the
   training split minus a validation split of ``--val-size`` problems carved from it
   (``RunConfig.val_size``); the score is the teacher-forced validation loss after training. The
   test split is not read.
2. Final: each method at its chosen rate with seeds 0, 1, 2 (seed 0 is the sweep's run at that
   rate, whose weights were kept; seeds 1 and 2 are trained the same way), scored by generation on
   the first ``--test-size`` problems of the test split. The untrained model is scored on the same
   problems.

LoftQ: pissa has no LoftQ training init (``pissa.methods.qpissa.loftq_iterates`` only serves the
quantization-error analysis), so the quantized comparison is QPiSSA vs QLoRA.

    .venv/bin/python benchmarks/instruct.py --update-results
    .venv/bin/python benchmarks/instruct.py --steps 2 --val-size 4 --test-size 4 --methods pissa,lora   # quick

Jobs run in ``--workers`` fresh processes (one torch thread each by default); finished jobs are kept
in ``--work`` and reused when they ran with the same sizes.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from _results import Results, add_results_options
from pissa.adapter.save_load import save_adapter
from pissa.training.evaluation import evaluate_generation

METHODS: dict[str, tuple[str, Literal["nf4"] | None]] = {  # name: (pissa method, quantize)
    "pissa": ("pissa", None),
    "lora": ("lora", None),
    "full": ("full", None),
    "qpissa": ("pissa", "nf4"),
    "qlora": ("lora", "nf4"),
}


def _config(args: dict[str, Any], name: str, lr: float | None, seed: int, val: bool):
    from pissa.adapter.config import AdapterConfig
    from pissa.training.config import RunConfig

    method, quantize = METHODS.get(name, ("full", None))
    return RunConfig(adapter=AdapterConfig(method=method, rank=args["rank"], quantize=quantize, seed=seed),
                     data="arithmetic", lr=lr, steps=args["steps"], batch_size=args["batch_size"],
                     max_length=args["max_length"], warmup=args["warmup"], threads=args["threads"],
                     save_every=0, max_new_tokens=args["max_new_tokens"],
                     val_size=args["val_size"] if val else 0, eval_size=args["val_size"] if val else args["test_size"])


def job(args: dict[str, Any], kind: str, name: str, lr: float | None, seed: int, folder: str) -> dict[str, Any]:
    """One job in a fresh process: ``train`` (train, validation loss, keep the weights), ``test``
    (score kept weights on the test problems) or ``untrained`` (score the base model)."""
    import torch
    from safetensors.torch import save_file

    from pissa.training.checkpoint import WEIGHTS, Progress
    from pissa.training.evaluation import evaluate
    from pissa.training.loop import make_optimizer, train
    from pissa.training.session import prepare

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result: dict[str, Any] = {"kind": kind, "method": name, "lr": lr, "seed": seed, "options": args}
    if kind == "train":
        cfg = _config(args, name, lr, seed, val=True)
        session = prepare(cfg)
        progress = Progress()
        train(session, out, progress, make_optimizer(session.model, cfg), show=False)
        result.update(train_loss=progress.train_loss, train_seconds=progress.train_seconds,
                      trainable_params=sum(p.numel() for p in session.model.parameters() if p.requires_grad),
                      val=evaluate(session.model, session.test, None, None, "causal-lm", session.pad_id, 16),
                      train_examples=len(session.train), val_examples=len(session.test), start_check=session.start)
        if cfg.adapter.method == "full":
            save_file({n: p.detach().contiguous() for n, p in session.model.named_parameters()}, str(out / WEIGHTS))
        else:
            save_adapter(session.model, out / "adapter")
    else:
        cfg = _config(args, "full" if kind == "untrained" else name, lr, seed, val=False)
        session = prepare(cfg, checkpoint=out if kind == "test" else None)
        eval_started = time.perf_counter()
        with torch.no_grad():
            result["test"] = evaluate_generation(
                session.model, session.tokenizer, session.test, session.references, pad_id=session.pad_id,
                max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size)
        result.update(eval_seconds=time.perf_counter() - eval_started, test_examples=len(session.test))
    result["seconds"] = time.perf_counter() - started
    (out / f"{kind}.json").write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="pissa,lora,full,qpissa,qlora")
    p.add_argument("--lrs-pissa", default="1e-4,3e-4", help="sweep rates of pissa and qpissa")
    p.add_argument("--lrs-lora", default="3e-4,1e-3", help="sweep rates of lora and qlora")
    p.add_argument("--lrs-full", default="1e-5,5e-5", help="sweep rates of full fine-tuning")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--max-new-tokens", type=int, default=80)
    p.add_argument("--val-size", type=int, default=48, help="validation problems carved from the training split")
    p.add_argument("--test-size", type=int, default=64, help="test problems scored by generation")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per job")
    p.add_argument("--workers", type=int, default=2, help="jobs run at once, each in a fresh process")
    p.add_argument("--work", default=None, help="folder of the jobs (default: a temporary folder); finished jobs are reused")
    add_results_options(p, "instruct")
    args = p.parse_args()
    names = args.methods.split(",")
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {','.join(METHODS)}")
    grid = {n: [float(x) for x in getattr(args, "lrs_" + ("full" if n == "full" else "pissa" if "pissa" in n else "lora"))
                .split(",")] for n in names}
    shared = {k: getattr(args, k) for k in ("rank", "steps", "batch_size", "warmup", "max_length", "max_new_tokens",
                                            "val_size", "test_size", "threads")}
    import torch

    torch.set_num_threads(args.threads)  # what each job uses, so the results header's "torch threads" is true
    title = "Instruction tuning on the embedded arithmetic task (SmolLM2-135M-Instruct): PiSSA, LoRA, full, QPiSSA, QLoRA"
    with Results.from_args(args, title) as res, tempfile.TemporaryDirectory(prefix="instruct-") as tmp:
        work = Path(args.work or tmp)
        ctx = multiprocessing.get_context("spawn")
        pool = cf.ProcessPoolExecutor(args.workers, mp_context=ctx, max_tasks_per_child=1)

        def submit(kind: str, name: str, lr: float | None, seed: int) -> cf.Future:
            folder = work / (f"{name}-lr{lr:g}-seed{seed}" if lr is not None else "untrained")
            done = folder / f"{kind}.json"
            if done.is_file() and json.loads(done.read_text()).get("options") == shared:  # same sizes: reuse
                f: cf.Future = cf.Future()
                f.set_result(json.loads(done.read_text()))
                return f
            return pool.submit(job, shared, kind, name, lr, seed, str(folder))

        def wait(futures: dict[Any, cf.Future]) -> dict[Any, dict]:
            out = {}
            for key, f in futures.items():
                out[key] = f.result()
                r = out[key]
                print(f"{r['kind']} {r['method']} lr={r['lr']} seed={r['seed']}: "
                      f"{r.get('val', r.get('test'))} ({r['seconds']:.0f} s)", file=sys.stderr, flush=True)
            return out

        with pool:
            untrained = submit("untrained", "untrained", None, 0)
            sweep = wait({(n, lr): submit("train", n, lr, 0) for n in names for lr in grid[n]})
            best = {n: min(grid[n], key=lambda lr: sweep[(n, lr)]["val"]["loss"]) for n in names}
            trained = wait({(n, s): submit("train", n, best[n], s) for n in names for s in range(1, args.seeds)})
            trained.update({(n, 0): sweep[(n, best[n])] for n in names})
            tested = wait({(n, s): submit("test", n, best[n], s) for n in names for s in range(args.seeds)})
            base = wait({"untrained": untrained})["untrained"]

        meta = next(iter(sweep.values()))
        res.add("**A small-scale check**, sized for a small CPU, not a reproduction of the paper's "
                "7B-model tables: SmolLM2-135M-Instruct, every linear projection adapted at rank "
                f"{args.rank} (full: every weight), {args.steps} steps of batch {args.batch_size} (max length "
                f"{args.max_length}), AdamW, {args.warmup} warm-up steps then cosine to 0, float32, "
                f"{args.threads} torch thread(s) per job, {args.workers} jobs at a time.")
        res.add(f"Data: the embedded `arithmetic` task. Training: the {meta['train_examples']:,} problems of the "
                f"training split minus a validation split of {meta['val_examples']} carved from it (hash of the "
                "prompt, seed 1); every run, final ones included, trains on that same reduced split. Test: the "
                f"first {args.test_size} problems of the held-out test split, scored by greedy generation "
                f"(at most {args.max_new_tokens} new tokens, exact match of the `#### N` / last-number answer). "
                "LoftQ is not compared: pissa has no LoftQ training init (`pissa.methods.qpissa.loftq_iterates` only "
                "serves `pissa analyze quant-error`), so the 4-bit comparison is QPiSSA (5 iterations) vs QLoRA.")
        res.heading("Learning-rate sweep (validation)")
        res.add(f"Seed 0, {args.steps} steps; score: teacher-forced loss of the {meta['val_examples']} validation "
                "problems' answers after training (lowest in bold; the test split is not read).")
        rows = []
        for n in names:
            cells = [f"lr {lr:g}: " + (f"**{sweep[(n, lr)]['val']['loss']:.4f}**" if lr == best[n]
                                       else f"{sweep[(n, lr)]['val']['loss']:.4f}") for lr in grid[n]]
            rows.append([n, *cells] + [""] * (max(map(len, grid.values())) - len(cells)))
        res.table(["method", *(f"rate {i + 1}" for i in range(max(map(len, grid.values()))))], rows)

        res.heading("Test: exact-match accuracy by generation")
        res.add(f"Each method at its chosen rate, seeds 0..{args.seeds - 1} (seed = adapter init and data order). "
                f"Untrained model on the same {base['test_examples']} problems: accuracy "
                f"**{base['test']['accuracy']:.3f}**, answer loss {base['test']['loss']:.4f}.")
        rows = []
        for n in names:
            accs = [tested[(n, s)]["test"]["accuracy"] for s in range(args.seeds)]
            losses = [tested[(n, s)]["test"]["loss"] for s in range(args.seeds)]
            spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
            train_s = [trained[(n, s)]["train_seconds"] for s in range(args.seeds)]
            rows.append([n, f"{best[n]:g}", f"{trained[(n, 0)]['trainable_params']:,}",
                         f"{statistics.mean(accs):.3f} ± {spread:.3f}", " ".join(f"{a:.3f}" for a in accs),
                         f"{min(accs):.3f}-{max(accs):.3f}", f"{statistics.mean(losses):.4f}",
                         f"{statistics.mean(train_s):.0f}"])
        res.table(["method", "lr", "trainable params", "accuracy mean ± sd", "per seed", "range",
                   "test answer loss (mean)", "train time per run (s)"], rows)
        res.add("sd: sample standard deviation over the seeds; with "
                f"{args.test_size} test problems one problem is {1 / args.test_size:.3f} of accuracy. Train time: "
                "the training steps only, with two of these runs at once (the machine's load is in the header), "
                "so it compares little.")
        eval_s = [t["eval_seconds"] for t in tested.values()] + [base["eval_seconds"]]
        res.add(f"Generation evaluation of {args.test_size} problems (teacher-forced loss and greedy decoding in "
                f"one pass, merged weights): {min(eval_s):.0f}-{max(eval_s):.0f} s per run, "
                f"{base['eval_seconds']:.0f} s for the untrained model (it runs to the token cap more often).")
        from pissa.training.report import plot_losses

        plot = res.artifact(f"{args.name}.png")
        plot_losses({f"{n} (lr {best[n]:g})": trained[(n, 0)]["train_loss"] for n in names}, plot,
                    title=f"arithmetic, seed 0, rank {args.rank}")
        res.add(f"![loss curves]({args.name}.png)")
        res.add("Training loss (completion tokens, seed 0 at the chosen rate, mean of the last 5 steps): " + ", ".join(
            f"{n} {statistics.mean(x for _, x in trained[(n, 0)]['train_loss'][-5:]):.4f}" for n in names) + ".")


if __name__ == "__main__":
    main()
