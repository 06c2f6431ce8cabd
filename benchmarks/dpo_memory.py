"""Peak memory of DPO (TRL's DPOTrainer) on a pissa model: the reference as pissa.reference (no copy) against an
explicit reference copy of the base, side by side.

Both variants are whole TRL runs in fresh processes (``_common.measure``: the child's peak RSS from ``os.wait4``),
``--repeats`` times in alternating order, on SmolLM2 with PiSSA on every linear projection and preference pairs
derived from the embedded Rotten Tomatoes reviews (chosen: the review's label, rejected: the other one):

- ``pissa.reference``: :class:`pissa.integrations.dpo.PissaDPOTrainer` with ``ref_model=None``: the reference
  log-probabilities come from the policy at its initial factors (``W_res + s B0 A0 = W``);
- explicit copy: the same trainer given ``ref_model=`` a second SmolLM2 loaded from the same folder (what TRL does
  by itself for a model that is not a PEFT model).

Each run also reports its first logged loss, which is ``log 2`` exactly when the reference equals the policy at
the start, and its last one.

    .venv/bin/python benchmarks/dpo_memory.py --threads 1 --update-results      # benchmarks/results/dpo_memory.md
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

from _common import measure
from _results import Results, add_results_options

GB = 1e9
VARIANTS = {"pissa.reference": "none", "explicit reference copy": "copy"}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--pairs", type=int, default=64, help="preference pairs trained on")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", nargs=2, metavar=("REFERENCE", "OUT"), help=argparse.SUPPRESS)
    add_results_options(p, "dpo_memory")
    return p.parse_args(argv)


def preference_rows(n: int) -> list[dict[str, str]]:
    """Rotten Tomatoes training reviews as DPO pairs: the right label chosen, the wrong one rejected."""
    from pissa.data.datasets import load_data

    data = load_data("rotten_tomatoes")
    assert data.labels is not None
    return [{"prompt": e.prompt, "chosen": e.completion, "rejected": next(x for x in data.labels if x != e.completion)}
            for e in data.train[:n]]


def child(args: argparse.Namespace) -> None:
    """One DPO run in this process; writes ``{"first_loss", "last_loss"}`` to OUT."""
    import torch
    from datasets import Dataset
    from trl import DPOConfig

    import pissa
    from pissa.integrations.dpo import PissaDPOTrainer
    from pissa.runtime.hub import load_model

    reference, out = args.child
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    pissa.attach(model, pissa.AdapterConfig(method="pissa", rank=args.rank))
    ref_model = load_model(args.model)[0] if reference == "copy" else None
    with tempfile.TemporaryDirectory(prefix="dpo-memory-") as tmp:
        config = DPOConfig(output_dir=tmp, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                           learning_rate=5e-5, logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True,
                           bf16=False, activation_checkpointing=False, seed=0, max_length=args.max_length,
                           save_strategy="no")
        trainer = PissaDPOTrainer(model=model, ref_model=ref_model, args=config, processing_class=tok,
                                  train_dataset=Dataset.from_list(preference_rows(args.pairs)))
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    Path(out).write_text(json.dumps({"first_loss": losses[0], "last_loss": losses[-1]}))


def main() -> None:
    args = parse()
    if args.child:
        child(args)
        return
    with Results.from_args(args, "DPO on a pissa model: pissa.reference against an explicit reference copy") as res:
        peaks: dict[str, list[float]] = {v: [] for v in VARIANTS}
        seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
        losses: dict[str, dict[str, float]] = {}
        with tempfile.TemporaryDirectory(prefix="dpo-memory-") as tmp:
            for i in range(args.repeats):
                for variant in (list(VARIANTS) if i % 2 == 0 else list(VARIANTS)[::-1]):
                    out = Path(tmp, f"{VARIANTS[variant]}-{i}.json")
                    cmd = [sys.executable, __file__, "--model", args.model, "--rank", str(args.rank), "--steps",
                           str(args.steps), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
                           "--pairs", str(args.pairs), "--threads", str(args.threads), "--child", VARIANTS[variant],
                           str(out)]
                    m = measure(cmd, env={"OMP_NUM_THREADS": str(args.threads)})
                    if not m.ok:
                        raise RuntimeError(f"{variant} failed: {m.failure}")
                    peaks[variant].append(m.rss / GB)
                    seconds[variant].append(m.seconds)
                    losses[variant] = json.loads(out.read_text())
        res.add(f"{args.model}, PiSSA rank {args.rank} on every linear projection, float32, TRL DPOTrainer "
                f"(pissa.integrations.dpo.PissaDPOTrainer), {args.steps} steps of {args.batch_size} pairs (max "
                f"{args.max_length} tokens), pairs from Rotten Tomatoes (chosen: the label, rejected: the other "
                f"label), {args.threads} thread(s), CPU; whole runs in fresh processes, peak RSS.")
        med = {v: statistics.median(p) for v, p in peaks.items()}
        res.table(["reference", "peak RSS (GB), median (min-max)", "wall s, median", "first loss (log 2 = 0.6931)",
                   "last loss"],
                  [[v, f"{med[v]:.3f} ({min(peaks[v]):.3f}-{max(peaks[v]):.3f})", f"{statistics.median(seconds[v]):.1f}",
                    f"{losses[v]['first_loss']:.6f}", f"{losses[v]['last_loss']:.6f}"] for v in VARIANTS])
        ours, copy = med["pissa.reference"], med["explicit reference copy"]
        res.add(f"pissa.reference / explicit copy: peak RSS {ours / copy:.3f}x ({(copy - ours):.3f} GB less; "
                f"medians over {args.repeats} runs each). First loss minus log 2: "
                + ", ".join(f"{v} {losses[v]['first_loss'] - math.log(2):+.2e}" for v in VARIANTS) + ".")


if __name__ == "__main__":
    main()
