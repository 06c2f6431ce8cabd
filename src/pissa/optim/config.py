"""The optimizer options of a run that trains whole weights (``pissa finetune --method full``, ``pissa pretrain``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pissa.errors import PissaError

OptimizerName = Literal["adamw", "galore", "dct-adamw"]
OPTIMIZERS: tuple[str, ...] = ("adamw", "galore", "dct-adamw")


@dataclass
class OptimizerConfig:
    """Which optimizer trains the weights, and the projection of the projected ones."""

    optimizer: OptimizerName = "adamw"
    """adamw: torch's AdamW on every weight; galore: Adam moments in the span of the top proj-rank singular vectors of
    each 2-D gradient, recomputed every proj-every steps (GaLore); dct-adamw: in proj-rank columns of a fixed DCT
    basis chosen by their alignment with the gradient every proj-every steps (DCT-AdamW). Embeddings, heads and 1-D
    tensors always take AdamW; galore and dct-adamw only for --method full."""
    proj_rank: int = 128
    """r of the projection: a projected (m, n) weight keeps two (max(m, n), r) moments instead of two (m, n);
    a weight whose smaller side is <= r takes plain AdamW (nothing to save)."""
    proj_every: int = 200
    """Steps between two projections: GaLore's SVD interval T, DCT-AdamW's column re-selection interval."""
    proj_scale: float = 0.25
    """GaLore's scale alpha of the back-projected update (the paper's 0.25); DCT-AdamW has none."""

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise PissaError(f"`optimizer` must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        for name in ("proj_rank", "proj_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PissaError(f"`{name}` must be an integer >= 1, got {value!r}")
        if not (isinstance(self.proj_scale, (int, float)) and math.isfinite(self.proj_scale) and self.proj_scale > 0):
            raise PissaError(f"`proj_scale` must be a positive number, got {self.proj_scale!r}")
