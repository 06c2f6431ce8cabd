"""Training step time and peak memory: our adapted layer vs Hugging Face PEFT's LoRA and PiSSA.

Same model (SmolLM2-135M-Instruct by default), same rank, same targets (every projection), the
same batch of Rotten Tomatoes examples and the same step (pissa.train.train_step: forward,
completion-only loss, backward, clipping, AdamW). Each variant runs in its own process (so
peak memory is not polluted by another's allocations): one warm-up step, then ``--steps`` timed
steps; ``--rounds`` repeats the three processes in turn and keeps each variant's best median.
Peak memory is the largest resident set size during the timed steps minus the size before
them (sampled every 2 ms from /proc/self/statm): the step's activations and gradients (the AdamW
moments already exist after the warm-up step). Ratios are PEFT / ours (> 1: ours is faster / smaller).

    .venv/bin/python benchmarks/step_time.py                      # batch 8, 5 steps, 2 rounds
    .venv/bin/python benchmarks/step_time.py --steps 2 --rounds 1 # quick

Writes ``benchmarks/results/step_time.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

VARIANTS = ("pissa (ours)", "peft lora", "peft pissa")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the resident set size in a background thread; ``peak`` is the largest seen."""

    def __init__(self, every: float = 0.002) -> None:
        self.every, self.peak, self._stop = every, rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.every)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def measure(variant: str, args: argparse.Namespace) -> dict[str, float]:
    """Build one variant and time its steps (runs inside the child process)."""
    import torch

    from pissa.train import RunConfig, Session, load_data, make_optimizer, step_indices, train_step
    from pissa.hub import load_model
    from pissa.objective import encode

    torch.set_num_threads(args.threads)
    cfg = RunConfig(model=args.model, rank=args.rank, batch_size=args.batch_size, lr=1e-5, steps=args.steps + 1,
                    max_length=args.max_length, threads=args.threads)
    model, tok = load_model(args.model)
    data = load_data(cfg.data)
    if variant == "pissa (ours)":
        import pissa

        pissa.attach(model, cfg.adapter_config())
    else:
        from peft import LoraConfig, get_peft_model

        init = True if variant == "peft lora" else "pissa_niter_4"
        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules="all-linear",
                                                 lora_dropout=0.0, init_lora_weights=init))
    model.train()
    train = [encode(tok, e, data.labels, "causal-lm", cfg.max_length) for e in data.train[: 64 * args.batch_size]]
    session = Session(cfg, "causal-lm", model, tok, data, train, [], None)
    opt = make_optimizer(model, cfg)
    batch = session.batch(step_indices(len(train), 0, 0, cfg.batch_size))  # the same batch every step
    train_step(model, [batch], "causal-lm", opt, 1e-5, cfg)  # warm-up (allocations, oneDNN kernels)
    times = []
    before = rss_bytes()
    with PeakRSS() as peak:
        for _ in range(args.steps):
            start = time.perf_counter()
            train_step(model, [batch], "causal-lm", opt, 1e-5, cfg)
            times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "peak_mb": (peak.peak - before) / 2**20,
            "tokens": batch.tokens, "shape": list(batch.input_ids.shape),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def table(results: dict[str, dict[str, float]], args: argparse.Namespace, load: str) -> str:
    ours = results[VARIANTS[0]]
    lines = [
        "# Training step time and peak memory: pissa vs PEFT",
        "",
        f"`{' '.join(['python', 'benchmarks/step_time.py', *sys.argv[1:]])}` — model {args.model}, rank {args.rank}, "
        f"all linear projections, batch {ours['shape'][0]} x {ours['shape'][1]} tokens (same batch for all), "
        f"{args.threads} thread(s), median of {args.steps} steps, best of {args.rounds} round(s). "
        f"Load average at the start: {load} (the CPU was shared; timings are noisy).",
        "",
        "| variant | trainable params | step time (s) | peak step memory (MB) | time ratio (variant / ours) | memory ratio |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['trainable']:,} | {r['seconds']:.2f} | {r['peak_mb']:.0f} | "
                     f"{r['seconds'] / ours['seconds']:.2f} | {r['peak_mb'] / max(ours['peak_mb'], 1e-9):.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--rounds", type=int, default=2, help="repeat the three variants this many times, keep the best")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_time.md"))
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    results: dict[str, dict[str, float]] = {}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--child", variant, *sys.argv[1:]]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            if variant not in results or r["seconds"] < results[variant]["seconds"]:
                results[variant] = r
            print(f"{variant}: {r['seconds']:.2f} s/step, peak {r['peak_mb']:.0f} MB", file=sys.stderr, flush=True)
    text = table(results, args, load)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
