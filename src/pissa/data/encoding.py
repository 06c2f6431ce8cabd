"""What fine-tuning optimizes and measures: token encoding, batches, losses, evaluation.

Two kinds of model:

- ``causal-lm``: an example is ``prompt + completion`` tokens; the loss is the mean negative
  log-likelihood of the completion tokens only (prompt and padding are masked). A chat example
  is its conversation rendered by the tokenizer's chat template, and its targets are the tokens
  of every assistant turn (the template's end-of-turn marker included). For labelled
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
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pissa.data.datasets import Example
from pissa.errors import PissaError
from pissa.runtime.devices import model_device

Kind = Literal["causal-lm", "seq-cls"]


@dataclass(frozen=True)
class Encoded:
    """One tokenized example: ``ids`` = prompt tokens then completion tokens (causal LM) or the
    text tokens (seq-cls); the first ``n_prompt`` tokens are the context of the final completion
    (what a generation evaluation feeds the model); ``label`` indexes ``labels``.

    ``mask`` (chat examples): one flag per token of ``ids``, True for the tokens the model learns
    (every assistant turn, so earlier turns inside the first ``n_prompt`` tokens too). None: the
    tokens from ``n_prompt`` on are the targets."""

    ids: tuple[int, ...]
    n_prompt: int
    label: int | None
    mask: tuple[bool, ...] | None = None

    @property
    def n_targets(self) -> int:
        """Number of target tokens (causal LM)."""
        return sum(self.mask) if self.mask is not None else len(self.ids) - self.n_prompt


@dataclass
class Batch:
    """Right-padded tensors of a list of :class:`Encoded` (or of packed rows of them, :func:`collate_packed`).

    ``input_ids``/``attention_mask``: (B, T). ``target_mask`` (B, T): True where token t is a
    completion token (predicted from position t - 1). ``labels`` (B,): label indices or -1.
    Packed rows add ``position_ids`` (B, T), restarting at 0 for each example, and ``block_mask``
    (B, 1, T, T), additive (0 or the dtype's minimum): each token attends to the earlier tokens of
    its own example only.
    """

    input_ids: Tensor
    attention_mask: Tensor
    target_mask: Tensor
    labels: Tensor
    position_ids: Tensor | None = None
    block_mask: Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        """The same batch on ``device``."""
        move = lambda t: None if t is None else t.to(device)
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.target_mask.to(device),
                     self.labels.to(device), move(self.position_ids), move(self.block_mask))

    def inputs(self) -> dict[str, Tensor]:
        """The model's keyword arguments: ``input_ids``, the attention mask (the block mask of packed
        rows) and, for packed rows, ``position_ids``."""
        out = {"input_ids": self.input_ids,
               "attention_mask": self.attention_mask if self.block_mask is None else self.block_mask}
        if self.position_ids is not None:
            out["position_ids"] = self.position_ids
        return out

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
    is what matters), then the completion from its end. Chat examples: see :func:`encode_chat`.
    Seq-cls: the prompt, truncated at its end.
    """
    if not examples:
        return []
    if any(e.messages is not None for e in examples):
        if kind != "causal-lm" or not all(e.messages is not None for e in examples):
            raise PissaError("chat rows (messages) train a causal LM only, and cannot be mixed with other rows; "
                             "use --kind causal-lm and one format per file")
        return encode_chat(tokenizer, examples, max_length)
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


