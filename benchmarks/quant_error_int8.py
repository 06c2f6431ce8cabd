"""LLM.int8 next to NF4: the quantization error of q(W) and of QPiSSA's residual, for q = nf4 and q = int8.

For "all-linear" layers of SmolLM2-135M (``--sample`` per projection type, evenly spaced) and each rank, per
quantizer q: the error ``||W - q(W)||_*`` (QLoRA) and ``||W - (Q_T + B_T A_T)||_*`` (QPiSSA-T, the pair a QPiSSA
model holds at init) as fractions of ``||W - nf4(W)||_*`` (one scale for both quantizers: nf4(W) = 1), and the
paper's reduction ratio ``(1 - ||W - (Q + B A)||_* / ||W - q(W)||_*) x 100`` against the quantizer's own q(W)
(:mod:`pissa.analysis.quant_error`). Exact rank-r SVDs; means over layers. int8: LLM.int8's rows with the
outlier columns in float16 (:mod:`pissa.methods.int8`); its storage (codes, row scales, outlier columns) is
measured on W. Writes ``bench_out/quant_error_int8.md`` (``--update-results``: ``benchmarks/results/``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quant_error_int8.py --update-results
"""

from __future__ import annotations

import argparse
import time

import torch

from _results import Results, add_results_options
from pissa.analysis.quant_error import layer_ratios, model_weights, nuclear_norm
from pissa.methods.int8 import OUTLIER_SIGMAS, int8_quantize
from pissa.methods.nf4 import BLOCKSIZE
from pissa.methods.quantize import QUANTIZERS, check_quantizable

NF4_BYTES = 0.5 + 4 / BLOCKSIZE
"""Bytes per weight of NF4: a 4-bit code and a float32 absmax per block of 64."""


def int8_bytes(W: torch.Tensor) -> tuple[float, float]:
    """(bytes per weight of int8(W): codes, float32 row scales, int64 column indices and float16 outlier columns;
    the fraction of outlier columns)."""
    codes, scales, cols, outliers = int8_quantize(W)
    stored = sum(t.numel() * t.element_size() for t in (codes, scales, cols, outliers))
    return stored / W.numel(), cols.numel() / W.shape[1]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--iters", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--sample", type=int, default=3, help="layers per projection type (evenly spaced)")
    add_results_options(parser, "quant_error_int8")
    args = parser.parse_args()
    iters = sorted(set(args.iters))
    last = iters[-1]
    with Results.from_args(args, "LLM.int8 next to NF4: quantization error of QLoRA and QPiSSA") as res:
        for kind in QUANTIZERS:
            check_quantizable(kind)
        weights = model_weights(args.model, sample=args.sample)
        errors = {kind: {n: float(nuclear_norm(W - q(W))) for n, W in weights.items()} for kind, q in QUANTIZERS.items()}
        storage = [int8_bytes(W) for W in weights.values()]
        rows = []
        for rank in args.ranks:
            for kind, q in QUANTIZERS.items():
                start = time.perf_counter()
                ratios = layer_ratios(weights, rank, iters, quantize=q, progress=True)
                seconds = time.perf_counter() - start
                rel = {n: errors[kind][n] / errors["nf4"][n] for n in weights}  # ||W - q(W)|| / ||W - nf4(W)||
                # QPiSSA-t's error on the same scale: ||W - q(W)|| (1 - ratio / 100), over ||W - nf4(W)||
                scaled = [mean([rel[r.name] * (1 - r.ratios[f"QPiSSA-{t}"] / 100) for r in ratios]) for t in iters]
                paper = [mean([r.ratios[m] for r in ratios]) for m in (f"LoftQ-{last}", *(f"QPiSSA-{t}" for t in iters))]
                size = NF4_BYTES if kind == "nf4" else mean([b for b, _ in storage])
                rows.append([str(rank), kind, f"{size:.4f}", f"{mean(list(rel.values())):.3f}", *(f"{e:.3f}" for e in scaled),
                             *(f"{p:.2f}" for p in paper), f"{seconds:.0f}"])
                print(" | ".join(rows[-1]), flush=True)
        names = ", ".join(sorted({n.split(".")[2] for n in weights}, key=int))
        res.add(f"{args.model}: {len(weights)} layers ({args.sample} per projection type, evenly spaced: layers {names}), "
                f"exact rank-r SVDs, iterations {', '.join(map(str, iters))}. int8 outlier columns: an entry >= "
                f"{OUTLIER_SIGMAS:g} rms of the matrix; on these weights {100 * mean([c for _, c in storage]):.1f}% "
                f"of the columns on average (at most {100 * max(c for _, c in storage):.1f}%).")
        res.add("Error columns: nuclear norm of the quantization error, mean over layers of its ratio to ||W - nf4(W)||_* "
                "(lower is better; QLoRA-nf4 = 1). Reduction columns: the paper's (1 - ||W - (Q + B A)||_* / ||W - q(W)||_*) "
                "x 100 against the same quantizer's q(W) (higher is better; QLoRA = 0). Bytes / weight: the frozen residual's "
                "storage (nf4: codes and one float32 absmax per 64 weights; int8: codes, float32 row scales, outlier "
                "columns in float16 with their int64 indices, measured on W). Wall: all ratios of one rank and quantizer.")
        res.table(["rank", "q", "bytes / weight", "QLoRA q(W) error", *(f"QPiSSA-{t} error" for t in iters),
                   f"LoftQ-{last} reduction %", *(f"QPiSSA-{t} reduction %" for t in iters), "wall (s)"], rows,
                  align="ll" + "r" * (len(iters) * 2 + 4))


if __name__ == "__main__":
    main()
