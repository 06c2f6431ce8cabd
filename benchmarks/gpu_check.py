"""GPU check: the accelerator claims in one script that a person with a CUDA machine runs in under 10 minutes.

1. Init: ``pissa.attach`` vs PEFT's ``pissa_niter_4`` on the device (float32 base, every projection
   or the first ``--layers``): wall time of the init call alone (CUDA synchronized), alternated over
   ``--init-rounds`` rounds, and each layer's residual error relative to the optimal rank-r one,
   ``||W - B A||_F / sqrt(sum_{i>r} S_i^2)`` (1.0 = the exact SVD).
2. Training steps in bfloat16 (base weights bf16, factors float32, forward under autocast): ours and
   QPiSSA (``AdapterConfig(quantize="nf4")``, the residual in 4-bit) vs PEFT LoRA, alternated over
   ``--rounds`` rounds after a warm-up round; median step time, paired ratios and, on CUDA, the
   step's peak allocation above the resident model.
3. Peak memory of whole runs: ``pissa finetune --method pissa`` / ``--method lora`` / PEFT LoRA /
   PEFT PiSSA (as ``benchmarks/step_time.py`` runs them) and ``pissa finetune --quantize nf4``,
   bfloat16, with and without activation checkpointing, each in a fresh process (CUDA peak
   allocation on a GPU, peak RSS everywhere).
4. Sharded training over every visible GPU: ``pissa finetune --nproc N --fsdp`` (FSDP2), or, when
   this checkout's ``pissa finetune`` has no ``--fsdp`` yet, ``--nproc N`` (DDP), saying so. With one
   GPU the run goes through torchrun with one process so that the distributed path runs. A failure
   is reported with the last line the run printed; the last training loss is compared with the
   single-process run of part 3.

On a machine without CUDA every part runs on the CPU (``--device cpu``: the same code paths,
gloo for part 4); shrink it with the flags, e.g.

    .venv/bin/python benchmarks/gpu_check.py --update-results                   # on a CUDA machine
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gpu_check.py --device cpu --threads 1 --layers 14 \\
        --rounds 2 --batch-size 4 --quant-iters 1 --memory-steps 2 --eval-size 8 --no-checkpointing-runs

Writes ``bench_out/gpu.md``; ``--update-results`` (CUDA runs only) writes ``benchmarks/results/gpu.md``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from _common import (
    OURS,
    PEFT_INIT,
    PEFT_LORA,
    PEFT_PISSA,
    Setting,
    Trainee,
    WholeRun,
    build,
    final_loss,
    finetune_options,
    interleaved_times,
    measure,
    optimal_residuals,
    residual_ratios,
    step_config,
    sync,
    timed_init,
    training_batch,
    whole_run,
)
from _results import PAIRED_HEADER, Results, add_results_options, paired_row
from pissa.adapter.targets import find_targets
from pissa.runtime.devices import resolve_device
from pissa.runtime.hub import load_model

QPISSA = "qpissa (ours, nf4)"
ATTACH = "pissa.attach"
NITER4 = "PEFT pissa_niter_4"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="embedded model or a local Hugging Face folder")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (auto: CUDA when available)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--layers", type=int, default=0, help="init: only the first N projections (0: all)")
    p.add_argument("--init-rounds", type=int, default=3, help="init: alternated rounds")
    p.add_argument("--batch-size", type=int, default=16, help="examples of the timed step")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--rounds", type=int, default=10, help="timed step rounds (after one warm-up round)")
    p.add_argument("--quant-iters", type=int, default=5, help="QPiSSA iterations of the 4-bit variant")
    p.add_argument("--memory-steps", type=int, default=6, help="steps of each whole run")
    p.add_argument("--memory-batch-size", type=int, default=8)
    p.add_argument("--eval-size", type=int, default=16, help="examples each whole run scores before and after")
    p.add_argument("--no-checkpointing-runs", action="store_true",
                   help="whole runs without activation checkpointing only")
    p.add_argument("--nproc", type=int, default=0, help="processes of the sharded run (0: every visible GPU, 2 on the CPU)")
    p.add_argument("--no-sharded", action="store_true", help="skip part 4")
    add_results_options(p, "gpu")
    return p.parse_args()


# --- 1. init -----------------------------------------------------------------------------------------


def init_check(res: Results, args: argparse.Namespace, device: torch.device) -> None:
    base, _ = load_model(args.model)
    base.to(device)
    names = find_targets(base, "all-linear")
    if args.layers:
        names = names[: args.layers]
    optimal = optimal_residuals(base, names, args.rank)
    inits = {ATTACH: None, NITER4: PEFT_INIT[PEFT_PISSA]}
    for peft_init in inits.values():  # warm-up: first-call setup of each path (and of CUDA's solvers)
        timed_init(copy.deepcopy(base), args.rank, names[:1], peft_init)
    times: dict[str, list[float]] = {k: [] for k in inits}
    errors: dict[str, list[float]] = {k: [] for k in inits}
    for rnd in range(args.init_rounds):
        for label in (list(inits) if rnd % 2 == 0 else list(inits)[::-1]):
            model = copy.deepcopy(base)
            torch.manual_seed(rnd)
            seconds, residuals = timed_init(model, args.rank, names, inits[label])
            times[label].append(seconds)
            errors[label] += residual_ratios(residuals, optimal)
            log(f"init round {rnd + 1}: {label} {seconds:.2f} s")
            del model, residuals
            sync(device)
    res.heading("1. Init on the device")
    res.add(f"{len(names)} projections, rank {args.rank}, float32 base, median of {args.init_rounds} alternated rounds.")
    ref = statistics.median(times[NITER4])
    res.table(["init", "time (s)", f"time / {NITER4}", "mean residual / optimal", "max residual / optimal"],
              [[k, f"{statistics.median(t):.3f}", f"{statistics.median(t) / ref:.2f}x",
                f"{statistics.fmean(errors[k]):.6f}", f"{max(errors[k]):.6f}"] for k, t in times.items()])
    res.table(PAIRED_HEADER, [paired_row(f"{ATTACH} / {NITER4}", times[ATTACH], times[NITER4])])


# --- 2. training steps -------------------------------------------------------------------------------


def step_check(res: Results, args: argparse.Namespace, device: torch.device) -> None:
    setting = Setting("bfloat16")
    batch = training_batch(args.model, args.batch_size, args.max_length, device)
    cfg = step_config(setting, batch, args.threads)
    models = {OURS: build(OURS, setting, args.model, args.rank, device),
              PEFT_LORA: build(PEFT_LORA, setting, args.model, args.rank, device),
              QPISSA: build(OURS, setting, args.model, args.rank, device, quantize="nf4", quant_iters=args.quant_iters)}
    trainees = {v: Trainee.of(m, cfg) for v, m in models.items()}
    t = interleaved_times(trainees, batch, cfg, args.rounds, log=lambda s: log(f"bf16 steps: {s}"))
    cuda = device.type == "cuda"
    ref = t.median(PEFT_LORA)
    res.heading("2. Training steps, bfloat16")
    res.add(f"One batch of {batch.input_ids.shape[0]} x {batch.input_ids.shape[1]} tokens, rank {args.rank} on every "
            f"projection, {args.rounds} alternated rounds (rotating order) after a warm-up round. QPiSSA: "
            f"`AdapterConfig(quantize=\"nf4\", quant_iters={args.quant_iters})` on the bfloat16 base.")
    res.table(["variant", "step time (s)", "time / PEFT LoRA", *(["step peak above resident, CUDA (MB)"] if cuda else [])],
              [[v, f"{t.median(v):.4f}", f"{t.median(v) / ref:.2f}",
                *([f"{statistics.median(t.step_peak[v]) / 2**20:.0f}"] if cuda else [])] for v in models])
    res.table(PAIRED_HEADER, [paired_row(f"{v} / {PEFT_LORA}", t.times[v], t.times[PEFT_LORA]) for v in (OURS, QPISSA)])


# --- 3. whole runs -----------------------------------------------------------------------------------


def memory_check(res: Results, args: argparse.Namespace, device: torch.device, workdir: Path) -> WholeRun:
    """Whole runs in bfloat16; returns the single-process ``pissa`` run without checkpointing (part 4's reference)."""
    cuda = device.type == "cuda"
    options = finetune_options(model=args.model, rank=args.rank, steps=args.memory_steps, batch_size=args.memory_batch_size,
                               max_length=args.max_length, eval_size=args.eval_size, threads=args.threads, device=device)
    runs: list[tuple[Setting, str, WholeRun]] = []
    for setting in [Setting("bfloat16")] + ([] if args.no_checkpointing_runs else [Setting("bfloat16", True)]):
        for run in ("pissa", "lora", PEFT_LORA, PEFT_PISSA, "pissa --quantize nf4"):
            quant = run.endswith("nf4")
            folder = workdir / f"{setting.label}-{run}".replace(" ", "_").replace("+", "")
            extra = ["--quantize", "nf4", "--quant-iters", str(args.quant_iters)] if quant else []
            whole = whole_run("pissa" if quant else run, setting, [*options, *extra], folder, args.threads, cuda)
            runs.append((setting, run, whole))
            log(f"{setting.label}: {run}: peak RSS {whole.measured.rss / 1e9:.3f} GB" + (
                f", CUDA {whole.measured.cuda_peak / 1e9:.3f} GB" if whole.measured.cuda_peak else ""))
    res.heading("3. Peak memory of whole runs, bfloat16")
    res.add(f"{args.memory_steps} steps of batch {args.memory_batch_size}, {args.eval_size} examples scored before and "
            "after, each run in a fresh process. " + ("The CUDA peak allocation is the measure; " if cuda else "")
            + "PiSSA / LoRA compares `pissa finetune --method pissa` with `--method lora` in the same setting.")
    rows = []
    for setting, run, whole in runs:
        lora = next(w for s, r, w in runs if s == setting and r == "lora")
        p, lo = whole.peak(cuda), lora.peak(cuda)
        m = whole.measured
        name = f"pissa finetune --method {run}" if run in ("pissa", "lora") else (
            "pissa finetune --quantize nf4" if run.endswith("nf4") else run)
        gpu = [f"{m.cuda_peak / 1e9:.3f}" if m.cuda_peak else "n/a"] if cuda else []
        rows.append([setting.label, name, f"{m.rss / 1e9:.3f}", *gpu, f"{p / lo:.3f}" if p and lo else "n/a", f"{m.seconds:.0f}",
                     "n/a" if whole.loss is None else f"{whole.loss:.4f}", "ok" if m.ok else f"FAILED: {m.failure}"])
    res.table(["setting", "run", "peak RSS (GB)", *(["CUDA peak allocated (GB)"] if cuda else []), "/ ours lora",
               "wall (s)", "last train loss", "status"], rows)
    return next(w for s, r, w in runs if s == Setting("bfloat16") and r == "pissa")


# --- 4. sharded training -----------------------------------------------------------------------------


def has_fsdp() -> bool:
    """Whether this checkout's ``pissa finetune`` takes ``--fsdp``."""
    out = subprocess.run([sys.executable, "-m", "pissa", "finetune", "--help"], capture_output=True, text=True)
    return "--fsdp" in out.stdout


def sharded_check(res: Results, args: argparse.Namespace, device: torch.device, workdir: Path, single: WholeRun) -> None:
    nproc = args.nproc or (torch.cuda.device_count() if device.type == "cuda" else 2)
    fsdp = has_fsdp()
    options = finetune_options(model=args.model, rank=args.rank, steps=args.memory_steps, batch_size=args.memory_batch_size,
                               max_length=args.max_length, eval_size=args.eval_size, threads=max(1, args.threads // nproc),
                               device=device)
    folder = workdir / "sharded"
    flags = ["--dtype", "bfloat16", *options, *(["--fsdp"] if fsdp else []), "--out", str(folder)]
    if nproc > 1:
        launcher = [sys.executable, "-m", "pissa", "finetune", "--nproc", str(nproc)]
    else:  # one GPU: torchrun itself, so that the distributed path runs
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                    "-m", "pissa", "finetune"]
    m = measure([*launcher, *flags])
    shown = " ".join(["torchrun --nproc_per_node=1 -m pissa finetune" if nproc == 1 else f"pissa finetune --nproc {nproc}",
                      *flags[:-2]])  # without --out TMP
    loss = final_loss(folder)
    log(f"sharded: exit {m.code}, {m.seconds:.0f} s" + (f", FAILED: {m.failure}" if not m.ok else ""))
    kind = "FSDP2 (`--fsdp`)" if fsdp else "DDP: this checkout's `pissa finetune` has no `--fsdp` option"
    res.heading("4. Sharded training")
    res.add(f"{nproc} process(es) on {device.type}, {kind}; bfloat16, {args.memory_steps} steps of batch "
            f"{args.memory_batch_size} (split over the processes), the same data order as the single-process run.")
    single_loss = "n/a" if single.loss is None else f"{single.loss:.4f}"
    res.table(["command", "status", "wall (s)", "peak RSS, largest process (GB)", "last train loss", "single-process last loss"],
              [[f"`{shown}`", "ok" if m.ok else f"FAILED (exit {m.code}): {m.failure}", f"{m.seconds:.0f}", f"{m.rss / 1e9:.3f}",
                "n/a" if loss is None else f"{loss:.4f}", single_loss]])


def main() -> None:
    args = parse_args()
    device = resolve_device(args.device)
    if args.update_results and device.type != "cuda":
        raise SystemExit("--update-results writes benchmarks/results/gpu.md, which holds CUDA runs; "
                         "on this machine drop it (the run goes to bench_out/gpu.md)")
    with Results.from_args(args, f"GPU check ({device.type})") as res:
        torch.set_num_threads(args.threads)
        res.add(f"Model {args.model}, device {device}, torch threads {args.threads}.")
        init_check(res, args, device)
        step_check(res, args, device)
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
            single = memory_check(res, args, device, Path(tmp))
            if not args.no_sharded:
                sharded_check(res, args, device, Path(tmp), single)


if __name__ == "__main__":
    main()
