"""Init speed and exactness: pissa.attach vs PEFT's PiSSA inits on SmolLM2-135M (all 210 projections), at each rank.

Everything is imported and the model loaded before the first timed region; one untimed warm-up
round (each init on a single projection) runs first, so no lazy import or first-call setup is
timed. For each rank of ``--ranks``, each round adapts a fresh copy of the model with every init, in
alternating order (pissa first in odd rounds, last in even ones); the timed region is the init call
alone (``pissa.attach`` / ``get_peft_model``), as wall time and as the process's CPU time. PEFT's
``pissa_niter_4`` is ``torch.svd_lowrank(W, q=r, niter=4)`` per layer: float32 subspace iteration,
ten passes of width r over each weight. Per rank the file gives:

- the main table: median wall time over rounds, its ratio to PEFT pissa_niter_4's median, and the
  residual error relative to optimal, ``||W - B A||_F / sqrt(sum_{i>r} S_i^2)`` per layer (1.0 = the
  exact rank-r SVD), mean and max over layers and rounds (round i's inits are seeded with i);
- the paired ratios: per comparison, the ratio of the two times taken in the same round (wall and
  CPU): median, min, max, and in how many rounds pissa was faster;
- every round's times and order;
- with ``--profile``, where the time goes: one more init of each kind under ``torch.profiler``, its
  operators by self CPU time (the profiler's own overhead included, so shares, not absolute times).

    .venv/bin/python benchmarks/init_speed.py                        # ranks 16 and 64, 5 rounds each
    .venv/bin/python benchmarks/init_speed.py --ranks 16 --repeats 1 # quick
    .venv/bin/python benchmarks/init_speed.py --full-svd             # also PEFT's full SVD (slow: ~1 min a round)
    .venv/bin/python benchmarks/init_speed.py --profile              # and a profile of each init per rank

Writes ``bench_out/NAME.md`` (``--update-results``: ``benchmarks/results/NAME.md``).
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

from _common import optimal_residuals, residual_ratios, timed_init
from _results import PAIRED_HEADER, Results, add_results_options, paired_row
from pissa.adapter.targets import find_targets
from pissa.runtime.hub import load_model

PISSA = "pissa.attach (block Krylov, default)"
NITER4 = "PEFT pissa_niter_4"
FULL = "PEFT pissa (full SVD)"
PEFT_INIT = {NITER4: "pissa_niter_4", FULL: "pissa"}


def ranks(text: str) -> list[int]:
    """``"16,64"`` -> ``[16, 64]``."""
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ranks takes comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"--ranks takes integers >= 1, got {text!r}")
    return out


PROFILE_ROWS = 12
"""Operators listed per profiled init."""


def profile_rows(base: torch.nn.Module, rank: int, label: str) -> list[list[str]]:
    """The top :data:`PROFILE_ROWS` operators of one init of ``label`` by self CPU time: name, calls, seconds, share."""
    from torch.profiler import profile

    model = copy.deepcopy(base)
    with profile() as prof:
        timed_init(model, rank, "all-linear", PEFT_INIT.get(label))
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [[e.key, str(e.count), f"{e.self_cpu_time_total / 1e6:.3f}", f"{e.self_cpu_time_total / total:.1%}"]
            for e in events[:PROFILE_ROWS]] + [["(all operators)", "", f"{total / 1e6:.3f}", "100.0%"]]


def run_rank(res: Results, model_name: str, base: torch.nn.Module, names: list[str], rank: int, labels: list[str],
             repeats: int, profiled: bool = False) -> None:
    """All rounds at one rank, and its section of the results file."""
    opt = optimal_residuals(base, names, rank)
    for label in labels:  # warm-up, untimed: first-call imports and setup of each code path
        timed_init(copy.deepcopy(base), rank, [names[0]], PEFT_INIT.get(label))
    wall: dict[str, list[float]] = {k: [] for k in labels}
    cpu: dict[str, list[float]] = {k: [] for k in labels}
    errors: dict[str, list[float]] = {k: [] for k in labels}
    order_log = []
    for rnd in range(repeats):
        order = labels if rnd % 2 == 0 else labels[::-1]
        order_log.append(" -> ".join(order))
        for label in order:
            model = copy.deepcopy(base)
            torch.manual_seed(rnd)
            seconds, residuals = timed_init(model, rank, "all-linear", PEFT_INIT.get(label), cpu=cpu[label])
            wall[label].append(seconds)
            errors[label] += residual_ratios(residuals, opt)
            print(f"rank {rank}, round {rnd + 1}: {label}: {seconds:.2f} s (cpu {cpu[label][-1]:.2f} s)", flush=True)
            del model, residuals

    res.heading(f"Rank {rank}")
    res.add(f"Model {model_name}, rank {rank}, {len(names)} projections, torch threads {torch.get_num_threads()}, "
            f"median of {repeats} alternated runs.")
    ref = statistics.median(wall[NITER4])
    rows = []
    for label in labels:
        t, e = statistics.median(wall[label]), errors[label]
        rows.append([label, f"{t:.2f}", f"{t / ref:.2f}x", f"{sum(e) / len(e):.6f}", f"{max(e):.6f}"])
    res.table(["init", "time (s)", "time vs PEFT pissa_niter_4", "mean residual / optimal", "max residual / optimal"], rows)
    res.add("Time: median over rounds of the init call alone (fresh model copy each time); time vs PEFT "
            "pissa_niter_4 is the ratio of the medians. Residual / optimal: mean and max over all layers "
            "of all rounds.")
    res.heading(f"Paired ratios at rank {rank} (same round)", level=3)
    res.table(PAIRED_HEADER, [paired_row(f"{PISSA} / {other}{kind}", times[PISSA], times[other])
                              for kind, times in ((" (wall)", wall), (" (CPU)", cpu))
                              for other in labels if other != PISSA])
    res.heading(f"Per-round times at rank {rank} (s, wall / CPU)", level=3)
    res.table(["round", "order", *labels],
              [[str(i + 1), order_log[i], *(f"{wall[k][i]:.2f} / {cpu[k][i]:.2f}" for k in labels)]
               for i in range(repeats)])
    if profiled:
        for label in labels[:2]:
            res.heading(f"Where the time goes at rank {rank}: {label}", level=3)
            res.table(["operator", "calls", "self CPU (s)", "share"], profile_rows(base, rank, label), align="lrrr")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--ranks", type=ranks, default=[16, 64], help="comma-separated ranks, one section each")
    ap.add_argument("--repeats", type=int, default=5, help="alternated rounds per rank")
    ap.add_argument("--full-svd", action="store_true", help="also time PEFT's full-SVD init (slow)")
    ap.add_argument("--profile", action="store_true", help="profile one init of pissa and of pissa_niter_4 per rank")
    add_results_options(ap, "init_speed")
    args = ap.parse_args()

    with Results.from_args(args, "Init speed and exactness: pissa.attach vs PEFT's PiSSA inits") as res:
        base, _ = load_model(args.model)
        names = find_targets(base, "all-linear")
        labels = [PISSA, NITER4] + ([FULL] if args.full_svd else [])
        for rank in args.ranks:
            run_rank(res, args.model, base, names, rank, labels, args.repeats, args.profile)


if __name__ == "__main__":
    main()
