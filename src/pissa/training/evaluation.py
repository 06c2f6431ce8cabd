"""Scoring held-out examples: by likelihood (loss, and accuracy as the best label or the argmax token) or by
generation (greedy decoding, exact match of the final answer; :mod:`pissa.inference.decoding`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pissa.data.answers import answers_match, has_final_answer
from pissa.data.batches import collate
from pissa.data.encoding import Encoded
from pissa.data.loss import completion_logits
from pissa.errors import PissaError
from pissa.inference.decoding import end_tokens, merged_for_inference, score_and_generate
from pissa.runtime.devices import model_device
from pissa.runtime.hub import Kind


@torch.no_grad()
def evaluate(
    model: nn.Module,
    items: Sequence[Encoded],
    labels: Sequence[str] | None,
    label_ids: Sequence[Sequence[int]] | None,
    kind: Kind,
    pad_id: int,
    batch_size: int = 16,
    dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """``{"loss": mean per-target loss, "accuracy": fraction correct}`` on ``items`` (eval mode).

    ``label_ids``: the completion tokens of each label (causal LM with labels). When every label
    is one distinct token, one forward pass per example scores all labels at once; otherwise
    each (example, label) pair is scored as its own sequence. Examples are batched by length.
    ``dtype`` bfloat16 runs the linear layers' matmuls in bfloat16 on merged copies
    (:func:`~pissa.inference.decoding.merged_for_inference`); float32 scores the model as it is.
    """
    items = sorted(items, key=lambda e: len(e.ids))  # similar lengths together: little padding
    was_training = model.training
    model.eval()
    try:
        with merged_for_inference(model, dtype) if dtype != torch.float32 else contextlib.nullcontext():
            return _evaluate(model, items, labels, label_ids, kind, pad_id, batch_size)
    finally:
        model.train(was_training)


def _evaluate(model: nn.Module, items: Sequence[Encoded], labels: Sequence[str] | None,
              label_ids: Sequence[Sequence[int]] | None, kind: Kind, pad_id: int, batch_size: int) -> dict[str, float]:
    if kind == "seq-cls":
        return _eval_seq_cls(model, items, pad_id, batch_size)
    if labels is None:
        return _eval_free_text(model, items, pad_id, batch_size)
    assert label_ids is not None
    return _eval_labels(model, items, label_ids, pad_id, batch_size)


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


EvalKind = Literal["generate", "likelihood"]


def choose_eval(setting: str, kind: Kind, labels: Sequence[str] | None, references: Sequence[str],
                data: str) -> EvalKind:
    """Resolve ``--eval`` (auto, generate, likelihood) for a run; ``references`` are the scored completions."""
    if setting == "likelihood":
        return "likelihood"
    if setting == "generate":
        if kind != "causal-lm" or labels is not None:
            raise PissaError(f"`eval` generate needs a causal LM and unlabelled data (messages or prompt,completion); "
                             f"'{data}' is labelled or the model is a classifier: use `eval` likelihood")
        return "generate"
    if setting != "auto":
        raise PissaError(f"`eval` must be auto, generate or likelihood, got {setting!r}")
    checkable = bool(references) and all(has_final_answer(r) for r in references)
    return "generate" if kind == "causal-lm" and labels is None and checkable else "likelihood"


@torch.no_grad()
def evaluate_generation(model: nn.Module, tokenizer, items: Sequence[Encoded], references: Sequence[str], *,
                        pad_id: int, max_new_tokens: int, batch_size: int = 64,
                        dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """``{"loss": teacher-forced mean target NLL, "accuracy": exact-match fraction}`` on ``items`` (eval mode).

    ``references[i]`` is the reference completion of ``items[i]``; the model continues
    ``items[i].ids[:n_prompt]`` greedily (:func:`generated_texts`, its matmuls in ``dtype``) and the
    decoded text is matched with :func:`answers_match`.
    """
    if len(items) != len(references):
        raise PissaError(f"{len(items)} examples but {len(references)} references; pass one reference per example")
    if not items:
        return {"loss": 0.0, "accuracy": 0.0}
    loss, texts = generated_texts(model, tokenizer, items, pad_id=pad_id, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, dtype=dtype)
    correct = sum(answers_match(text, ref) for text, ref in zip(texts, references))
    return {"loss": loss, "accuracy": correct / len(items)}


@torch.no_grad()
def generated_texts(model: nn.Module, tokenizer, items: Sequence[Encoded], *, pad_id: int, max_new_tokens: int,
                    batch_size: int = 64, dtype: torch.dtype = torch.float32) -> tuple[float, list[str]]:
    """``(teacher-forced mean target NLL, greedy continuation of each item's context as text)`` (eval mode).

    One pass of :func:`~pissa.inference.decoding.score_and_generate`, at most ``batch_size`` rows at
    once, on the layers merged in ``dtype`` (:func:`~pissa.inference.decoding.merged_for_inference`:
    float32 gives the unmerged model's tokens, bfloat16 runs the matmuls in bfloat16); the texts are
    decoded with special tokens skipped.
    """
    was_training = model.training
    model.eval()
    try:
        with merged_for_inference(model, dtype):
            total, count, outputs = score_and_generate(model, items, pad_id=pad_id, end_ids=end_tokens(tokenizer, model),
                                                       max_new_tokens=max_new_tokens, batch_size=batch_size)
    finally:
        model.train(was_training)
    return total / max(1, count), tokenizer.batch_decode(outputs, skip_special_tokens=True)
