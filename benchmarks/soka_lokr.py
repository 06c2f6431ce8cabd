"""SoKA (pissa, Kronecker terms from the SVD of the rearranged weight) against PEFT's LoKr (a Kronecker product
trained from zero) at equal trainable parameters, on the embedded task (SmolLM2-135M-Instruct, Rotten Tomatoes).

Both train the same model with the same loop (``pissa.training.loop.train``), batches, steps and schedule; only
the adapter differs. SoKA keeps one term per layer (``rank 1``, the paper's setting): ``U (m, n)``, ``V (p, q)``
from the balanced splits of out and in features. LoKr at ``r >= max(p, q) / 2`` trains its ``w2`` whole (PEFT's
rule), so ``r = alpha = 48`` gives it the same full ``w1 (m, n)`` and ``w2 (p, q)``: the same parameter count
(printed). Each method's learning rate is chosen on a validation split carved from the training data (the grid
is extended while the best rate is on its edge); the test-split runs use the chosen rates.

    python benchmarks/soka_lokr.py --update-results
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path

from peft import LoKrConfig

from _peft_finetune import peft_session
from _results import Results, add_results_options
from _validation import bracketed_sweep, run_cached
from pissa.adapter.config import AdapterConfig
from pissa.runtime.devices import grad_scaler
from pissa.training.checkpoint import Progress
from pissa.training.config import RunConfig
from pissa.training.loop import make_optimizer, train

Score = Callable[[float, int | None], dict]
"""``(lr, val_size or None) -> {"loss", "accuracy", "before", "params", "train_loss"}``."""


def soka_score(base: RunConfig, work: Path) -> Score:
    def score(lr: float, val_size: int | None) -> dict:
        cfg = dataclasses.replace(base, lr=lr)
        m = run_cached(cfg, work / f"soka-{lr:g}-{val_size}", val_size)
        return {"loss": m["eval_after"]["loss"], "accuracy": m["eval_after"]["accuracy"],
                "before": m["eval_before"]["loss"], "params": m["trainable_params"], "train_loss": m["train_loss"]}
    return score


def lokr_score(base: RunConfig, work: Path, r: int) -> Score:
    def score(lr: float, val_size: int | None) -> dict:
        cfg = dataclasses.replace(base, lr=lr)
        if val_size is not None:
            cfg = dataclasses.replace(cfg, val_size=val_size, eval_size=val_size)
        session = peft_session(cfg, LoKrConfig(r=r, alpha=float(r), target_modules=cfg.adapter.targets))
        progress = Progress()
        progress.eval_before = session.evaluate()
        out = work / f"lokr-{lr:g}-{val_size}"
        out.mkdir(parents=True, exist_ok=True)
        train(session, out, progress, make_optimizer(session.model, cfg), grad_scaler(session.device, session.dtype),
              show=False)
        after = session.evaluate()
        params = sum(p.numel() for p in session.model.parameters() if p.requires_grad)
        return {"loss": after["loss"], "accuracy": after["accuracy"], "before": progress.eval_before["loss"],
                "params": params, "train_loss": progress.train_loss}
    return score


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--val-size", type=int, default=32)
    p.add_argument("--eval-size", type=int, default=64)
    p.add_argument("--lokr-rank", type=int, default=48)
    p.add_argument("--soka-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--lokr-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    p.add_argument("--threads", type=int, default=2)
    add_results_options(p, "soka_lokr")
    args = p.parse_args()
    title = "SoKA (rank 1) against PEFT's LoKr at equal trainable parameters"
    adapter = AdapterConfig(method="soka", rank=1, targets=list(args.targets))
    base = RunConfig(adapter=adapter, steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                     eval_size=args.eval_size, warmup=2, device="cpu", threads=args.threads, save_every=10**6)
    with Results.from_args(args, title) as res, tempfile.TemporaryDirectory(prefix="soka-lokr-") as tmp:
        scores = {"SoKA r=1": soka_score(base, Path(tmp)),
                  f"LoKr r={args.lokr_rank}": lokr_score(base, Path(tmp), args.lokr_rank)}
        grids = {"SoKA r=1": args.soka_lrs, f"LoKr r={args.lokr_rank}": args.lokr_lrs}
        chosen, sweeps, tests = {}, {}, {}
        for name, score in scores.items():
            sweeps[name], chosen[name] = bracketed_sweep(lambda lr, s=score: s(lr, args.val_size)["loss"], grids[name], 3.0, 10)
            tests[name] = score(chosen[name], None)
            print(f"{name}: lr {chosen[name]:g}, trainable {tests[name]['params']}, test loss {tests[name]['loss']:.4f}")
        (s_name, s), (l_name, lo) = tests.items()
        res.add(f"SmolLM2-135M-Instruct on Rotten Tomatoes, targets {', '.join(args.targets)}, {args.steps} steps of "
                f"batch {args.batch_size} (max length {args.max_length}), cosine schedule (warm-up 2), float32 on CPU, "
                f"seed 0; the same batches for both. LoKr: PEFT's `LoKrConfig(r={args.lokr_rank}, "
                f"alpha={args.lokr_rank})` (scaling 1, w2 trained whole at this r, w2 starts at zero).")
        res.heading("Test split, each at the rate chosen on validation")
        res.table(["adapter", "lr", "trainable params", "test loss before", "test loss after", "accuracy after"],
                  [[n, f"{chosen[n]:g}", t["params"], f"{t['before']:.4f}", f"{t['loss']:.4f}", f"{t['accuracy']:.3f}"]
                   for n, t in tests.items()])
        res.add(f"Ratios SoKA / LoKr: test loss after {s['loss'] / lo['loss']:.3f}, trainable params "
                f"{s['params'] / lo['params']:.3f}.")
        steps = sorted({st for st, _ in s["train_loss"]})
        res.heading("Training loss at the same steps (test runs)")
        ls, ll = dict(s["train_loss"]), dict(lo["train_loss"])
        res.table(["step", s_name, l_name, "ratio"],
                  [[st, f"{ls[st]:.4f}", f"{ll[st]:.4f}", f"{ls[st] / ll[st]:.3f}"] for st in steps if st in ll])
        res.heading("Learning-rate sweep (validation loss after training; chosen rate in bold)")
        res.add(f"Validation: {args.val_size} reviews carved from the training data; the grid grows by factors of 3 "
                "past an edge that holds the best rate.")
        lrs = sorted({lr for sw in sweeps.values() for lr in sw})
        res.table(["adapter", *(f"lr {lr:g}" for lr in lrs)],
                  [[n, *((f"**{sw[lr]:.4f}**" if lr == chosen[n] else f"{sw[lr]:.4f}") if lr in sw else "" for lr in lrs)]
                   for n, sw in sweeps.items()])


if __name__ == "__main__":
    main()
