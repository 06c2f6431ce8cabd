"""DPO (Rafailov et al. 2023) in ``pissa finetune --objective dpo``, with the model at its initial factors as the
reference (:func:`pissa.reference`): no second copy of the model, and for PiSSA the exact base ``W_res + s B0 A0``.

For a pair (prompt x, chosen y+, rejected y-), with ``log pi(y|x)`` the summed log-probability of the answer's
tokens under the policy and ``log ref(y|x)`` under the reference::

    r(y)   = beta * (log pi(y|x) - log ref(y|x))          the implicit reward
    margin = r(y+) - r(y-)
    loss   = -log sigmoid(margin)                         (log 2 at the start, where pi = ref)

Reward accuracy is the fraction of pairs with ``margin > 0``. The reference log-probabilities are computed in the
same step, under ``torch.no_grad`` (one more forward, no backward), so a resumed run sees exactly what an
uninterrupted one does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pissa.adapter.named import reference
from pissa.data.batches import Batch, collate
from pissa.data.encoding import Encoded
from pissa.data.loss import completion_logits


@dataclass
class PairBatch:
    """B preference pairs as one right-padded batch of 2B rows: the chosen answers, then the rejected ones."""

    rows: Batch

    @property
    def input_ids(self) -> Tensor:
        return self.rows.input_ids

    @property
    def targets(self) -> int:
        """Loss terms: pairs."""
        return len(self.rows.labels) // 2

    @property
    def tokens(self) -> int:
        return self.rows.tokens


def pair_batch(chosen: Sequence[Encoded], rejected: Sequence[Encoded], pad_id: int,
               device: torch.device | None = None) -> PairBatch:
    """The pairs ``(chosen[i], rejected[i])`` as a :class:`PairBatch`."""
    return PairBatch(collate([*chosen, *rejected], pad_id, "causal-lm", device))


def sequence_logps(model: nn.Module, batch: Batch) -> Tensor:
    """``(B,)`` float32: each row's summed log-probability of its target (answer) tokens."""
    logits, targets = completion_logits(model, batch)
    token = -F.cross_entropy(logits, targets, reduction="none")
    rows = batch.target_mask[:, 1:].nonzero()[:, 0]  # row of each target, in completion_logits' row-major order
    return torch.zeros(batch.input_ids.shape[0], dtype=token.dtype, device=token.device).index_add(0, rows, token)


def dpo_terms(model: nn.Module, pairs: PairBatch, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per pair ``(B,)``: the DPO loss, the chosen and the rejected reward (see the module docstring); the loss is
    differentiable in the policy, the reference pass is not."""
    policy = sequence_logps(model, pairs.rows)
    with torch.no_grad(), reference(model):
        ref = sequence_logps(model, pairs.rows)
    rewards = beta * (policy - ref)
    chosen, rejected = rewards.chunk(2)
    return -F.logsigmoid(chosen - rejected), chosen.detach(), rejected.detach()


def dpo_loss_sum(model: nn.Module, pairs: PairBatch, beta: float) -> Tensor:
    """The summed DPO loss of the pairs (divide by the step's pairs for the mean)."""
    return dpo_terms(model, pairs, beta)[0].sum()


@torch.no_grad()
def evaluate_preference(model: nn.Module, chosen: Sequence[Encoded], rejected: Sequence[Encoded], pad_id: int,
                        beta: float, batch_size: int = 16) -> dict[str, float]:
    """Means over the pairs (eval mode): ``loss`` (DPO), ``accuracy`` (reward accuracy, margin > 0),
    ``reward_margin``, ``chosen_reward`` and ``rejected_reward``. Empty input: zeros."""
    was_training = model.training
    model.eval()
    sums = dict.fromkeys(("loss", "accuracy", "reward_margin", "chosen_reward", "rejected_reward"), 0.0)
    try:
        for i in range(0, len(chosen), batch_size):
            device = next(model.parameters()).device
            pairs = pair_batch(chosen[i : i + batch_size], rejected[i : i + batch_size], pad_id, device)
            loss, good, bad = dpo_terms(model, pairs, beta)
            margin = good - bad
            for key, value in (("loss", loss), ("accuracy", (margin > 0).float()), ("reward_margin", margin),
                               ("chosen_reward", good), ("rejected_reward", bad)):
                sums[key] += float(value.sum())
    finally:
        model.train(was_training)
    return {k: v / max(1, len(chosen)) for k, v in sums.items()}
