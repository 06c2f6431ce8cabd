"""The loss of a batch: the summed cross-entropy of its target (completion) tokens, computed on those positions only."""

from __future__ import annotations

import inspect

import torch.nn.functional as F
from torch import Tensor, nn

from pissa.data.batches import Batch
from pissa.runtime.hub import Kind


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes ``logits_to_keep`` (a PEFT wrapper passes it on to its base model)."""
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return True
    base = getattr(model, "get_base_model", None)
    return callable(base) and "logits_to_keep" in inspect.signature(base().forward).parameters


def completion_logits(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """Logits at the positions that predict completion tokens, and those tokens.

    Returns ``logits (N, V)`` in float32 and ``targets (N,)``, N = number of completion tokens
    in the batch, in row-major order. Position t - 1 predicts token t.
    """
    pred_mask = batch.target_mask[:, 1:]  # (B, T-1): position t predicts token t + 1
    keep = pred_mask.any(0).nonzero().squeeze(1)  # positions some row needs (1-D; widely supported)
    kwargs = {"logits_to_keep": keep} if accepts_logits_to_keep(model) else {}
    logits = model(**batch.inputs(), **kwargs).logits
    if not kwargs:
        logits = logits[:, keep]
    targets = batch.input_ids[:, 1:][:, keep]
    mask = pred_mask[:, keep]
    return logits[mask].float(), targets[mask]


def loss_sum(model: nn.Module, batch: Batch, kind: Kind) -> Tensor:
    """Sum of the per-target losses of a batch (divide by the step's total targets for the mean).

    Causal LM: summed negative log-likelihood of the completion tokens; seq-cls: summed
    cross-entropy of the labels. Summing lets gradient accumulation (and data parallel ranks)
    normalize by the token count of the whole step.
    """
    if kind == "seq-cls":
        logits = model(**batch.inputs()).logits
        return F.cross_entropy(logits.float(), batch.labels, reduction="sum")
    logits, targets = completion_logits(model, batch)
    return F.cross_entropy(logits, targets, reduction="sum")
