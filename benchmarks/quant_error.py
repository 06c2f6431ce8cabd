"""NF4 quantization-error reduction of QLoRA, LoftQ and QPiSSA on the embedded models.

For every "all-linear" layer of each model and each rank, the paper's ratio
``(1 - ||W - (Q + B A)||_* / ||W - nf4(W)||_*) * 100`` (see :mod:`pissa.analysis.quant_error`) for LoftQ and
QPiSSA after 1 and 5 iterations (both on their final pair ``(Q_T, B_T A_T)``: the last step is
the SVD step), exact rank-r SVDs; per model and rank the mean over layers,
the margin QPiSSA-5 - LoftQ-5 (done-criterion: >= 2 points) and the wall time. Per-projection
tables follow. Writes ``bench_out/quant_error.md`` (``--update-results``:
``benchmarks/results/quant_error.md``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quant_error.py                 # full (all layers)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quant_error.py --sample 2      # quick: 2 layers per projection type

(One OpenMP thread: on a busy CPU, LAPACK's spinning threads can run 5-10x slower.)
"""

from __future__ import annotations

import argparse
import time

from _results import Results, add_results_options
from pissa.analysis.quant_error import layer_ratios, markdown_table, method_names, model_weights, summarize
from pissa.methods.nf4 import require_bnb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "minilm"])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--iters", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--sample", type=int, default=None, help="at most this many layers per projection type (default: all)")
    parser.add_argument("--svd", choices=["exact", "krylov"], default="exact")
    add_results_options(parser, "quant_error")
    args = parser.parse_args()
    iters = sorted(set(args.iters))
    methods = method_names(iters)
    last = iters[-1]
    with Results.from_args(args, "NF4 quantization error reduction: QLoRA vs LoftQ vs QPiSSA") as res:
        require_bnb()  # bitsandbytes is imported lazily: not inside the first timed model
        summary_rows = []
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
                summary_rows.append([model, str(rank), str(len(rows)), *(f"{avg[m]:.2f}" for m in methods),
                                     f"{margin:+.2f}", f"{seconds:.0f}"])
                details.append((f"{model}, rank {rank} ({len(rows)} layers, {seconds:.0f} s)", markdown_table(summary, methods)))
                print(" | ".join(summary_rows[-1]), flush=True)
        scope = "all layers" if args.sample is None else f"at most {args.sample} layers per projection type (evenly spaced)"
        res.add("Ratio = (1 - ||W - (Q + B A)||_* / ||W - nf4(W)||_*) x 100, nuclear norm, mean over layers (higher is "
                f"better; QLoRA = 0 by definition). NF4 blocksize 64 (bitsandbytes), {args.svd} rank-r SVDs, {scope}. "
                "Wall time: computing the ratios of one model and rank, all iterations (weights loaded beforehand).")
        res.add("Paper reference (LLaMA-2-7B, rank 128): LoftQ-1 6.6, QPiSSA-1 10.7, LoftQ-5 14.6, QPiSSA-5 19.4.")
        res.table(["model", "rank", "layers", *methods, f"QPiSSA-{last} - LoftQ-{last}", "wall (s)"], summary_rows,
                  align="lrr" + "r" * (len(methods) + 2))
        res.heading("Per projection type")
        for heading, table in details:
            res.heading(heading, level=3)
            res.add(table)


if __name__ == "__main__":
    main()
