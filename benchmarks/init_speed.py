"""Init speed and exactness: pissa.attach vs PEFT's PiSSA inits on SmolLM2-135M (all 210 projections).

Everything is imported and the model loaded before the first timed region; one untimed warm-up
round (each init on a single projection) runs first, so no lazy import or first-call setup is
timed. Each round adapts a fresh copy of the model with every init, in alternating order (pissa
first in even rounds, last in odd ones); the timed region is the init call alone
(``pissa.attach`` / ``get_peft_model``). The main table reports the median wall time of
``--repeats`` rounds and the residual error relative to optimal,
``||W - B A||_F / sqrt(sum_{i>r} S_i^2)`` per layer (1.0 = the exact rank-r SVD), mean and max
over layers and rounds (each round's inits are seeded with the round number). The paired table
reports, per comparison, the ratio of the two times taken in the same round: median, min, max,
and in how many rounds pissa was faster.

    .venv/bin/python benchmarks/init_speed.py                                   # rank 16, median of 3
    .venv/bin/python benchmarks/init_speed.py --rank 64 --no-full-svd --name init_speed_r64
    .venv/bin/python benchmarks/init_speed.py --repeats 7 --no-full-svd --name init_speed_7runs
    .venv/bin/python benchmarks/init_speed.py --repeats 1 --no-full-svd          # quick

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="alternated rounds")
    ap.add_argument("--no-full-svd", action="store_true", help="skip PEFT's full-SVD init (slow)")
    add_results_options(ap, "init_speed")
    args = ap.parse_args()

    with Results.from_args(args, "Init speed and exactness: pissa.attach vs PEFT's PiSSA inits") as res:
        base, _ = load_model(args.model)
        names = find_targets(base, "all-linear")
        opt = optimal_residuals(base, names, args.rank)
        labels = [PISSA, NITER4] + ([] if args.no_full_svd else [FULL])

        for label in labels:  # warm-up, untimed: first-call imports and setup of each code path
            timed_init(copy.deepcopy(base), args.rank, [names[0]], PEFT_INIT.get(label))

        times: dict[str, list[float]] = {k: [] for k in labels}
        errors: dict[str, list[float]] = {k: [] for k in labels}
        order_log = []
        for rnd in range(args.repeats):
            order = labels if rnd % 2 == 0 else labels[::-1]
            order_log.append(" -> ".join(order))
            for label in order:
                model = copy.deepcopy(base)
                torch.manual_seed(rnd)
                seconds, residuals = timed_init(model, args.rank, "all-linear", PEFT_INIT.get(label))
                times[label].append(seconds)
                errors[label] += residual_ratios(residuals, opt)
                print(f"round {rnd + 1}: {label}: {seconds:.2f} s", flush=True)
                del model, residuals

        ref = statistics.median(times[NITER4])
        res.add(f"Model {args.model}, rank {args.rank}, {len(names)} projections, torch threads "
                f"{torch.get_num_threads()}, median of {args.repeats} alternated runs.")
        rows = []
        for label in labels:
            t = statistics.median(times[label])
            e = errors[label]
            rows.append([label, f"{t:.2f}", f"{t / ref:.2f}x", f"{sum(e) / len(e):.6f}", f"{max(e):.6f}"])
        res.table(["init", "time (s)", "time vs PEFT pissa_niter_4", "mean residual / optimal", "max residual / optimal"], rows)
        res.add("Time: median over rounds of the init call alone (fresh model copy each time); time vs PEFT "
                "pissa_niter_4 is the ratio of the medians. Residual / optimal: mean and max over all layers "
                "of all rounds.")
        res.heading("Paired ratios (same round)")
        res.table(PAIRED_HEADER, [paired_row(f"{PISSA} / {other}", times[PISSA], times[other])
                                  for other in labels if other != PISSA])
        res.heading("Per-round times (s)")
        res.table(["round", "order", *labels],
                  [[str(i + 1), order_log[i], *(f"{times[k][i]:.2f}" for k in labels)] for i in range(args.repeats)])


if __name__ == "__main__":
    main()
