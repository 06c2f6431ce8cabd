"""NF4 quantization-error reduction of QLoRA, LoftQ and QPiSSA on the embedded models.

For every "all-linear" layer of each model and each rank, the paper's ratio
``(1 - ||W - (Q + B A)||_* / ||W - nf4(W)||_*) * 100`` (see :mod:`pissa.quant`) for LoftQ and
QPiSSA after 1 and 5 iterations (both on their final pair ``(Q_T, B_T A_T)``: the last step is
the SVD step), exact rank-r SVDs; per model and rank the mean over layers,
the margin QPiSSA-5 - LoftQ-5 (done-criterion: >= 2 points) and the wall time. Per-projection
tables follow. Writes ``benchmarks/results/quant_error.md``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quant_error.py                 # full (all layers)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quant_error.py --sample 2      # quick: 2 layers per projection type

(One OpenMP thread: on a shared, loaded CPU, LAPACK's two spinning threads run 5-10x slower.)
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from pissa.io import atomic_write_text
from pissa.quant_error import layer_ratios, markdown_table, method_names, model_weights, summarize

RESULTS = Path(__file__).parent / "results" / "quant_error.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "minilm"])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--iters", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--sample", type=int, default=None, help="at most this many layers per projection type (default: all)")
    parser.add_argument("--svd", choices=["exact", "krylov"], default="exact")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    iters = sorted(set(args.iters))
    methods = method_names(iters)
    last = iters[-1]
    summary_lines = [
        "| model | rank | layers | " + " | ".join(methods) + f" | QPiSSA-{last} - LoftQ-{last} | wall (s) |",
        "|---|---:|---:|" + "---:|" * (len(methods) + 2),
    ]
    details = []
    for model in args.models:
        weights = model_weights(model, sample=args.sample)
        for rank in args.ranks:
            start = time.perf_counter()
            rows = layer_ratios(weights, rank, iters, svd=args.svd, progress=True)
            seconds = time.perf_counter() - start
            summary = summarize(rows, methods)
            avg = summary[-1][3]
            margin = avg[f"QPiSSA-{last}"] - avg[f"LoftQ-{last}"]
            cells = " | ".join(f"{avg[m]:.2f}" for m in methods)
            summary_lines.append(f"| {model} | {rank} | {len(rows)} | {cells} | {margin:+.2f} | {seconds:.0f} |")
            details.append(f"### {model}, rank {rank} ({len(rows)} layers, {seconds:.0f} s)\n\n{markdown_table(summary, methods)}")
            print(summary_lines[-1], flush=True)
    scope = "all layers" if args.sample is None else f"at most {args.sample} layers per projection type (evenly spaced)"
    text = "\n".join([
        "# NF4 quantization error reduction: QLoRA vs LoftQ vs QPiSSA",
        "",
        "Ratio = (1 - ||W - (Q + B A)||_* / ||W - nf4(W)||_*) x 100, nuclear norm, mean over layers (higher is better;",
        f"QLoRA = 0 by definition). NF4 blocksize 64 (bitsandbytes), {args.svd} rank-r SVDs, {scope}.",
        f"Command: `OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/quant_error.py"
        + (f" --sample {args.sample}" if args.sample else "") + (" --svd krylov" if args.svd == "krylov" else "") + "`",
        f"on {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
        "wall times measured on a shared, loaded 2-core CPU (noisy).",
        "Paper reference (LLaMA-2-7B, rank 128): LoftQ-1 6.6, QPiSSA-1 10.7, LoftQ-5 14.6, QPiSSA-5 19.4.",
        "",
        *summary_lines,
        "",
        "## Per projection type",
        "",
        *details,
    ])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
