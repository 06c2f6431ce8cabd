"""What a run measured (``OUT/metrics.json``), as one dataclass."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pissa.adapter.attach import trainable_parameters
from pissa.runtime import distributed
from pissa.training.checkpoint import Progress
from pissa.training.config import RunConfig
from pissa.training.session import Session

Evaluation = dict[str, float]
"""``{"loss": float, "accuracy": float}`` on the held-out examples."""


@dataclass
class RunMetrics:
    """What a run measured: ``OUT/metrics.json`` (the keys of shared/design.md and the run's settings)."""

    method: str
    model: str
    data: str
    rank: int
    steps: int
    lr: float
    train_loss: list[list[float]]
    """``[step, mean loss]`` per optimizer step."""
    grad_norm: list[list[float]]
    """``[step, L2 norm of the whole gradient before clipping]`` per step."""
    start_check: dict[str, float] | None
    """The first batch's loss before and after attach (:func:`~pissa.training.session.start_check`); None when resumed."""
    eval_before: Evaluation
    eval_after: Evaluation
    trainable_params: int
    seconds: float
    """Wall time of the whole run, every session of it (load, evaluation, training)."""
    train_seconds: float
    kind: str
    device: str
    dtype: str
    gradient_checkpointing: bool
    processes: int
    fsdp: bool
    alpha: float | None
    batch_size: int
    grad_accum: int
    max_length: int
    schedule: str
    warmup: int
    seed: int
    train_examples: int
    eval_examples: int
    eval_split: str
    """What was scored: ``test``, ``validation`` (``val_size``) or ``eval_data``."""
    eval_kind: str
    accuracy_kind: str
    """``exact_match`` (generation), ``label`` (best candidate label), ``token`` (argmax token) or ``reward`` (DPO: chosen
    reward above the rejected one)."""
    tokens: int
    objective: str = "sft"
    """``sft`` or ``dpo`` (then ``eval_*`` add the reward margin and the mean chosen / rejected rewards)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def read(cls, path: Path) -> RunMetrics:
        """A ``metrics.json`` that a run wrote."""
        doc = json.loads(path.read_text())
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in names})

    @classmethod
    def of(cls, cfg: RunConfig, session: Session, progress: Progress, eval_after: Evaluation, sharded: bool) -> RunMetrics:
        """The metrics of a finished run."""
        assert progress.eval_before is not None
        labels = session.dataset.labels
        return cls(
            method=cfg.method, model=cfg.model, data=cfg.data, rank=cfg.adapter.rank, steps=cfg.steps, lr=cfg.learning_rate,
            train_loss=progress.train_loss, grad_norm=progress.grad_norm, start_check=session.start,
            eval_before=progress.eval_before, eval_after=eval_after, trainable_params=trainable_parameters(session.model),
            seconds=round(progress.seconds, 2), train_seconds=round(progress.train_seconds, 2), kind=session.kind,
            device=str(session.device), dtype=cfg.dtype, gradient_checkpointing=cfg.gradient_checkpointing,
            processes=distributed.world()[1], fsdp=sharded, alpha=cfg.adapter.alpha, batch_size=cfg.batch_size,
            grad_accum=cfg.grad_accum, max_length=cfg.max_length, schedule=cfg.schedule, warmup=cfg.warmup, seed=cfg.seed,
            train_examples=len(session.train), eval_examples=len(session.test),
            eval_split="validation" if cfg.val_size else "eval_data" if cfg.eval_data else "test",
            eval_kind=session.eval_kind,
            accuracy_kind="reward" if cfg.objective == "dpo" else "exact_match" if session.eval_kind == "generate"
            else "label" if labels is not None else "token",
            tokens=progress.tokens, objective=cfg.objective,
        )
