"""Training step time and memory: our adapted layer vs Hugging Face PEFT's LoRA and PiSSA.

Same model (SmolLM2-135M-Instruct by default), same rank, same targets (every projection), the
same batch of Rotten Tomatoes examples and the same step (``pissa.train.train_step``: forward,
completion-only loss, backward, clipping, AdamW). The three models live in one process and
their steps are interleaved (ours, PEFT LoRA, PEFT PiSSA, then PEFT LoRA, PEFT PiSSA, ours, ...),
so a changing machine load hits all three alike; each variant's time is the median of ``--steps``
steps after one warm-up round. Memory is measured exactly rather than by sampling the process size: the
bytes of the tensors autograd saves for backward in one forward pass (the activations, which is
where layer implementations differ), plus trainable parameters with their gradients and AdamW
moments. Ratios are variant / ours (> 1: ours is faster or smaller); the paired table gives,
per PEFT variant, the ratio ours / variant of the two steps taken in the same round (median, min,
max, and in how many rounds ours was faster). The variants' order rotates every round.

    .venv/bin/python benchmarks/step_time.py              # batch 8, median of 5 steps
    .venv/bin/python benchmarks/step_time.py --steps 2    # quick

Writes ``bench_out/step_time.md`` (``--update-results``: ``benchmarks/results/step_time.md``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from peft import LoraConfig, get_peft_model

import pissa
from _results import PAIRED_HEADER, Results, add_results_options, paired_row
from pissa.config import AdapterConfig, RunConfig
from pissa.hub import load_model
from pissa.objective import Batch, collate, encode_all, loss_sum
from pissa.train import load_data, make_optimizer, step_indices, train_step

VARIANTS = ("pissa (ours)", "peft lora", "peft pissa")


def build(variant: str, cfg: RunConfig) -> torch.nn.Module:
    model, _ = load_model(cfg.model)
    if variant == "pissa (ours)":
        pissa.attach(model, cfg.adapter)
    else:
        init = True if variant == "peft lora" else "pissa_niter_4"
        model = get_peft_model(model, LoraConfig(r=cfg.adapter.rank, lora_alpha=cfg.adapter.rank, target_modules="all-linear",
                                                 lora_dropout=0.0, init_lora_weights=init))
    return model.train()


def saved_activation_bytes(model: torch.nn.Module, batch: Batch) -> int:
    """Bytes of the distinct storages autograd keeps for backward during one forward pass."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_sum(model, batch, "causal-lm")
    loss.backward()
    model.zero_grad(set_to_none=True)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params)  # frozen weights are not activations


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (interleaved)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    add_results_options(p, "step_time")
    args = p.parse_args()
    with Results.from_args(args, "Training step time and memory: pissa vs PEFT") as res:
        torch.set_num_threads(args.threads)
        cfg = RunConfig(model=args.model, adapter=AdapterConfig(rank=args.rank), batch_size=args.batch_size,
                        max_length=args.max_length, lr=1e-5, threads=args.threads)
        data = load_data(cfg.data)
        _, tok = load_model(cfg.model)
        train = encode_all(tok, data.train[: 64 * args.batch_size], data.labels, "causal-lm", cfg.max_length)
        batch = collate([train[i] for i in step_indices(len(train), 0, 0, args.batch_size)], tok.pad_token_id, "causal-lm")
        models = {v: build(v, cfg) for v in VARIANTS}
        opts = {v: make_optimizer(m, cfg) for v, m in models.items()}
        memory = {v: saved_activation_bytes(m, batch) for v, m in models.items()}
        trainable = {v: sum(q.numel() for q in m.parameters() if q.requires_grad) for v, m in models.items()}
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        orders = []
        for i in range(args.steps + 1):  # round 0 is the warm-up
            order = VARIANTS[i % len(VARIANTS):] + VARIANTS[: i % len(VARIANTS)]
            for v in order:
                start = time.perf_counter()
                train_step(models[v], [batch], "causal-lm", opts[v], 1e-5, cfg)
                if i:
                    times[v].append(time.perf_counter() - start)
            if i:
                orders.append(" -> ".join(order))
            print(f"round {i}: " + ", ".join(f"{v} {times[v][-1]:.2f} s" for v in VARIANTS if times[v]),
                  file=sys.stderr, flush=True)
        ours = VARIANTS[0]
        med = {v: statistics.median(t) for v, t in times.items()}
        state = {v: 4 * 4 * trainable[v] for v in VARIANTS}  # fp32 parameter + gradient + 2 AdamW moments
        res.add(f"{args.model}, rank {args.rank}, every linear projection, one batch of {batch.input_ids.shape[0]} x "
                f"{batch.input_ids.shape[1]} tokens for all, {args.threads} thread(s), median of {args.steps} "
                "interleaved steps (after a warm-up round); the three variants ran alternately, in rotating order.")
        res.table(["variant", "trainable params", "step time (s)", "time / ours", "activations saved for backward (MB)",
                   "/ ours", "params+grads+AdamW (MB)"],
                  [[v, f"{trainable[v]:,}", f"{med[v]:.2f}", f"{med[v] / med[ours]:.2f}", f"{memory[v] / 2**20:.1f}",
                    f"{memory[v] / memory[ours]:.2f}", f"{state[v] / 2**20:.1f}"] for v in VARIANTS])
        res.heading("Paired ratios (steps of the same round)")
        res.table(PAIRED_HEADER, [paired_row(f"{ours} / {v}", times[ours], times[v]) for v in VARIANTS[1:]])
        res.heading("Per-round step times (s)")
        res.table(["round", "order", *VARIANTS],
                  [[str(i + 1), orders[i], *(f"{times[v][i]:.2f}" for v in VARIANTS)] for i in range(args.steps)])


if __name__ == "__main__":
    main()
