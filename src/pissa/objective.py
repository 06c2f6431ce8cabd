"""What fine-tuning optimizes and measures: token encoding, batches, losses, evaluation.

Two kinds of model:

- ``causal-lm``: an example is ``prompt + completion`` tokens; the loss is the mean negative
  log-likelihood of the completion tokens only (prompt and padding are masked). For labelled
  data, accuracy picks, for each example, the label whose completion has the highest total
  log-likelihood given the prompt; for free text it is the fraction of completion tokens that
  are the model's argmax prediction (teacher forcing).
- ``seq-cls``: an encoder with a classification head reads the prompt; the loss is the
  cross-entropy over the labels and accuracy is the argmax's.

Logits are computed only at the positions that predict a completion token (``logits_to_keep``
when the model accepts it): a 49k-token vocabulary head on every position would cost ~20% of
a SmolLM2 step for nothing.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import Example
from .devices import model_device
from .errors import PissaError

Kind = Literal["causal-lm", "seq-cls"]


@dataclass(frozen=True)
class Encoded:
    """One tokenized example: ``ids`` = prompt tokens then completion tokens (causal LM) or the
    text tokens (seq-cls); ``n_prompt`` tokens are context only; ``label`` indexes ``labels``."""

    ids: tuple[int, ...]
    n_prompt: int
    label: int | None


@dataclass
class Batch:
    """Right-padded tensors of a list of :class:`Encoded`.

    ``input_ids``/``attention_mask``: (B, T). ``target_mask`` (B, T): True where token t is a
    completion token (predicted from position t - 1). ``labels`` (B,): label indices or -1.
    """

    input_ids: Tensor
    attention_mask: Tensor
    target_mask: Tensor
    labels: Tensor

    def to(self, device: torch.device) -> Batch:
        """The same batch on ``device``."""
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.target_mask, self.labels)))

    @property
    def tokens(self) -> int:
        """Non-padding tokens (for throughput)."""
        return int(self.attention_mask.sum())

    @property
    def targets(self) -> int:
        """Number of loss terms: completion tokens (causal LM) or examples (seq-cls)."""
        return int(self.target_mask.sum()) if bool(self.target_mask.any()) else len(self.labels)


def _ids(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    """Token ids of many texts in one call (fast tokenizers batch it in Rust)."""
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=special)["input_ids"]]


def encode_all(
    tokenizer, examples: Sequence[Example], labels: Sequence[str] | None, kind: Kind, max_length: int
) -> list[Encoded]:
    """Tokenize examples, each at most ``max_length`` tokens.

    Causal LM: ``tokenizer(prompt)`` (with the tokenizer's special tokens) followed by
    ``tokenizer(completion)`` (none), plus the eos token for free text so the model learns to
    stop. Too long: the prompt loses tokens from its start (its end, next to the completion,
    is what matters), then the completion from its end. Seq-cls: the prompt, truncated at its end.
    """
    if not examples:
        return []
    label_of = [labels.index(e.completion) if labels is not None else None for e in examples]
    prompts = [e.prompt for e in examples]
    if kind == "seq-cls":
        encoded = tokenizer(prompts, truncation=True, max_length=max_length)["input_ids"]
        return [Encoded(tuple(ids), len(ids), label) for ids, label in zip(encoded, label_of)]
    unique = sorted({e.completion for e in examples})
    completion_ids = dict(zip(unique, _ids(tokenizer, unique, False)))
    eos = [tokenizer.eos_token_id] if labels is None and tokenizer.eos_token_id is not None else []
    out = []
    for e, prompt, label in zip(examples, _ids(tokenizer, prompts, True), label_of):
        completion = (completion_ids[e.completion] + eos)[: max_length - 1]
        prompt = prompt[max(0, len(prompt) - (max_length - len(completion))) :]
        if not prompt or not completion:
            raise PissaError("an example encodes to an empty prompt or completion; check the data or raise --max-length")
        out.append(Encoded(tuple(prompt + completion), len(prompt), label))
    return out


def encode(tokenizer, example: Example, labels: Sequence[str] | None, kind: Kind, max_length: int) -> Encoded:
    """One example (see :func:`encode_all`)."""
    return encode_all(tokenizer, [example], labels, kind, max_length)[0]


def collate(items: Sequence[Encoded], pad_id: int, kind: Kind, device: torch.device | None = None) -> Batch:
    """Right-pad ``items`` to their longest length (see :class:`Batch`), on ``device`` (default: the CPU)."""
    T = max(len(e.ids) for e in items)
    ids = torch.full((len(items), T), pad_id, dtype=torch.long)
    attn = torch.zeros(len(items), T, dtype=torch.long)
    target = torch.zeros(len(items), T, dtype=torch.bool)
    for i, e in enumerate(items):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        attn[i, : len(e.ids)] = 1
        if kind == "causal-lm":
            target[i, e.n_prompt : len(e.ids)] = True
    labels = torch.tensor([-1 if e.label is None else e.label for e in items])
    batch = Batch(ids, attn, target, labels)
    return batch if device is None or device.type == "cpu" else batch.to(device)


def _accepts_logits_to_keep(model: nn.Module) -> bool:
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
    kwargs = {"logits_to_keep": keep} if _accepts_logits_to_keep(model) else {}
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kwargs).logits
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
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return F.cross_entropy(logits.float(), batch.labels, reduction="sum")
    logits, targets = completion_logits(model, batch)
    return F.cross_entropy(logits, targets, reduction="sum")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    items: Sequence[Encoded],
    labels: Sequence[str] | None,
    label_ids: Sequence[Sequence[int]] | None,
    kind: Kind,
    pad_id: int,
    batch_size: int = 16,
) -> dict[str, float]:
    """``{"loss": mean per-target loss, "accuracy": fraction correct}`` on ``items`` (eval mode).

    ``label_ids``: the completion tokens of each label (causal LM with labels). When every label
    is one distinct token, one forward pass per example scores all labels at once; otherwise
    each (example, label) pair is scored as its own sequence. Examples are batched by length.
    """
    items = sorted(items, key=lambda e: len(e.ids))  # similar lengths together: little padding
    was_training = model.training
    model.eval()
    try:
        if kind == "seq-cls":
            return _eval_seq_cls(model, items, pad_id, batch_size)
        if labels is None:
            return _eval_free_text(model, items, pad_id, batch_size)
        assert label_ids is not None
        return _eval_labels(model, items, label_ids, pad_id, batch_size)
    finally:
        model.train(was_training)


def _chunks(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _eval_seq_cls(model: nn.Module, items: Sequence[Encoded], pad_id: int, batch_size: int) -> dict[str, float]:
    loss, correct = 0.0, 0
    for chunk in _chunks(items, batch_size):
        b = collate(chunk, pad_id, "seq-cls", model_device(model))
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.float()
        loss += F.cross_entropy(logits, b.labels, reduction="sum").item()
        correct += int((logits.argmax(-1) == b.labels).sum())
    return {"loss": loss / len(items), "accuracy": correct / len(items)}


def _eval_free_text(model: nn.Module, items: Sequence[Encoded], pad_id: int, batch_size: int) -> dict[str, float]:
    loss, correct, n = 0.0, 0, 0
    for chunk in _chunks(items, batch_size):
        logits, targets = completion_logits(model, collate(chunk, pad_id, "causal-lm", model_device(model)))
        loss += F.cross_entropy(logits, targets, reduction="sum").item()
        correct += int((logits.argmax(-1) == targets).sum())
        n += len(targets)
    return {"loss": loss / n, "accuracy": correct / n}


def _eval_labels(
    model: nn.Module, items: Sequence[Encoded], label_ids: Sequence[Sequence[int]], pad_id: int, batch_size: int
) -> dict[str, float]:
    """Score every label's completion; the loss is the gold completion's mean token NLL."""
    single = all(len(t) == 1 for t in label_ids) and len({t[0] for t in label_ids}) == len(label_ids)
    scores = torch.empty(len(items), len(label_ids), dtype=torch.float64)
    device = model_device(model)
    if single:
        first = torch.tensor([t[0] for t in label_ids], device=device)
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            logits, _ = completion_logits(model, collate(chunk, pad_id, "causal-lm", device))
            logp = logits.log_softmax(-1)  # one completion token per example: rows match examples
            scores[start : start + len(chunk)] = logp[:, first].double().cpu()
    else:
        pairs = [(i, j) for i in range(len(items)) for j in range(len(label_ids))]
        seqs = [Encoded(items[i].ids[: items[i].n_prompt] + tuple(label_ids[j]), items[i].n_prompt, j) for i, j in pairs]
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start : start + batch_size]
            b = collate(chunk, pad_id, "causal-lm", device)
            logits, targets = completion_logits(model, b)
            token_lp = logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1).double().cpu()
            rows = b.target_mask[:, 1:].nonzero()[:, 0].cpu()  # example row of each token (row-major order)
            per_seq = torch.zeros(len(chunk), dtype=torch.float64).index_add_(0, rows, token_lp)
            for k, (i, j) in enumerate(pairs[start : start + len(chunk)]):
                scores[i, j] = per_seq[k]
    gold = torch.tensor([e.label for e in items])
    gold_tokens = sum(len(label_ids[int(g)]) for g in gold)
    loss = -scores.gather(1, gold[:, None]).sum().item() / gold_tokens
    accuracy = (scores.argmax(1) == gold).double().mean().item()
    return {"loss": loss, "accuracy": accuracy}
