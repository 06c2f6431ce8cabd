"""Runs of the learning-rate sweeps, cached in a work folder so an interrupted benchmark resumes.

A sweep run is scored on a validation split carved from the training data
(``RunConfig.val_size``, :func:`pissa.data.datasets.load_data`): it trains on the training data minus
that split and evaluates on it, never reading the test split. The runs that report test metrics
(each method at its chosen rate) are ordinary runs (``val_size=0``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from pissa.data.datasets import VAL_SEED
from pissa.errors import PissaError
from pissa.options import build, flatten_doc
from pissa.training.config import RunConfig
from pissa.training.run import run

__all__ = ["VAL_SEED", "bracketed_sweep", "run_cached"]


def run_cached(cfg: RunConfig, workdir: Path, val_size: int | None = None) -> dict[str, Any]:
    """One ``pissa.training.run.run`` into ``workdir``, or its metrics when a finished run with the same
    config is there already.

    ``val_size``: train on the training data minus a validation split of that size and score it
    whole (``eval_before`` / ``eval_after`` are then validation metrics, ``eval_split`` says so);
    None: the ordinary run (test metrics on ``cfg.eval_size`` test examples).
    """
    if val_size is not None:
        cfg = dataclasses.replace(cfg, val_size=val_size, eval_size=val_size)
    record = json.loads(json.dumps({"config": cfg.to_dict()}))
    metrics_file, record_file = workdir / "metrics.json", workdir / "benchmark-run.json"
    if metrics_file.is_file() and record_file.is_file() and same_run(json.loads(record_file.read_text()), cfg):
        return json.loads(metrics_file.read_text())
    record_file.unlink(missing_ok=True)
    metrics = run(cfg, workdir, show=False).to_dict()
    assert metrics["eval_split"] == ("validation" if val_size else "test")
    record_file.write_text(json.dumps(record, indent=2))
    return metrics


def same_run(record: dict[str, Any], cfg: RunConfig) -> bool:
    """Whether a stored ``{"config": ...}`` record describes ``cfg``'s run. Options added to RunConfig after the record
    was written count at their defaults (a new option's default keeps the old behaviour), so adding one does not
    invalidate finished runs; a record naming an option that no longer exists never matches."""
    if not isinstance(record.get("config"), dict):
        return False
    try:
        stored = build(RunConfig, flatten_doc(record["config"]))
    except (PissaError, TypeError, ValueError):
        return False
    return json.loads(json.dumps(stored.to_dict())) == json.loads(json.dumps(cfg.to_dict()))


def bracketed_sweep(score, grid: list[float], factor: float, extend: int) -> tuple[dict[float, float], float]:
    """``{lr: score(lr)}`` over ``grid``, extended by ``factor`` past whichever edge holds the best score (at
    most ``extend`` times), and the best lr (lowest score)."""
    scores = {lr: score(lr) for lr in grid}
    for _ in range(extend):
        lrs = sorted(scores)
        best = min(scores, key=scores.__getitem__)
        if best == lrs[0]:
            nxt = lrs[0] / factor
        elif best == lrs[-1]:
            nxt = lrs[-1] * factor
        else:
            break
        scores[float(f"{nxt:.3g}")] = score(float(f"{nxt:.3g}"))
    return scores, min(scores, key=scores.__getitem__)
