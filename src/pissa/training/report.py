"""Loss plots and the ``pissa compare`` report."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from pissa.files.atomic import atomic_file
from pissa.training.metrics import RunMetrics

REPORT_STEPS = (10, 50)
"""Steps whose training loss the compare report lists (plus the last step)."""

WINDOW = 5
"""Losses in reports and smoothed curves are means over this many steps (one step's batch is noisy)."""


def window_mean(curve: Sequence[Sequence[float]], step: float, window: int = WINDOW) -> float | None:
    """Mean training loss over the ``window`` steps ending at ``step`` (None if ``step`` was not reached)."""
    values = [loss for s, loss in curve if step - window < s <= step]
    return sum(values) / len(values) if values and any(s == step for s, _ in curve) else None


def plot_losses(curves: dict[str, Sequence[Sequence[float]]], path: str | os.PathLike, title: str = "", *,
                xlabel: str = "step", ylabel: str = "training loss (completion tokens)", smooth: bool = True) -> Path:
    """One PNG with every curve ``{name: [[step, loss], ...]}``: raw losses faint, a moving average solid
    (``smooth`` False: each curve as it is, with markers, e.g. one point per federated round)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for i, (name, curve) in enumerate(curves.items()):
        if not curve:
            continue
        color = f"C{i}"
        steps = [s for s, _ in curve]
        if not smooth:
            ax.plot(steps, [v for _, v in curve], color=color, marker="o", linewidth=1.8, label=name)
            continue
        ax.plot(steps, [loss for _, loss in curve], color=color, alpha=0.25, linewidth=0.8)
        means = (window_mean(curve, s) for s in steps)
        averaged = [math.nan if m is None else m for m in means]  # never None here (every step is in the curve)
        ax.plot(steps, averaged, color=color, linewidth=1.8, label=f"{name} (mean of {WINDOW} steps)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if any(curves.values()):
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)
    return path


def _num(x: float | None, fmt: str = ".4f") -> str:
    return "–" if x is None else format(x, fmt)


def write_report(results: Mapping[str, RunMetrics]) -> str:
    """The compare report (markdown): one row per method from its metrics.json."""
    first = next(iter(results.values()))
    steps = [s for s in REPORT_STEPS if s < first.steps]
    head = ["method", "lr", "trainable params", *(f"loss@{s}" for s in steps), f"loss@{first.steps} (end)",
            "test loss before", "test loss after", "accuracy before", "accuracy after", "time (s)"]
    lines = [
        f"# {first.model} on {first.data}: " + " vs ".join(results),
        "",
        f"Rank {first.rank}, {first.steps} steps, batch {first.batch_size} x {first.grad_accum}, "
        f"{first.schedule} schedule, seed {first.seed}, same data order for every method. "
        f"Training losses are means over the {WINDOW} steps ending at the step shown; test metrics on "
        f"{first.eval_examples} held-out examples ({first.accuracy_kind} accuracy).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, r in results.items():
        curve = r.train_loss
        row = [name, f"{r.lr:g}", f"{r.trainable_params:,}",
               *(_num(window_mean(curve, s)) for s in steps), _num(window_mean(curve, r.steps)),
               _num(r.eval_before["loss"]), _num(r.eval_after["loss"]),
               _num(r.eval_before["accuracy"], ".3f"), _num(r.eval_after["accuracy"], ".3f"), f"{r.seconds:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
