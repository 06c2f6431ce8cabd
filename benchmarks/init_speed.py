"""Init speed and exactness: pissa.attach vs PEFT's PiSSA inits on SmolLM2-135M (all 210 projections).

For each run a fresh copy of the model is adapted; the three inits alternate, each `--repeats`
times, and the table reports the median wall time and the residual error relative to optimal,
``||W - B A||_F / sqrt(sum_{i>r} S_i^2)`` per layer (1.0 = the exact rank-r SVD), mean and max.

    .venv/bin/python benchmarks/init_speed.py            # full: median of 3
    .venv/bin/python benchmarks/init_speed.py --repeats 1 --no-full-svd   # quick
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

import pissa
from pissa.hub import load_model
from pissa.layer import dense_weight


def optimal_residuals(model: torch.nn.Module, names: list[str], rank: int) -> dict[str, float]:
    """Exact sqrt(sum of discarded S^2) per layer, from float64 singular values."""
    out = {}
    for n in names:
        S = torch.linalg.svdvals(dense_weight(model.get_submodule(n)).detach().double())
        out[n] = S[rank:].pow(2).sum().sqrt().item()
    return out


def run_pissa(model, rank):
    model = pissa.attach(model, pissa.AdapterConfig(rank=rank))
    return {n: dense_weight(layer.residual).detach() for n, layer in pissa.adapted_layers(model)}


def run_peft(model, rank, init):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=init, target_modules="all-linear")
    peft_model = get_peft_model(model, cfg)
    prefix = "base_model.model."
    return {
        n[len(prefix):]: m.base_layer.weight.detach()
        for n, m in peft_model.named_modules()
        if hasattr(m, "base_layer") and hasattr(m, "lora_A") and n.startswith(prefix)
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-full-svd", action="store_true", help="skip PEFT's full-SVD init (slow)")
    ap.add_argument("--out", default="benchmarks/results/init_speed.md")
    args = ap.parse_args()

    base, _ = load_model(args.model)
    names = pissa.model.find_targets(base, "all-linear")
    opt = optimal_residuals(base, names, args.rank)
    runs = {
        "pissa.attach (block Krylov, default)": lambda m: run_pissa(m, args.rank),
        "PEFT pissa_niter_4": lambda m: run_peft(m, args.rank, "pissa_niter_4"),
    }
    if not args.no_full_svd:
        runs["PEFT pissa (full SVD)"] = lambda m: run_peft(m, args.rank, "pissa")
    times: dict[str, list[float]] = {k: [] for k in runs}
    errors: dict[str, list[float]] = {}
    for rep in range(args.repeats):
        for label, fn in runs.items():
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            residuals = fn(model)
            times[label].append(time.perf_counter() - t0)
            assert sorted(residuals) == sorted(names), f"{label} adapted a different set of layers"
            errors[label] = [residuals[n].double().norm().item() / opt[n] for n in names]
            print(f"repeat {rep + 1}: {label}: {times[label][-1]:.2f} s", flush=True)
            del model, residuals

    ref = statistics.median(times["PEFT pissa_niter_4"])
    lines = [
        f"Model {args.model}, rank {args.rank}, {len(names)} projections, torch threads {torch.get_num_threads()}, "
        f"median of {args.repeats} alternated runs.",
        "",
        "| init | time (s) | time vs PEFT pissa_niter_4 | mean residual / optimal | max residual / optimal |",
        "|---|---|---|---|---|",
    ]
    for label in runs:
        t = statistics.median(times[label])
        e = errors[label]
        lines.append(f"| {label} | {t:.2f} | {t / ref:.2f}x | {sum(e) / len(e):.6f} | {max(e):.6f} |")
    lines += ["", "Per-run times (s), in run order: " + "; ".join(f"{label}: {', '.join(f'{t:.2f}' for t in times[label])}" for label in runs)]
    wins = sum(a < b for a, b in zip(times[next(iter(runs))], times["PEFT pissa_niter_4"]))
    lines.append(f"pissa.attach faster than PEFT pissa_niter_4 in {wins} of {args.repeats} alternated runs.")
    table = "\n".join(lines)
    print("\n" + table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(f"Command: `.venv/bin/python benchmarks/init_speed.py {' '.join(a for a in __import__('sys').argv[1:])}`\n\n{table}\n")


if __name__ == "__main__":
    main()
