"""Evaluation by generation: greedy decoding, final-answer extraction, exact match.

A held-out example's context (the first ``n_prompt`` tokens of its :class:`~pissa.objective.Encoded`:
the prompt, or a conversation up to the generation prompt of its last assistant turn) is
decoded greedily with the KV cache (``model.generate(do_sample=False)``), batched with left
padding, for at most ``max_new_tokens`` tokens or until an end token. The answer is extracted
from the decoded text and compared with the one extracted from the reference completion:

1. the number after the last ``####`` (GSM8K's answer line);
2. else the number after the last "the answer is" (any case, an optional colon or ``$``;
   MetaMathQA's "The answer is: 42");
3. else the last number in the text.

Numbers are normalized (thousands commas dropped, ``3.50`` -> ``3.5``, ``7.0`` -> ``7``). A
reference with no number at all is compared as whitespace-normalized text instead.
Accuracy is the fraction of exact matches; the loss is the teacher-forced mean NLL of the
target tokens, as the likelihood evaluation computes it.

``eval="auto"`` picks generation for causal-LM data without labels whose scored references all
end in an explicit final answer (rule 1 or 2), e.g. the embedded ``arithmetic`` task; other
data (labelled, or free text without such answers) is scored by likelihood.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from typing import Literal

import torch
from torch import nn

from .devices import model_device
from .errors import PissaError
from .objective import Encoded, Kind, evaluate

EvalKind = Literal["generate", "likelihood"]

_NUMBER = r"(?:(?<![\w)])-)?\d+(?:,\d{3})*(?:\.\d+)?"
"""A number: optional minus (not after a word character, so 5-3 has no -3), thousands commas, decimals."""
_MARKED = re.compile(r"####\s*\$?\s*(" + _NUMBER + ")")
_ANSWER_IS = re.compile(r"answer is\s*:?\s*\$?\s*(" + _NUMBER + ")", re.IGNORECASE)
_ANY = re.compile(_NUMBER)


def _normalize(number: str) -> str:
    """``"1,234.50"`` -> ``"1234.5"``; ``"-0"`` -> ``"0"``."""
    try:
        value = Decimal(number.replace(",", ""))
    except InvalidOperation:
        return number
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_answer(text: str) -> str | None:
    """The final answer of ``text`` as a normalized number (rules in the module docstring), or None."""
    for pattern in (_MARKED, _ANSWER_IS, _ANY):
        found = pattern.findall(text)
        if found:
            return _normalize(found[-1])
    return None


def has_final_answer(text: str) -> bool:
    """Whether ``text`` states its answer explicitly (``#### N`` or "the answer is N")."""
    return bool(_MARKED.search(text) or _ANSWER_IS.search(text))


def answers_match(generated: str, reference: str) -> bool:
    """Exact match of the extracted answers; a reference without a number must match as whitespace-normalized text."""
    expected = extract_answer(reference)
    if expected is None:
        return " ".join(generated.split()) == " ".join(reference.split())
    return extract_answer(generated) == expected


def choose_eval(setting: str, kind: Kind, labels: Sequence[str] | None, references: Sequence[str],
                data: str) -> EvalKind:
    """Resolve ``--eval`` (auto, generate, likelihood) for a run; ``references`` are the scored completions."""
    if setting == "likelihood":
        return "likelihood"
    if setting == "generate":
        if kind != "causal-lm" or labels is not None:
            raise PissaError(f"--eval generate needs a causal LM and unlabelled data (messages or prompt,completion); "
                             f"'{data}' is labelled or the model is a classifier: use --eval likelihood")
        return "generate"
    if setting != "auto":
        raise PissaError(f"--eval must be auto, generate or likelihood, got {setting!r}")
    checkable = bool(references) and all(has_final_answer(r) for r in references)
    return "generate" if kind == "causal-lm" and labels is None and checkable else "likelihood"


def end_tokens(tokenizer, model: nn.Module) -> list[int]:
    """Token ids that end a generation: the tokenizer's eos and the model's generation-config eos ids."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    config = getattr(model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    ids += extra if isinstance(extra, list) else [] if extra is None else [extra]
    return sorted({int(i) for i in ids})


@torch.no_grad()
def generate(model: nn.Module, prompts: Sequence[Sequence[int]], *, pad_id: int, end_ids: Sequence[int],
             max_new_tokens: int, batch_size: int) -> list[list[int]]:
    """Greedy continuations of token-id ``prompts``, each cut before its first end token.

    Prompts are batched by length (``batch_size`` a batch), left-padded with ``pad_id`` and decoded
    with ``model.generate`` (KV cache, ``do_sample=False``) for at most ``max_new_tokens`` tokens.
    Returns one list of new token ids per prompt, in the order of ``prompts``.
    """
    if not callable(getattr(model, "generate", None)):
        raise PissaError("--eval generate needs a Hugging Face generative model (with .generate); use --eval likelihood")
    if not end_ids:
        raise PissaError("generation needs an end token, but the tokenizer has no eos token; set one or use --eval likelihood")
    device = model_device(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    ends = set(end_ids)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, width - len(prompts[i]) :] = torch.tensor(list(prompts[i]), dtype=torch.long)
            attention[row, width - len(prompts[i]) :] = 1
        sequences = model.generate(  # type: ignore[operator]
            input_ids=ids.to(device), attention_mask=attention.to(device), do_sample=False, num_beams=1,
            max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=list(end_ids), use_cache=True,
            temperature=None, top_p=None, top_k=None,
        )
        for row, i in enumerate(chunk):
            new = sequences[row, width:].tolist()
            cut = next((k for k, t in enumerate(new) if t in ends), len(new))
            out[i] = new[:cut]
    return out


@torch.no_grad()
def evaluate_generation(model: nn.Module, tokenizer, items: Sequence[Encoded], references: Sequence[str], *,
                        pad_id: int, max_new_tokens: int, batch_size: int = 16) -> dict[str, float]:
    """``{"loss": teacher-forced mean target NLL, "accuracy": exact-match fraction}`` on ``items`` (eval mode).

    ``references[i]`` is the reference completion of ``items[i]``; the model continues
    ``items[i].ids[:n_prompt]`` greedily (:func:`generate`) and the decoded text (special tokens
    skipped) is matched with :func:`answers_match`.
    """
    if len(items) != len(references):
        raise PissaError(f"{len(items)} examples but {len(references)} references; pass one reference per example")
    if not items:
        return {"loss": 0.0, "accuracy": 0.0}
    was_training = model.training
    model.eval()
    try:
        loss = evaluate(model, items, None, None, "causal-lm", pad_id, batch_size)["loss"]
        outputs = generate(model, [e.ids[: e.n_prompt] for e in items], pad_id=pad_id,
                           end_ids=end_tokens(tokenizer, model), max_new_tokens=max_new_tokens, batch_size=batch_size)
    finally:
        model.train(was_training)
    texts = tokenizer.batch_decode(outputs, skip_special_tokens=True)
    correct = sum(answers_match(text, ref) for text, ref in zip(texts, references))
    return {"loss": loss, "accuracy": correct / len(items)}
