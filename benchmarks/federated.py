"""Federated fine-tuning on the embedded task: FedSVD vs FFA-LoRA vs FedAvg-LoRA, non-private and with DP-SGD,
side by side in one run (SmolLM2-135M-Instruct, Rotten Tomatoes, Dirichlet non-IID clients) through
``pissa.training.flower.federate``, the code of ``pissa federate``: the same ServerApp strategy and ClientApp
train function, served by :class:`~pissa.training.flower.InProcessGrid` (clients one after another in this
process) instead of the Ray simulation, whose worker processes each load the model again (too slow for the
CPU budget of this benchmark). The results do not depend on the runtime: a round is a pure function of the global
factors, the seed and the round (tests/unit/integrations/test_flower.py).

Each algorithm's learning rate is chosen on a validation split carved from the training data (the non-private
runs of a small grid: the best validation accuracy after the last round, ties to the lower loss); then every
algorithm runs once more at its rate, scored on a fixed subset of the test split, without and with DP-SGD (the
private runs keep the non-private rate: a second sweep under noise does not fit the CPU budget). Reported: the
test accuracy of the global model after every round, the final loss, the epsilon each client spent at delta, and
the server step's checks (FedSVD's product and orthonormality errors). Ratios against FedSVD (the anchor).

    OMP_NUM_THREADS=1 python benchmarks/federated.py --update-results --work DIR   # over an hour; a rerun resumes in DIR
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from _results import Results, add_results_options
from pissa.adapter.config import AdapterConfig
from pissa.training.federate import FederateConfig
from pissa.training.flower import InProcessGrid, federate

ANCHOR = "fedsvd"


def run(cfg: FederateConfig, out: Path) -> dict[str, dict[str, Any]]:
    """One ``federate`` run (every algorithm of ``cfg``) into ``out`` (kept: a rerun with the same ``--work`` reuses
    it, or resumes it); each algorithm's metrics.json, by name."""
    if not (out / "report.md").is_file():  # a run a killed benchmark left in out.partial continues at its next round
        federate(cfg, out, resume=out.with_name(out.name + ".partial").is_dir(), grid=InProcessGrid(cfg.clients))
    return {a: json.loads((out / a / "metrics.json").read_text()) for a in cfg.algorithms}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha of the client split")
    p.add_argument("--eval-size", type=int, default=64)
    p.add_argument("--val-size", type=int, default=64)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    p.add_argument("--target-epsilon", type=float, default=8.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=None, help="cache of finished runs (default: a temporary folder)")
    add_results_options(p, "federated")
    args = p.parse_args()
    algorithms = ["fedsvd", "ffa-lora", "fedavg-lora"]
    common: dict[str, Any] = dict(algorithms=algorithms, clients=args.clients, rounds=args.rounds,
                                  local_steps=args.local_steps, batch_size=args.batch_size, dirichlet_alpha=args.alpha,
                                  eval_size=args.eval_size, max_length=args.max_length, device="cpu", threads=args.threads,
                                  adapter=AdapterConfig(rank=args.rank))
    title = "Federated fine-tuning: FedSVD vs FFA-LoRA vs FedAvg-LoRA, non-private and DP-SGD"
    with Results.from_args(args, title) as res, tempfile.TemporaryDirectory(prefix="federated-") as tmp:
        work = args.work or Path(tmp)
        sweep: dict[float, dict[str, dict[str, Any]]] = {}
        for lr in args.lrs:
            cfg = FederateConfig(lr=lr, val_size=args.val_size, **common)
            sweep[lr] = run(cfg, work / f"val-{lr:g}")
            print("validation", lr, {a: m["rounds"][-1]["accuracy"] for a, m in sweep[lr].items()}, flush=True)

        def final(m: dict[str, Any]) -> tuple[float, float]:
            return m["rounds"][-1]["accuracy"], -m["rounds"][-1]["loss"]

        chosen = {a: max(args.lrs, key=lambda lr, a=a: final(sweep[lr][a])) for a in algorithms}
        tests: dict[str, dict[str, dict[str, Any]]] = {"non-private": {}, "DP-SGD": {}}
        for lr in sorted(set(chosen.values())):
            group = [a for a in algorithms if chosen[a] == lr]
            for kind, extra in (("non-private", {}), ("DP-SGD", {"target_epsilon": args.target_epsilon, "delta": args.delta})):
                cfg = FederateConfig(lr=lr, **{**common, "algorithms": group}, **extra)
                tests[kind].update(run(cfg, work / f"test-{kind}-{lr:g}"))
                print("test", kind, lr, {a: tests[kind][a]["rounds"][-1]["accuracy"] for a in group}, flush=True)
        first = tests["non-private"][ANCHOR]
        private = tests["DP-SGD"][ANCHOR]["privacy"]
        res.add(f"SmolLM2-135M-Instruct (LoRA init, rank {args.rank}, every linear layer) on Rotten Tomatoes, "
                f"{args.clients} clients from a Dirichlet split over the labels (alpha {args.alpha}; examples per client "
                f"{first['examples']}), {args.rounds} rounds x {args.local_steps} local AdamW steps of batch {args.batch_size} "
                f"(max length {args.max_length}; a fresh optimizer per round, constant lr), every client every round; "
                f"float32 on the CPU, {args.threads} thread, the clients one after another in one process "
                f"(InProcessGrid), seed 0; the same split, start and batches for every algorithm. "
                f"Accuracy: the global model's best-label accuracy on the first {args.eval_size} test reviews. "
                f"FedSVD re-factorises B A after every round (--refactor-every 1, no warm-up).")
        res.add(f"DP-SGD: Opacus, Poisson sampling q = batch / n_k per client, per-example clipping at 1.0, "
                f"{args.rounds * args.local_steps} steps per client; noise chosen per client for epsilon "
                f"<= {args.target_epsilon:g} at delta = {args.delta:g}. Spent (Opacus RDP accountant): "
                + ", ".join(f"client {k}: q {c['sample_rate']:.4f}, noise {c['noise']:.3f}, epsilon {c['epsilon']:.2f}"
                            for k, c in enumerate(private["clients"])) + ".")
        for kind, results in tests.items():
            res.heading(f"Test accuracy per round, {kind}")
            head = ["algorithm", "lr", "round 0", *(f"round {r}" for r in range(1, args.rounds + 1)), "test loss after",
                    f"accuracy vs {ANCHOR}", "max product error", "max orthonormality error"]
            anchor = results[ANCHOR]["rounds"][-1]["accuracy"]
            rows = []
            for a in algorithms:
                m = results[a]
                checks = [max((r[k] for r in m["rounds"] if r[k] is not None), default=None)
                          for k in ("product_error", "orthonormality_error")]
                rows.append([a, f"{chosen[a]:g}", f"{m['eval_before']['accuracy']:.3f}",
                             *(f"{r['accuracy']:.3f}" for r in m["rounds"]), f"{m['rounds'][-1]['loss']:.4f}",
                             f"{m['rounds'][-1]['accuracy'] / anchor:.3f}",
                             *("–" if c is None else f"{c:.1e}" for c in checks)])
            res.table(head, rows)
        res.heading("Learning-rate sweep (validation accuracy after the last round, non-private; chosen in bold)")
        res.add(f"Validation: {args.val_size} reviews carved from the training data (the clients split the rest).")
        res.table(["algorithm", *(f"lr {lr:g}" for lr in args.lrs)],
                  [[a, *((f"**{sweep[lr][a]['rounds'][-1]['accuracy']:.3f}**" if lr == chosen[a] else
                          f"{sweep[lr][a]['rounds'][-1]['accuracy']:.3f}") for lr in args.lrs)] for a in algorithms])


if __name__ == "__main__":
    main()
