"""The 4-bit residual layer vs the dense one: stored bytes, forward and forward+backward time.

Layer rows: a frozen residual of SmolLM2-135M's MLP shapes as ``nn.Linear`` (float32 and
bfloat16) and as :class:`pissa.quant.NF4Linear` (dequantized on the fly, in forward and again in
backward), on a batch of tokens; backward is the input gradient (what flows through a frozen
layer). Model row: bytes of all parameters and buffers of SmolLM2-135M after ``pissa.attach``
(rank 16) with a dense vs a 4-bit residual. Median of ``--repeats``; writes
``benchmarks/results/quant_layer.md``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quant_layer.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import pissa
from pissa.io import atomic_write_text
from pissa.quant import NF4Linear

RESULTS = Path(__file__).parent / "results" / "quant_layer.md"


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def layer_rows(shapes: list[tuple[int, int]], tokens: int, repeats: int) -> list[str]:
    rows = []
    for out_f, in_f in shapes:
        W = torch.randn(out_f, in_f) / in_f**0.5
        variants: dict[str, tuple[nn.Module, torch.dtype]] = {}
        for dtype in (torch.float32, torch.bfloat16):
            dense = nn.Linear(in_f, out_f, bias=False).to(dtype).requires_grad_(False)
            dense.weight.data.copy_(W)
            variants[f"dense {str(dtype).removeprefix('torch.')}"] = (dense, dtype)
            variants[f"nf4 ({str(dtype).removeprefix('torch.')} compute)"] = (NF4Linear(W.to(dtype)), dtype)
        for label, (layer, dtype) in variants.items():
            x = torch.randn(tokens, in_f, dtype=dtype, requires_grad=True)

            def forward() -> None:
                with torch.no_grad():
                    layer(x)

            def forward_backward() -> None:
                layer(x).sum().backward()
                x.grad = None

            fwd, fwdbwd = median_ms(forward, repeats), median_ms(forward_backward, repeats)
            size = module_bytes(layer)
            rows.append(
                f"| {out_f}x{in_f} | {label} | {size / 2**20:.2f} | {8 * size / (out_f * in_f):.2f} | {fwd:.1f} | {fwdbwd:.1f} |"
            )
            print(rows[-1], flush=True)
    return rows


def model_rows(rank: int) -> list[str]:
    from pissa.hub import load_model

    rows = []
    for quantize in (None, "nf4"):
        model, _ = load_model("smollm2")
        pissa.attach(model, pissa.AdapterConfig(rank=rank, quantize=quantize, quant_iters=1))
        residual = sum(module_bytes(layer.residual) for _, layer in pissa.adapted_layers(model))
        rows.append(f"| SmolLM2-135M, rank {rank} | {quantize or 'dense float32'} | {residual / 2**20:.1f} | {module_bytes(model) / 2**20:.1f} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="rows of the input batch")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model memory row")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    layers = layer_rows([(1536, 576), (576, 1536)], args.tokens, args.repeats)
    models = [] if args.no_model else model_rows(16)
    text = "\n".join([
        "# 4-bit (NF4) vs dense residual layer",
        "",
        f"Frozen layer, input {args.tokens} tokens, median of {args.repeats}; forward+backward = input gradient.",
        f"`OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/quant_layer.py`, torch {torch.__version__}, "
        "bitsandbytes CPU kernels; measured on a shared, loaded 2-core CPU (times are noisy).",
        "",
        "| shape (out x in) | residual | MiB | bits/weight | forward (ms) | forward+backward (ms) |",
        "|---|---|---:|---:|---:|---:|",
        *layers,
        "",
        *(["| model | residual | residual MiB | model MiB (params + buffers) |", "|---|---|---:|---:|", *models] if models else []),
    ]) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
