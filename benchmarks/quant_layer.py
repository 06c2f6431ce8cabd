"""The 4-bit residual layer vs the dense one: stored bytes, forward and forward+backward time.

Layer rows: a frozen residual of SmolLM2-135M's MLP shapes as ``nn.Linear`` (float32 and
bfloat16) and as :class:`pissa.adapter.quantized.NF4Linear` (dequantized on the fly, in forward and again in
backward), on a batch of tokens; backward is the input gradient (what flows through a frozen
layer). Model row: bytes of all parameters and buffers of SmolLM2-135M after ``pissa.attach``
(rank 16) with a dense vs a 4-bit residual. Each dense layer and its NF4 counterpart (same
compute dtype) are timed alternately, ``--repeats`` rounds after a warm-up, the order swapped
every round; the tables give medians and the per-round paired ratios NF4 / dense.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quant_layer.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quant_layer.py --tokens 64 --repeats 2 --no-model   # quick

Writes ``bench_out/quant_layer.md`` (``--update-results``: ``benchmarks/results/quant_layer.md``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import pissa
from _results import PAIRED_HEADER, Results, add_results_options, paired_row
from pissa.adapter.quantized import NF4Linear
from pissa.runtime.hub import load_model


def paired_ms(a: Callable[[], object], b: Callable[[], object], repeats: int) -> tuple[list[float], list[float]]:
    """Per-round times (ms) of ``a`` and ``b`` run alternately (a first in even rounds), after one warm-up each."""
    a(), b()
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(repeats):
        for k in ((0, 1) if i % 2 == 0 else (1, 0)):
            fn = (a, b)[k]
            start = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - start) * 1000)
    return times


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def layer_rows(shapes: list[tuple[int, int]], tokens: int, repeats: int) -> tuple[list[list[str]], list[list[str]]]:
    """(one row per shape and variant: bytes and median times; paired NF4 / dense rows)."""
    rows, paired = [], []
    for out_f, in_f in shapes:
        W = torch.randn(out_f, in_f) / in_f**0.5
        for dtype in (torch.float32, torch.bfloat16):
            name = str(dtype).removeprefix("torch.")
            dense = nn.Linear(in_f, out_f, bias=False).to(dtype).requires_grad_(False)
            dense.weight.data.copy_(W)
            layers = {f"dense {name}": dense, f"nf4 ({name} compute)": NF4Linear(W.to(dtype))}
            x = torch.randn(tokens, in_f, dtype=dtype, requires_grad=True)

            def forward(layer: nn.Module, x: torch.Tensor) -> Callable[[], None]:
                def fn() -> None:
                    with torch.no_grad():
                        layer(x)
                return fn

            def forward_backward(layer: nn.Module, x: torch.Tensor) -> Callable[[], None]:
                def fn() -> None:
                    layer(x).sum().backward()
                    x.grad = None
                return fn

            (d_label, d_layer), (q_label, q_layer) = layers.items()
            d_fwd, q_fwd = paired_ms(forward(d_layer, x), forward(q_layer, x), repeats)
            d_bwd, q_bwd = paired_ms(forward_backward(d_layer, x), forward_backward(q_layer, x), repeats)
            for label, layer, fwd, bwd in ((d_label, d_layer, d_fwd, d_bwd), (q_label, q_layer, q_fwd, q_bwd)):
                size = module_bytes(layer)
                rows.append([f"{out_f}x{in_f}", label, f"{size / 2**20:.2f}", f"{8 * size / (out_f * in_f):.2f}",
                             f"{statistics.median(fwd):.1f}", f"{statistics.median(bwd):.1f}"])
                print(" | ".join(rows[-1]), flush=True)
            paired.append(paired_row(f"{out_f}x{in_f} forward: {q_label} / {d_label}", q_fwd, d_fwd))
            paired.append(paired_row(f"{out_f}x{in_f} forward+backward: {q_label} / {d_label}", q_bwd, d_bwd))
    return rows, paired


def model_rows(rank: int) -> list[list[str]]:
    rows = []
    for quantize in (None, "nf4"):
        model, _ = load_model("smollm2")
        pissa.attach(model, pissa.AdapterConfig(rank=rank, quantize=quantize, quant_iters=1))
        residual = sum(module_bytes(layer.residual) for _, layer in pissa.adapted_layers(model))
        rows.append([f"SmolLM2-135M, rank {rank}", quantize or "dense float32", f"{residual / 2**20:.1f}",
                     f"{module_bytes(model) / 2**20:.1f}"])
        print(" | ".join(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="rows of the input batch")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds per pair")
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model memory row")
    add_results_options(parser, "quant_layer")
    args = parser.parse_args()
    with Results.from_args(args, "4-bit (NF4) vs dense residual layer") as res:
        torch.manual_seed(0)
        layers, paired = layer_rows([(1536, 576), (576, 1536)], args.tokens, args.repeats)
        models = [] if args.no_model else model_rows(16)
        res.add(f"Frozen layer, input {args.tokens} tokens, median of {args.repeats} rounds; forward+backward = input "
                f"gradient; torch threads {torch.get_num_threads()}; bitsandbytes CPU kernels.")
        res.table(["shape (out x in)", "residual", "MiB", "bits/weight", "forward (ms)", "forward+backward (ms)"], layers,
                  align="llrrrr")
        res.heading("Paired ratios (NF4 and dense timed alternately, per round)")
        res.table(PAIRED_HEADER, paired)
        if models:
            res.heading("Whole model")
            res.table(["model", "residual", "residual MiB", "model MiB (params + buffers)"], models, align="llrr")


if __name__ == "__main__":
    main()
