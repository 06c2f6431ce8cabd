"""Peak memory and step time of SaRA against LoRA at (about) the same number of trainable parameters.

SaRA (``--method sara``) trains ``--fraction`` of every targeted weight's entries; LoRA's rank is chosen so that
``r * sum(in + out)`` over the same layers is closest to SaRA's value count. Both are whole runs of
``pissa finetune`` in fresh processes (``_common.measure``: peak RSS of the child from ``os.wait4``; on CUDA the
peak allocation), ``--repeats`` times in alternating order, and a fresh process per method that loads, adapts and
steps twice reports the peak RSS of each stage (``_common.stage_peaks``). The nuclear-norm penalty (``--reg-weight``)
is timed apart: one forward and backward of ``pissa.regularization`` on every adapted layer (one SVD per layer).

    .venv/bin/python benchmarks/sara_memory.py --update-results        # benchmarks/results/sara_memory.md
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import pissa
from _common import OURS, Setting, finetune_options, stage_peaks, whole_run
from _results import Results, add_results_options
from pissa.runtime.hub import load_model

GB = 1e9


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--fraction", type=float, default=0.1, help="SaRA's share of trainable entries per weight")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--eval-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    add_results_options(p, "sara_memory")
    return p.parse_args()


def matched_rank(model: torch.nn.Module, fraction: float) -> tuple[int, int, int]:
    """(SaRA's trainable values, the LoRA rank closest to it, LoRA's trainable parameters at that rank)."""
    adapted = pissa.attach(copy.deepcopy(model), pissa.AdapterConfig(method="sara", sparse_fraction=fraction))
    values = pissa.trainable_parameters(adapted)
    per_rank = sum(layer.in_features + layer.out_features for _, layer in pissa.adapted_layers(adapted))
    rank = max(1, round(values / per_rank))
    return values, rank, rank * per_rank


def penalty_seconds(model: torch.nn.Module, fraction: float, repeats: int = 1) -> tuple[float, int]:
    """Median seconds (of ``repeats``) of one forward + backward of the nuclear-norm penalty over every adapted
    layer, and the layer count."""
    adapted = pissa.attach(copy.deepcopy(model), pissa.AdapterConfig(method="sara", sparse_fraction=fraction))
    layers = list(pissa.adapted_layers(adapted))
    with torch.no_grad():
        for _, layer in layers:
            layer.sparse_values.add_(1e-3 * torch.randn_like(layer.sparse_values))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        pissa.regularization(adapted).backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times), len(layers)


def main() -> None:
    args = parse()
    with Results.from_args(args, "SaRA vs LoRA at equal trainable parameters: peak memory and step time") as res:
        torch.set_num_threads(args.threads)
        device = torch.device("cpu")
        base, _ = load_model(args.model)
        values, rank, lora_params = matched_rank(base, args.fraction)
        nuclear, n_layers = penalty_seconds(base, args.fraction)
        del base
        runs = {"sara": ["--sparse-fraction", str(args.fraction)], "lora": ["--rank", str(rank)]}
        options = finetune_options(model=args.model, rank=rank, steps=args.steps, batch_size=args.batch_size,
                                   max_length=args.max_length, eval_size=args.eval_size, threads=args.threads,
                                   device=device)
        peaks: dict[str, list[float]] = {m: [] for m in runs}
        steps: dict[str, list[float]] = {m: [] for m in runs}
        with tempfile.TemporaryDirectory(prefix="sara-memory-") as tmp:
            for i in range(args.repeats):
                for method in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
                    out = Path(tmp, f"{method}-{i}")
                    run = whole_run(method, Setting(), [*options, *runs[method]], out, args.threads, cuda=False)
                    if not run.measured.ok:
                        raise RuntimeError(f"{method} failed: {run.measured.failure}")
                    peaks[method].append(run.measured.rss / GB)
                    steps[method].append(json.loads((out / "metrics.json").read_text())["train_seconds"] / args.steps)
        stages = {m: stage_peaks(OURS, m, Setting(), model=args.model, rank=rank, batch_size=args.batch_size,
                                 max_length=args.max_length, threads=args.threads, device=device) for m in runs}

        res.add(f"{args.model}, every linear projection, float32 base and factors, {args.steps} steps of batch "
                f"{args.batch_size} (max {args.max_length} tokens), {args.threads} thread(s), CPU (peak RSS). SaRA trains "
                f"{args.fraction:g} of each weight's entries: {values:,} values; LoRA at rank {rank}: {lora_params:,} "
                f"parameters ({lora_params / values:.3f}x SaRA's).")
        res.heading("Whole runs (pissa finetune, fresh processes)")
        med = {m: statistics.median(v) for m, v in peaks.items()}
        stp = {m: statistics.median(v) for m, v in steps.items()}
        res.table(["method", "trainable params", "peak RSS (GB), median (min-max)", "step time (s), median (min-max)"],
                  [[m, f"{values if m == 'sara' else lora_params:,}",
                    f"{med[m]:.3f} ({min(peaks[m]):.3f}-{max(peaks[m]):.3f})",
                    f"{stp[m]:.3f} ({min(steps[m]):.3f}-{max(steps[m]):.3f})"] for m in runs])
        res.add(f"SaRA / LoRA: peak RSS {med['sara'] / med['lora']:.3f}x, step time {stp['sara'] / stp['lora']:.3f}x "
                f"(medians over {args.repeats} runs each).")
        res.heading("Where the memory goes (one fresh process per method: load, adapt, two steps)")
        keys = list(next(iter(stages.values())))
        res.table(["method", *(f"peak in: {k} (GB)" for k in keys)],
                  [[m, *(f"{stages[m][k]['VmHWM'] / GB:.3f}" for k in keys)] for m in runs])
        res.heading("The nuclear-norm penalty (--reg-weight)")
        res.add(f"One forward and backward of pissa.regularization over the {n_layers} adapted layers (an SVD of each "
                f"(out, in) update): {nuclear:.2f} s, against a training step of {stp['sara']:.2f} s "
                "without it.")


if __name__ == "__main__":
    main()