def encode_chat(tokenizer, examples: Sequence[Example], max_length: int) -> list[Encoded]:
    """Tokenize chat examples with the tokenizer's own chat template, each at most ``max_length`` tokens.

    The text is ``apply_chat_template(messages)``, tokenized once without added special tokens
    (the template writes them). Assistant turn i spans the characters that
    ``apply_chat_template(messages[:i + 1])`` adds to ``apply_chat_template(messages[:i],
    add_generation_prompt=True)``: its reply and the template's end-of-turn text. A token is a
    target when it starts inside such a span (character offsets of a fast tokenizer);
    ``n_prompt`` is the first token of the last span. Too long: the conversation loses tokens
    from its start, unless the last assistant turn alone is too long, which then loses tokens
    from its end (one context token is kept); a warning says how many examples were cut.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise PissaError("chat data (messages) needs a tokenizer with a chat template, and this model's has none; "
                         "use a chat model (e.g. smollm2) or prompt,completion rows")
    texts, spans = [], []
    for e in examples:
        assert e.messages is not None
        turns = [{"role": m.role, "content": m.content} for m in e.messages]
        text = _render(tokenizer, turns, False)
        example_spans = []
        for i, turn in enumerate(turns):
            if turn["role"] != "assistant":
                continue
            before, through = _render(tokenizer, turns[:i], True), _render(tokenizer, turns[: i + 1], False)
            if not through.startswith(before) or not text.startswith(through):
                raise PissaError("the tokenizer's chat template does not render a conversation as the prefix of its "
                                 "continuation, so assistant turns cannot be located; use prompt,completion rows")
            example_spans.append((len(before), len(through)))
        texts.append(text)
        spans.append(example_spans)
    try:
        encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise PissaError("chat data needs a fast tokenizer (one that reports character offsets); "
                         "use prompt,completion rows with this model") from None
    out, longest, cut_count = [], 0, 0
    for ids, offsets, example_spans in zip(encoded["input_ids"], encoded["offset_mapping"], spans):
        mask = [any(lo <= start < hi for lo, hi in example_spans) for start, _ in offsets]
        last = example_spans[-1][0]
        n_prompt = next((t for t, (start, _) in enumerate(offsets) if start >= last), len(ids))
        if n_prompt == len(ids) or not any(mask):
            raise PissaError("a chat example's last assistant turn encodes to no tokens; give it a reply")
        longest = max(longest, len(ids))
        if len(ids) > max_length:
            cut_count += 1
            cut = len(ids) - max_length if len(ids) - n_prompt <= max_length - 1 else max(0, n_prompt - 1)
            ids, mask = ids[cut : cut + max_length], mask[cut : cut + max_length]
            n_prompt = max(1, n_prompt - cut)
        mask[0] = False  # the first token is never predicted
        out.append(Encoded(tuple(ids), n_prompt, None, tuple(mask)))
    if cut_count:
        warnings.warn(f"{cut_count} of {len(out)} chat examples exceed --max-length {max_length} (the longest has "
                      f"{longest} tokens) and lose tokens from their start; raise --max-length to keep them whole",
                      stacklevel=2)
    return out


def _render(tokenizer, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    """``tokenizer.apply_chat_template`` as text; a template error becomes a PissaError."""
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except (TemplateError, ValueError, TypeError, KeyError, IndexError) as err:
        raise PissaError(f"the tokenizer's chat template fails on a conversation ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); check the roles and their order") from None
    return str(text)


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
        if kind == "causal-lm" and e.mask is not None:
            target[i, : len(e.ids)] = torch.tensor(e.mask)
        elif kind == "causal-lm":
            target[i, e.n_prompt : len(e.ids)] = True
    labels = torch.tensor([-1 if e.label is None else e.label for e in items])
    batch = Batch(ids, attn, target, labels)
    return batch if device is None or device.type == "cpu" else batch.to(device)


def pack(items: Sequence[Encoded], length: int) -> list[list[Encoded]]:
    """``items`` in rows of at most ``length`` tokens, first fit in order (an item goes into the first
    row with room for it, else a new row); deterministic, every item exactly once."""
    rows: list[list[Encoded]] = []
    room: list[int] = []
    for e in items:
        i = next((i for i, free in enumerate(room) if free >= len(e.ids)), len(rows))
        if i == len(rows):
            rows.append([])
            room.append(length)
        rows[i].append(e)
        room[i] -= len(e.ids)
    return rows


def collate_packed(items: Sequence[Encoded], pad_id: int, length: int, dtype: torch.dtype,
                   device: torch.device | None = None) -> Batch:
    """Causal-LM ``items`` packed (:func:`pack`) into rows of at most ``length`` tokens, right-padded
    to the longest row. Each example keeps its own positions (from 0) and attends only within
    itself, so a packed row computes exactly the logits its examples compute one by one; the
    ``block_mask`` has ``dtype`` (the attention's compute dtype) and costs B x T x T of it."""
    rows = pack(items, length)
    T = max(sum(len(e.ids) for e in row) for row in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attn = torch.zeros(len(rows), T, dtype=torch.long)
    target = torch.zeros(len(rows), T, dtype=torch.bool)
    positions = torch.zeros(len(rows), T, dtype=torch.long)
    segment = torch.full((len(rows), T), -1, dtype=torch.long)  # padding: a segment of its own
    for r, row in enumerate(rows):
        at = 0
        for k, e in enumerate(row):
            n = len(e.ids)
            ids[r, at : at + n] = torch.tensor(e.ids)
            attn[r, at : at + n] = 1
            positions[r, at : at + n] = torch.arange(n)
            segment[r, at : at + n] = k
            if e.mask is not None:
                target[r, at : at + n] = torch.tensor(e.mask)
            else:
                target[r, at + e.n_prompt : at + n] = True
            at += n
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    allowed = (segment[:, :, None] == segment[:, None, :]) & causal
    block = torch.zeros(len(rows), 1, T, T, dtype=dtype).masked_fill(~allowed[:, None], torch.finfo(dtype).min)
    batch = Batch(ids, attn, target, torch.full((len(rows),), -1), positions, block)
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
