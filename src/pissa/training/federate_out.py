"""What ``pissa federate`` writes: a per-round checkpoint of each algorithm (``OUT.partial/ALGO/checkpoint/``:
the global factors and the history, written atomically), and when it is done ``ALGO/metrics.json``,
``ALGO/adapter/``, ``OUT/report.md`` and ``OUT/accuracy.png``."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from pissa.files.atomic import atomic_dir, atomic_write_text
from pissa.training.checkpoint import CHECKPOINT
from pissa.training.federate import Factors, FederateConfig, Privacy
from pissa.training.report import plot_losses

FACTORS = "factors.safetensors"
STATE = "state.json"


@dataclass
class History:
    """One algorithm's run so far: ``rounds`` holds per round ``{round, loss, accuracy, train_loss, refactored,
    product_error, orthonormality_error}`` (held-out loss and accuracy of the global model after the round)."""

    algorithm: str
    examples: list[int]
    """Each client's training examples n_k."""
    eval_before: dict[str, float] | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)
    privacy: dict[str, Any] | None = None
    """``{"delta", "epsilon" (the largest client's), "clients": [{sample_rate, noise, steps, epsilon}]}``; None: not private."""
    seconds: float = 0.0

    @property
    def done(self) -> int:
        """Rounds finished."""
        return len(self.rounds)

    @staticmethod
    def privacy_record(plan: Sequence[Privacy] | None, delta: float | None) -> dict[str, Any] | None:
        if plan is None:
            return None
        return {"delta": delta, "epsilon": max(p.epsilon for p in plan), "clients": [asdict(p) for p in plan]}


def save_round(folder: Path, factors: Factors, history: History) -> None:
    """Replace ``folder/checkpoint`` by the global factors and history after ``history.done`` rounds."""
    with atomic_dir(folder / CHECKPOINT) as tmp:
        save_file({k: v.contiguous() for k, v in factors.items()}, str(tmp / FACTORS))
        (tmp / STATE).write_text(json.dumps(asdict(history), indent=2))


def load_round(folder: Path) -> tuple[Factors, History] | None:
    """The checkpoint :func:`save_round` left in ``folder`` (None when there is none)."""
    ckpt = folder / CHECKPOINT
    if not (ckpt / STATE).is_file():
        return None
    return load_file(str(ckpt / FACTORS)), History(**json.loads((ckpt / STATE).read_text()))


def finish(folder: Path, cfg: FederateConfig, history: History) -> None:
    """Write ``folder/metrics.json`` (the adapter is saved before) and drop the checkpoint."""
    metrics = {"algorithm": history.algorithm, "init": cfg.init, "model": cfg.model, "data": cfg.data,
               "rank": cfg.adapter.rank, "lr": cfg.learning_rate, "clients": cfg.clients, "rounds": cfg.rounds,
               "local_steps": cfg.local_steps, "batch_size": cfg.batch_size, "dirichlet_alpha": cfg.dirichlet_alpha,
               "seed": cfg.seed, **asdict(history)}
    atomic_write_text(folder / "metrics.json", json.dumps(metrics, indent=2))
    shutil.rmtree(folder / CHECKPOINT, ignore_errors=True)


def read_metrics(folder: Path) -> History:
    """The history inside a finished algorithm's ``metrics.json``."""
    data = json.loads((folder / "metrics.json").read_text())
    return History(**{k: data[k] for k in ("algorithm", "examples", "eval_before", "rounds", "privacy", "seconds")})


def _num(x: float | None, fmt: str = ".4f") -> str:
    return "–" if x is None else format(x, fmt)


def worst(history: History, key: str) -> float | None:
    """The largest value of a round's check ``key`` (None where it does not apply)."""
    return max((r[key] for r in history.rounds if r[key] is not None), default=None)


def report(cfg: FederateConfig, results: Mapping[str, History]) -> str:
    """The markdown report: one row per algorithm, then the accuracy of every round."""
    split = "validation" if cfg.val_size else "test"
    private = next((h.privacy for h in results.values() if h.privacy), None)
    budget = (f"DP-SGD on every client, (epsilon, delta) = ({private['epsilon']:.2f}, {private['delta']:g}) for the "
              "client that spends most" if private else "not private")
    first = next(iter(results.values()))
    lines = [f"# pissa federate: {cfg.model} on {cfg.data}, " + " vs ".join(results), "",
             f"{cfg.clients} clients (examples {first.examples}, Dirichlet alpha {cfg.dirichlet_alpha}), {cfg.rounds} rounds "
             f"x {cfg.local_steps} local steps, batch {cfg.batch_size}, lr {cfg.learning_rate:g}, rank {cfg.adapter.rank}, "
             f"{cfg.init} init, seed {cfg.seed}; {budget}. Global model scored on {cfg.eval_size} {split} examples.", "",
             f"| algorithm | {split} accuracy before | after round {cfg.rounds} | best round | {split} loss after | "
             "max product error | max orthonormality error | time (s) |", "|---|---|---|---|---|---|---|---|"]
    for name, h in results.items():
        last = h.rounds[-1]
        best = max(h.rounds, key=lambda r: r["accuracy"])
        lines.append(f"| {name} | {_num((h.eval_before or {}).get('accuracy'), '.3f')} | {last['accuracy']:.3f} | "
                     f"{best['round']} ({best['accuracy']:.3f}) | {last['loss']:.4f} | "
                     f"{_num(worst(h, 'product_error'), '.1e')} | "
                     f"{_num(worst(h, 'orthonormality_error'), '.1e')} | {h.seconds:.0f} |")
    lines += ["", "Accuracy per round (round 0: the start):", "",
              "| round | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for i in range(cfg.rounds + 1):
        cells = [_num((h.eval_before or {}).get("accuracy") if i == 0 else h.rounds[i - 1]["accuracy"], ".3f")
                 for h in results.values()]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(cfg: FederateConfig, results: Mapping[str, History], path: Path) -> None:
    """Accuracy of the global model per round, one line per algorithm."""
    curves: dict[str, Sequence[Sequence[float]]] = {}
    for name, h in results.items():
        start = (h.eval_before or {}).get("accuracy", float("nan"))
        curves[name] = [[0, start]] + [[r["round"], r["accuracy"]] for r in h.rounds]
    plot_losses(curves, path, title=f"{cfg.model} on {cfg.data}, {cfg.clients} clients", xlabel="round",
                ylabel="accuracy of the global model", smooth=False)
