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

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from pissa.data.datasets import Example
from pissa.errors import PissaError
from pissa.runtime.hub import Kind


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
                             "use `kind` causal-lm and one format per file")
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
            raise PissaError("an example encodes to an empty prompt or completion; check the data or raise `max_length`")
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
        text = render_messages(tokenizer, turns, False)
        example_spans = []
        for i, turn in enumerate(turns):
            if turn["role"] != "assistant":
                continue
            before, through = render_messages(tokenizer, turns[:i], True), render_messages(tokenizer, turns[: i + 1], False)
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
        warnings.warn(f"{cut_count} of {len(out)} chat examples exceed `max_length` {max_length} (the longest has "
                      f"{longest} tokens) and lose tokens from their start; raise `max_length` to keep them whole",
                      stacklevel=2)
    return out


def render_messages(tokenizer, messages: list[dict[str, str]], generation_prompt: bool) -> str:
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
