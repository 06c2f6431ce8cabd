"""Training step time and peak memory: our PiSSA vs Hugging Face PEFT's LoRA and PiSSA, per base dtype,
with and without activation checkpointing.

Step time. For each setting (``--dtypes`` x activation checkpointing off / on) one process builds
four variants of the same model (SmolLM2-135M-Instruct by default) at the same rank on every
projection (see ``benchmarks/_common.py``): ours (``pissa.attach``, float32 factors), PEFT LoRA,
PEFT PiSSA (``pissa_niter_4``) and the frozen base alone (the floor: its forward and backward,
gradients to every layer's input, no adapter and no optimizer; the part of a step no adapter
layer can avoid). All take the same step (``pissa.training.loop.train_step``: forward under
``pissa.runtime.devices.autocast`` for a half base, completion-only loss, backward, clipping, AdamW; the
floor stops after backward) on the same batch of Rotten Tomatoes reviews, alternately: one
untimed warm-up round, then ``--rounds`` rounds, each variant once per round, the order rotated
every round so that a changing load hits all alike. Reported: median step time per variant and,
per comparison, the ratios of the two steps taken in the same round (median, min, max, rounds
won). The activations saved for backward are counted exactly (distinct storages autograd keeps
in one forward pass) without checkpointing; with it they are recomputed and the whole-run peaks
below are the measure.

Peak memory. Whole runs, each in a fresh process started from a small wrapper interpreter:
``pissa finetune --method pissa``, ``pissa finetune --method lora``, and the PEFT equivalents
(``benchmarks/_peft_finetune.py``: the same options, data, batches, loop and evaluations with
PEFT's LoRA / ``pissa_niter_4``), ``--memory-steps`` steps of ``--memory-batch-size`` each, in
every setting, ``--memory-repeats`` times (rotating order). Peak RSS from ``os.wait4`` (the
child's own high-water mark); on CUDA also ``torch.cuda.max_memory_allocated``, which is then the
measure the target uses. Where it goes: per variant and dtype, a fresh process that loads,
adapts and takes two steps of the same batch size reports the peak RSS of each stage (``VmHWM``,
reset between stages) and its anonymous / file-backed RSS at the end.

Targets (issue 11): ours / PEFT LoRA step time <= 0.90 (median paired ratio) and PiSSA's peak
memory <= LoRA's (ours, same rank; medians over the repeats) in every setting; the script says per
setting whether each is met.

    .venv/bin/python benchmarks/step_time.py                                  # all four settings
    .venv/bin/python benchmarks/step_time.py --rounds 1 --dtypes float32 --no-memory   # quick
    .venv/bin/python benchmarks/step_time.py --no-timing --name peak_memory              # memory only

Writes ``bench_out/step_time.md`` (``--update-results``: ``benchmarks/results/step_time.md``).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from _common import (
    FINETUNE_RUNS,
    FLOOR,
    OURS,
    PEFT_LORA,
    PEFT_PISSA,
    STAGES,
    Setting,
    Timings,
    Trainee,
    WholeRun,
    build,
    finetune_options,
    interleaved_times,
    saved_activation_bytes,
    stage_peaks,
    step_config,
    training_batch,
    whole_run,
)
from _results import PAIRED_HEADER, Results, add_results_options, paired_ratios, paired_row
from pissa.runtime.devices import resolve_device, torch_dtype

VARIANTS = (OURS, PEFT_LORA, PEFT_PISSA, FLOOR)
TIME_TARGET = 0.90
"""Ours / PEFT LoRA step time the issue asks for (median paired ratio)."""
STAGE_VARIANTS = ((OURS, "pissa"), (OURS, "lora"), (PEFT_LORA, "lora"), (PEFT_PISSA, "pissa"))
"""(variant, method) of the stage breakdown; ours runs as method pissa and method lora."""

Memory = dict[Setting, dict[str, list[WholeRun]]]
"""Per setting, per :data:`FINETUNE_RUNS` entry, one whole run per repeat."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (auto: CUDA when available)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated base dtypes")
    p.add_argument("--checkpointing", choices=("both", "off", "on"), default="both",
                   help="activation checkpointing settings to measure")
    p.add_argument("--batch-size", type=int, default=8, help="examples of the timed step")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per setting (after one warm-up round)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (also the runs')")
    p.add_argument("--memory-steps", type=int, default=6, help="steps of each whole run")
    p.add_argument("--memory-batch-size", type=int, default=4)
    p.add_argument("--memory-repeats", type=int, default=3, help="whole runs per variant and setting")
    p.add_argument("--eval-size", type=int, default=16, help="examples each whole run scores before and after")
    p.add_argument("--no-memory", action="store_true", help="skip the whole runs and the stage breakdown")
    p.add_argument("--no-timing", action="store_true",
                   help="skip the step timing (memory only: valid on a loaded machine; use with --name peak_memory)")
    add_results_options(p, "step_time")
    return p.parse_args()


def settings_of(args: argparse.Namespace) -> list[Setting]:
    ckpt = {"both": (False, True), "off": (False,), "on": (True,)}[args.checkpointing]
    return [Setting(d, c) for d in args.dtypes.split(",") for c in ckpt]


# --- measuring -------------------------------------------------------------------------------------


@dataclass
class StepResult:
    """One setting's timings, trainable parameter counts and saved activations (None with checkpointing)."""

    timings: Timings
    trainable: dict[str, int]
    activations: dict[str, int] | None
    tokens: tuple[int, int]


def time_setting(setting: Setting, args: argparse.Namespace, device: torch.device) -> StepResult:
    """Build the four variants of ``setting``, count their saved activations, and time them alternately."""
    batch = training_batch(args.model, args.batch_size, args.max_length, device)
    cfg = step_config(setting, batch, args.threads)
    models = {v: build(v, setting, args.model, args.rank, device) for v in VARIANTS}
    trainable = {v: sum(p.numel() for p in m.parameters() if p.requires_grad) for v, m in models.items()}
    activations = None
    if not setting.checkpointing:
        activations = {v: saved_activation_bytes(m, batch, torch_dtype(setting.dtype)) for v, m in models.items()}
    trainees = {v: Trainee.of(m, cfg) for v, m in models.items()}
    timings = interleaved_times(trainees, batch, cfg, args.rounds, log=lambda s: log(f"{setting.label}: {s}"))
    return StepResult(timings, trainable, activations, (batch.input_ids.shape[0], batch.input_ids.shape[1]))


def memory_runs(settings: list[Setting], args: argparse.Namespace, device: torch.device, workdir: Path) -> Memory:
    """Each of :data:`FINETUNE_RUNS` as a whole run in a fresh process, ``--memory-repeats`` times per setting."""
    options = finetune_options(model=args.model, rank=args.rank, steps=args.memory_steps, batch_size=args.memory_batch_size,
                               max_length=args.max_length, eval_size=args.eval_size, threads=args.threads, device=device)
    out: Memory = {s: {run: [] for run in FINETUNE_RUNS} for s in settings}
    for rep in range(args.memory_repeats):
        for s in settings:
            for run in FINETUNE_RUNS[rep % 4:] + FINETUNE_RUNS[: rep % 4]:
                folder = workdir / f"{rep}-{s.label}-{run}".replace(" ", "_").replace("+", "")
                whole = whole_run(run, s, options, folder, args.threads, cuda=device.type == "cuda")
                out[s][run].append(whole)
                m = whole.measured
                log(f"repeat {rep + 1}, {s.label}, {run}: peak RSS {m.rss / 1e9:.3f} GB, {m.seconds:.0f} s"
                    + ("" if m.ok else f", FAILED: {m.failure}"))
    return out


def stage_breakdown(settings: list[Setting], args: argparse.Namespace,
                    device: torch.device) -> dict[tuple[Setting, str], dict[str, dict[str, int | None]]]:
    """:func:`_common.stage_peaks` of each :data:`STAGE_VARIANTS` entry, per dtype (without checkpointing)."""
    out = {}
    for s in dict.fromkeys(Setting(s.dtype) for s in settings):
        for variant, method in STAGE_VARIANTS:
            label = f"{method} (ours)" if variant == OURS else variant
            out[s, label] = stage_peaks(variant, method, s, model=args.model, rank=args.rank,
                                        batch_size=args.memory_batch_size, max_length=args.max_length,
                                        threads=args.threads, device=device)
            log(f"stages, {s.label}, {label}: " + ", ".join(f"{k} {v['VmHWM'] / 2**20:.0f} MB" for k, v in out[s, label].items()))
    return out


# --- reporting -------------------------------------------------------------------------------------


def median_ratio(a: list[float], b: list[float]) -> float:
    """The median of the per-round ratios a / b (the paired table's figure)."""
    return statistics.median(paired_ratios(a, b))


def met(ok: bool | None) -> str:
    return "n/a" if ok is None else "**met**" if ok else "**not met**"


def peaks(runs: list[WholeRun], cuda: bool) -> list[int]:
    """The measure of each successful run (CUDA peak allocation on a GPU, else peak RSS)."""
    return [p for p in (r.peak(cuda) for r in runs) if p is not None]


def memory_comparison(a: list[int], b: list[int]) -> tuple[str, bool | None, str]:
    """(median a / median b, whether <= 1, whether the runs' ranges overlap) of two runs' peaks."""
    if not a or not b:
        return "n/a", None, "n/a"
    ratio = statistics.median(a) / statistics.median(b)
    spread = "overlap" if min(a) <= max(b) and min(b) <= max(a) else "disjoint"
    return f"{ratio:.3f}", ratio <= 1.0, spread


def report_targets(res: Results, settings: list[Setting], steps: dict[Setting, StepResult], memory: Memory,
                   cuda: bool) -> None:
    res.heading("Targets")
    rows = []
    for s in settings:
        if s in steps:
            t = steps[s].timings.times
            time_ratio = median_ratio(t[OURS], t[PEFT_LORA])
            row = [s.label, f"{time_ratio:.2f}x", met(time_ratio <= TIME_TARGET),
                   f"{median_ratio(t[FLOOR], t[PEFT_LORA]):.2f}x"]
        else:
            row = [s.label, "not timed", "n/a", "not timed"]
        if s in memory:
            ratio, ok, spread = memory_comparison(peaks(memory[s]["pissa"], cuda), peaks(memory[s]["lora"], cuda))
            peft, _, _ = memory_comparison(peaks(memory[s][PEFT_PISSA], cuda), peaks(memory[s][PEFT_LORA], cuda))
            row += [ratio, spread, met(ok), peft]
        else:
            row += ["n/a", "n/a", "n/a", "n/a"]
        rows.append(row)
    what = "CUDA peak" if cuda else "peak RSS"
    res.table(["setting", "ours / PEFT LoRA step (median paired)", f"target <= {TIME_TARGET:.2f}x", "floor / PEFT LoRA step",
               f"PiSSA / LoRA {what} (ours, medians)", "ranges of the runs", "target <= 1",
               f"PEFT PiSSA / PEFT LoRA {what}"], rows)
    res.add("The floor is the frozen base's forward and backward alone (no adapter, no optimizer step), so "
            "floor / PEFT LoRA is about the smallest ratio any adapter layer could reach on this base and device. "
            "\"Ranges of the runs\": whether the repeats' peaks of PiSSA and LoRA overlap (then the difference is "
            "within the run-to-run spread) or not.")


def report_steps(res: Results, steps: dict[Setting, StepResult], device: torch.device) -> None:
    cuda = device.type == "cuda"
    res.heading("Step time")
    rows = []
    for s, r in steps.items():
        med = {v: r.timings.median(v) for v in VARIANTS}
        for v in VARIANTS:
            act = "-" if r.activations is None else f"{r.activations[v] / 2**20:.1f}"
            row = [s.label, v, f"{r.trainable[v]:,}", f"{med[v]:.2f}", f"{med[v] / med[OURS]:.2f}", act,
                   f"{16 * r.trainable[v] / 2**20:.1f}"]
            if cuda:
                row.append(f"{statistics.median(r.timings.step_peak[v]) / 2**20:.0f}")
            rows.append(row)
    res.table(["setting", "variant", "trainable params", "step time (s)", "time / ours",
               "activations saved for backward (MB)", "params+grads+AdamW (MB)",
               *(["step peak above resident, CUDA (MB)"] if cuda else [])], rows)
    res.add("Step time: median over the timed rounds. Activations: exact, without checkpointing (\"-\": with "
            "checkpointing the blocks recompute them in backward). Params+grads+AdamW: float32 trainable parameters, "
            "their gradients and two AdamW moments.")
    for s in steps:
        ref = Setting("float32", s.checkpointing)
        if s.dtype != "float32" and ref in steps:
            ratio = steps[s].timings.median(OURS) / steps[ref].timings.median(OURS)
            res.add(f"{s.label} vs {ref.label} on {device}: our step takes {ratio:.2f}x the time "
                    "(medians of separate groups of rounds, not paired).")

    res.heading("Paired ratios (steps of the same round)")
    rows = []
    for s, r in steps.items():
        t = r.timings.times
        rows += [paired_row(f"{s.label}: {OURS} / {PEFT_LORA}", t[OURS], t[PEFT_LORA]),
                 paired_row(f"{s.label}: {OURS} / {PEFT_PISSA}", t[OURS], t[PEFT_PISSA]),
                 paired_row(f"{s.label}: {FLOOR} / {PEFT_LORA}", t[FLOOR], t[PEFT_LORA])]
    res.table(PAIRED_HEADER, rows)


def report_memory(res: Results, args: argparse.Namespace, memory: Memory, cuda: bool) -> None:
    gb = lambda xs: "n/a" if not xs else f"{statistics.median(xs) / 1e9:.3f} ({min(xs) / 1e9:.3f}-{max(xs) / 1e9:.3f})"
    res.heading("Peak memory of whole runs")
    rows = []
    for s, runs in memory.items():
        for run, repeats in runs.items():
            ok = [r for r in repeats if r.measured.ok]
            failed = [r.measured.failure for r in repeats if not r.measured.ok]
            losses = sorted({f"{r.loss:.4f}" for r in ok if r.loss is not None})
            rss = [r.measured.rss for r in ok]
            row = [s.label, f"pissa finetune --method {run}" if run in ("pissa", "lora") else run, gb(rss)]
            if cuda:
                row.append(gb(peaks(ok, True)))
            row += [f"{statistics.median(r.measured.seconds for r in repeats):.0f}", ", ".join(losses) or "n/a",
                    f"{len(ok)} of {len(repeats)} ok" + (f"; FAILED: {failed[0]}" if failed else "")]
            rows.append(row)
    res.table(["setting", "run", "peak RSS (GB), median (min-max)",
               *(["CUDA peak allocated (GB), median (min-max)"] if cuda else []),
               "wall (s), median", "last train loss", "runs"], rows)
    res.add(f"{args.memory_repeats} repeats of each run (the order of the four runs rotated every repeat). Peak RSS: the "
            "whole process (Python, torch, transformers, the model, data, optimizer, evaluation) at its high-water mark; "
            "ours and PEFT's runs import different libraries (pissa's CLI vs peft), so compare ours with ours and PEFT with "
            "PEFT. Wall time includes start-up, model load, init and both evaluations.")


def report_stages(res: Results, args: argparse.Namespace, stages: dict[tuple[Setting, str], dict[str, dict[str, int | None]]],
                  cuda: bool) -> None:
    res.heading("Where the memory goes: peak RSS per stage (MB)")
    mb = lambda x: "n/a" if x is None else f"{x / 2**20:.0f}"
    rows = []
    for (s, label), marks in stages.items():
        last = marks[STAGES[-1]]
        rows.append([s.label, label, *(mb(marks[k]["VmHWM"]) for k in STAGES), mb(last["RssAnon"]), mb(last["RssFile"]),
                     *([mb(max(m["cuda_peak"] or 0 for m in marks.values()))] if cuda else [])])
    res.table(["dtype", "variant", *(f"peak in: {k}" for k in STAGES), "RssAnon at the end", "RssFile at the end",
               *(["CUDA peak (MB)"] if cuda else [])], rows)
    res.add(f"One fresh process per row: tokenizer and one batch of {args.memory_batch_size} (\"imports and data\"), "
            "`load_model` in the dtype (\"load\"), `pissa.attach` or `get_peft_model` (\"init\"), then two training steps. "
            "Each stage's column is the process's peak RSS during that stage (`VmHWM`, reset at the start of each "
            "stage through `/proc/self/clear_refs`), so the largest column is the process's peak; RssAnon / RssFile: "
            "anonymous memory and file-backed pages (shared libraries, memory-mapped checkpoint files) after step 2.")


def report_rounds(res: Results, steps: dict[Setting, StepResult]) -> None:
    res.heading("Per-round step times (s)")
    for s, r in steps.items():
        t = r.timings
        res.add(f"{s.label}:")
        res.table(["round", "order", *VARIANTS],
                  [[str(i + 1), " -> ".join(t.orders[i]), *(f"{t.times[v][i]:.2f}" for v in VARIANTS)]
                   for i in range(len(t.orders))])


def main() -> None:
    args = parse_args()
    with Results.from_args(args, "Training step time and peak memory: pissa vs PEFT, per dtype and checkpointing") as res:
        torch.set_num_threads(args.threads)
        device = resolve_device(args.device)
        cuda = device.type == "cuda"
        settings = settings_of(args)
        steps: dict[Setting, StepResult] = {}
        for s in [] if args.no_timing else settings:
            steps[s] = time_setting(s, args, device)
            gc.collect()  # the four models go before the next setting's are built
            if cuda:
                torch.cuda.empty_cache()
        memory: Memory = {}
        stages = {}
        if not args.no_memory:
            with tempfile.TemporaryDirectory(prefix="step-time-runs-") as tmp:
                memory = memory_runs(settings, args, device, Path(tmp))
            stages = stage_breakdown(settings, args, device)

        batch = next(iter(steps.values())).tokens if steps else None
        res.add(f"{args.model}, rank {args.rank}, every linear projection, device {device}, {args.threads} thread(s). "
                + ("Step time: not measured in this run (`--no-timing`)." if batch is None else
                   f"Step time: one batch of {batch[0]} x {batch[1]} tokens for all; per setting the four variants ran "
                   f"alternately, in rotating order, for {args.rounds} timed rounds after a warm-up round.")
                + ("" if args.no_memory else
                   f" Peak memory: whole runs of {args.memory_steps} steps of batch {args.memory_batch_size} (plus "
                   f"{args.eval_size} examples scored before and after, and the adapter saved), each in a fresh process, "
                   f"{args.memory_repeats} times; " + ("the CUDA peak allocation (`torch.cuda.max_memory_allocated`)"
                                                       if cuda else "peak RSS (`os.wait4`)") + " is the measure."))
        report_targets(res, settings, steps, memory, cuda)
        if steps:
            report_steps(res, steps, device)
        if memory:
            report_memory(res, args, memory, cuda)
            report_stages(res, args, stages, cuda)
        if steps:
            report_rounds(res, steps)


if __name__ == "__main__":
    main()
