"""Per-rank peak memory of ``pissa finetune --nproc N --fsdp``: the streamed route (no rank holds the whole model)
against the route that loads the whole model in every process and then shards it, and against one process.

Three whole runs of the same fine-tuning (embedded SmolLM2-135M-Instruct, Rotten Tomatoes, PiSSA, float32),
each repeated ``--repeats`` times in fresh processes:

- ``single``: ``pissa finetune`` in one process;
- ``fsdp streamed``: ``--nproc N --fsdp`` as shipped: the checkpoint is decomposed streamed (the ``pissa init``
  route, the ranks splitting the targets) and each rank loads only its shard (:mod:`pissa.training.streamed`);
- ``fsdp whole-load``: the same with the streamed route switched off in the workers (every rank loads the
  whole model, attaches, then shards: what ``--fsdp`` did before).

Every process records its own peak RSS (``VmHWM``) at exit and its RSS when the run starts preparing the model
(after Python, torch, transformers and gloo are up: the runtime every process pays whatever the model, the
runtime below). Target (issue 21): a rank's peak above its runtime <= 1/N of the single run's plus a stated overhead,
``(rank peak - rank start) <= (single peak - single start) / N + overhead``, the overhead being what a rank holds
that does not divide by N, each part measured in the run: the root unit all-gathered (the embedding tied with lm_head),
two decoder blocks all-gathered (the running one and the prefetched one), and the fixed part of a process (its RSS after
preparing minus its start and its model tensors), which a rank pays whole where one process pays it once.

    OMP_NUM_THREADS=1 python benchmarks/fsdp_memory.py --update-results    # about 15 minutes on this machine
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from _results import Results, add_results_options

WORKER = textwrap.dedent("""
    import atexit, json, os, sys
    from pathlib import Path
    out, route, argv = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    def status(key):
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
    marks = {}
    def record():
        marks["peak"] = status("VmHWM")
        (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(marks))
    atexit.register(record)
    def nbytes(tensors):  # this process's bytes of ``tensors`` (a DTensor: its local shard)
        return sum(getattr(t, "_local_tensor", t).untyped_storage().nbytes() for t in tensors)
    def whole(module):  # bytes of a module's own parameters, unsharded
        return sum(p.numel() * p.element_size() for p in module.parameters())
    from pissa.cli import main
    from pissa.training import session
    real_prepare = session.prepare
    def prepare(*args, **kwargs):
        marks.setdefault("start", status("VmRSS"))
        prepared = real_prepare(*args, **kwargs)
        model = prepared.model
        marks["prepared"] = status("VmRSS")
        marks["model"] = nbytes({id(t): t for t in [*model.parameters(), *model.buffers()]}.values())
        kinds = set(getattr(model, "_no_split_modules", None) or ())
        kinds |= {"FSDP" + k for k in kinds}  # fully_shard renames a unit's class
        blocks = [m for m in model.modules() if type(m).__name__ in kinds]
        marks["block"] = max(whole(b) for b in blocks)
        marks["root"] = whole(model) - sum(whole(b) for b in blocks)
        return prepared
    session.prepare = prepare
    from pissa.training import run
    run.prepare = prepare
    if route == "whole-load":
        session.streams = lambda *args, **kwargs: False
    code = main(argv)
    sys.exit(code)
