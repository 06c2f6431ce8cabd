"""The data order and the learning rate of a run: pure functions of (seed, step), so a resumed or a
data-parallel run sees exactly the batches and rates of an uninterrupted single run."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Protocol

import torch


class Schedule(Protocol):
    """What :func:`lr_at` reads of a run's config (a RunConfig, a PretrainConfig)."""

    @property
    def learning_rate(self) -> float: ...
    @property
    def warmup(self) -> int: ...
    @property
    def schedule(self) -> str: ...
    @property
    def steps(self) -> int: ...


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n, generator=g).tolist())


def step_indices(n: int, seed: int, step: int, count: int) -> list[int]:
    """Training-example indices of step ``step`` (``count`` = batch size x grad accumulation).

    The data is read as a stream of epochs, each a permutation of ``range(n)`` seeded by
    ``(seed, epoch)``; step s takes stream positions ``[s * count, (s + 1) * count)``.
    """
    positions = range(step * count, (step + 1) * count)
    return [_epoch_order(n, seed, p // n)[p % n] for p in positions]


def lr_at(step: int, cfg: Schedule) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up over ``warmup`` steps from
    ``lr / warmup``, then constant or cosine decay to 0 at ``steps``."""
    lr = cfg.learning_rate
    if step < cfg.warmup:
        return lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return lr
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))
