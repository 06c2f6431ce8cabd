"""Optimizers of whole weights: torch's AdamW, GaLore and DCT-AdamW (projected Adam moments), pure torch.

    opt = OptimizerConfig(optimizer="dct-adamw", proj_rank=64, proj_every=50)
    optimizer = build_optimizer(model, opt, lr=1e-4, weight_decay=0.0)
"""

from pissa.optim.build import build_optimizer, projected_weights, state_bytes
from pissa.optim.config import OPTIMIZERS, OptimizerConfig, OptimizerName
from pissa.optim.masters import move_grads
from pissa.optim.projected import ProjectedAdamW, dct_basis, select_columns, top_singular_vectors

__all__ = [
    "OPTIMIZERS",
    "OptimizerConfig",
    "OptimizerName",
    "ProjectedAdamW",
    "build_optimizer",
    "dct_basis",
    "move_grads",
    "projected_weights",
    "select_columns",
    "state_bytes",
    "top_singular_vectors",
]