""")

RUNS = ("single", "fsdp streamed", "fsdp whole-load")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    add_results_options(p, "fsdp_memory")
    return p.parse_args()


def one_run(run: str, args: argparse.Namespace, tmp: Path, rep: int) -> list[dict[str, int]]:
    """The marks of every process of one whole run (one per rank)."""
    folder = tmp / f"{rep}-{run.replace(' ', '-')}"
    marks = folder / "marks"
    marks.mkdir(parents=True)
    worker = tmp / "worker.py"
    worker.write_text(WORKER)
    finetune = ["finetune", "--model", args.model, "--method", "pissa", "--rank", str(args.rank), "--steps", str(args.steps),
                "--batch-size", str(args.batch_size), "--eval-size", str(args.eval_size), "--threads", "1",
                "--save-every", "0", "--out", str(folder / "out")]
    route = run.split()[-1]
    if run == "single":
        cmd = [sys.executable, str(worker), str(marks), route, *finetune]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               str(worker), str(marks), route, *finetune, "--fsdp"]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{run} failed: {done.stderr[-2000:]}")
    found = [json.loads(p.read_text()) for p in sorted(marks.glob("rank*.json"))]
    expected = 1 if run == "single" else args.nproc
    if len(found) != expected:
        raise RuntimeError(f"{run}: {len(found)} processes reported, expected {expected}")
    print(f"repeat {rep + 1}, {run}: " + ", ".join(f"peak {m['peak'] / 2**20:.0f} MiB (start {m['start'] / 2**20:.0f})"
                                                  for m in found), file=sys.stderr, flush=True)
    return found


def main() -> None:
    args = parse_args()
    title = f"FSDP per-rank peak memory: {args.nproc} processes, streamed vs whole-load, against one process"
    with Results.from_args(args, title) as res, tempfile.TemporaryDirectory(prefix="fsdp-memory-") as tmp:
        results: dict[str, list[list[dict[str, int]]]] = {run: [] for run in RUNS}
        for rep in range(args.repeats):
            for run in RUNS[rep % len(RUNS):] + RUNS[: rep % len(RUNS)]:
                results[run].append(one_run(run, args, Path(tmp), rep))
        mib = lambda x: f"{x / 2**20:.0f}"
        med = lambda xs: statistics.median(xs)
        single_peak = med([r[0]["peak"] for r in results["single"]])
        single_model = med([r[0]["peak"] - r[0]["start"] for r in results["single"]])
        res.add(f"{args.model}, PiSSA rank {args.rank} on every projection, float32, {args.steps} steps of batch "
                f"{args.batch_size}, {args.eval_size} test examples scored before and after, one thread per process, "
                f"{args.repeats} repeats of each run in fresh processes (rotating order). Peak: the process's VmHWM at "
                "exit; start: its RSS when the run begins preparing the model (the runtime every process pays).")
        rows = []
        fixed = lambda m: m["prepared"] - m["start"] - m["model"]
        for run in RUNS:
            procs = [p for r in results[run] for p in r]
            model = [p["peak"] - p["start"] for p in procs]
            worst = max(model)
            rows.append([run, str(len(results[run][0])),
                         f"{mib(med([p['peak'] for p in procs]))} ({mib(min(p['peak'] for p in procs))}-"
                         f"{mib(max(p['peak'] for p in procs))})", mib(med([p["start"] for p in procs])),
                         mib(med([p["model"] for p in procs])), mib(med([fixed(p) for p in procs])),
                         f"{mib(med(model))} (max {mib(worst)})", f"{worst / single_model:.3f}",
                         f"{med([p['peak'] for p in procs]) / single_peak:.3f}"])
        res.heading("Peak RSS per process (MiB)")
        res.add("model: the bytes of the process's model tensors after preparing (a rank: its shards, and the buffers "
                "every rank holds); fixed: its RSS after preparing minus its start and its model tensors (libraries "
                "loaded after the start, the tokenizer, the encoded data, freed memory the heap keeps).")
        res.table(["run", "processes", "peak, median (min-max)", "start (runtime)", "model tensors", "fixed",
                   "peak - start, median", "worst (peak - start) / single's", "peak / single's peak"], rows)
        ranks = [p for r in results["fsdp streamed"] for p in r]
        streamed = max(p["peak"] - p["start"] for p in ranks)
        bound = single_model / args.nproc
        root, block = ranks[0]["root"], ranks[0]["block"]
        fixed_rank, fixed_single = max(fixed(p) for p in ranks), med([fixed(r[0]) for r in results["single"]])
        overhead = root + 2 * block + max(0.0, fixed_rank - fixed_single / args.nproc)
        res.heading("Target")
        res.add(f"A rank's peak above its runtime: {mib(streamed)} MiB at worst (streamed) against 1/{args.nproc} of the "
                f"single run's {mib(single_model)} MiB = {mib(bound)} MiB ({streamed / single_model:.3f} of the single "
                f"run instead of {1 / args.nproc:.3f}): "
                + ("within 1/N." if streamed <= bound else f"{mib(streamed - bound)} MiB above 1/N."))
        res.add(f"Stated overhead, what a rank holds that does not divide by N: {mib(overhead)} MiB = the root unit "
                f"({mib(root)} MiB: the embedding, tied with lm_head, and the final norm, all-gathered on every rank from "
                f"the start of each forward to the end of its backward: a weight used at both ends of the model cannot "
                f"be a unit of its own) + the running and the prefetched decoder block all-gathered (2 x {mib(block)} "
                f"MiB) + the fixed part a rank pays whole where one process pays it once ({mib(fixed_rank)} MiB at "
                f"worst on a rank - {mib(fixed_single)}/{args.nproc} MiB). Target {mib(bound)} + {mib(overhead)} = "
                f"{mib(bound + overhead)} MiB: "
                + ("**met**" if streamed <= bound + overhead else
                   f"**not met**, by {mib(streamed - bound - overhead)} MiB") + ".")


if __name__ == "__main__":
    main()
