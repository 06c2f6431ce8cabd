"""Preference rows (``prompt``, ``chosen``, ``rejected``: DPO's data, as TRL reads it) detected by their keys.

A row is one :class:`~pissa.data.formats.Example` whose ``completion`` is the chosen answer and whose ``rejected``
is the other one; ``pissa finetune --objective dpo`` trains on them (:mod:`pissa.training.preference`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pissa.errors import PissaError

COLUMNS = ("prompt", "chosen", "rejected")
"""The keys that mark a preference file (all three)."""


def is_preference(columns: Sequence[str]) -> bool:
    """Whether a file's columns make preference rows."""
    return set(COLUMNS) <= set(columns)


def preference_fields(rows: list[tuple[str, dict[str, Any]]], name: str,
                      column: Callable[..., list[str]]) -> list[tuple[str, str, str]]:
    """``(prompt, chosen, rejected)`` of every row (``column`` reads one validated column); a row whose two answers
    are the same is an error naming its line (it teaches nothing and its margin is 0 by construction)."""
    prompts = column(rows, "prompt", name, allow_blank=True)
    chosen, rejected = column(rows, "chosen", name), column(rows, "rejected", name)
    for (where, _), c, r in zip(rows, chosen, rejected):
        if c == r:
            raise PissaError(f"{where} of '{name}': 'chosen' and 'rejected' are the same text; a preference needs two answers")
    return list(zip(prompts, chosen, rejected))
