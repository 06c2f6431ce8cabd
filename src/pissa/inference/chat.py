"""What ``pissa generate`` runs: talk to a model, with or without an adapter, its reply streamed as it is produced.

One prompt (the argument, or stdin when it is ``-`` or absent) gets one reply; ``--chat`` reads one
message a line from stdin and keeps the conversation, rendered with the tokenizer's chat template,
until the end of input (Ctrl-D). Ctrl-C during a reply stops it (the chat keeps what was shown);
Ctrl-C at the prompt ends the chat.

The prompt: a tokenizer with a chat template renders a plain prompt as one user message (after
``--system``) followed by the assistant's generation prompt, as a chat-tuned model expects;
``--raw``, or a tokenizer without a template, gives the text as it is (plus the tokenizer's own
special tokens, e.g. BOS).

Decoding is ``model.generate`` with the KV cache: greedy at temperature 0, else sampling
(temperature, top-p) from ``torch.manual_seed(seed)``. A reply ends at an end token
(:func:`pissa.end_tokens`) or after ``max_new_tokens``, fewer when the model's context
(``max_position_embeddings``) is full; a chat first drops its oldest exchanges to make room.

Dtypes: an adapter's fingerprint covers the dtype of the base it was made on (the base a
``--dtype`` run attached to, recorded in the adapter), so the base loads in that dtype, is adapted,
and its frozen weights are then converted to ``--dtype``; the factors keep their dtype, and a half
base runs under autocast, as in training.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from pissa.adapter.attach import adapted_layers
from pissa.adapter.save_load import load_adapter
from pissa.data.encoding import render_messages
from pissa.errors import PissaError
from pissa.files.adapter_dir import recorded_base
from pissa.inference.config import GenerateConfig, adapter_names
from pissa.inference.decoding import end_tokens
from pissa.runtime import hub
from pissa.runtime.devices import DTypeName, autocast, model_device, resolve_device, torch_dtype

Turn = dict[str, str]
"""A chat message: ``{"role": "system" | "user" | "assistant", "content": text}``."""


log = logging.getLogger(__name__)


class Streamer:
    """A ``model.generate`` streamer: after each new token, decodes the reply so far and passes ``emit`` the new text.

    The first ``put`` (the prompt) and special tokens are skipped; text that ends in an incomplete
    character (U+FFFD: a byte-level token cut a character) waits for the next token. ``text`` is
    everything emitted so far.
    """

    def __init__(self, tokenizer: Any, emit: Callable[[str], None]) -> None:
        self.tokenizer, self.emit = tokenizer, emit
        self.ids: list[int] = []
        self.text = ""
        self._prompt = True

    def put(self, value: torch.Tensor) -> None:
        """Called by ``generate`` with the prompt, then with each new token (batch size 1)."""
        if self._prompt:
            self._prompt = False
            return
        self.ids += value.reshape(-1).tolist()
        self._flush(final=False)

    def end(self) -> None:
        """Called by ``generate`` at the end: emit what is left."""
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        text = str(self.tokenizer.decode(self.ids, skip_special_tokens=True))
        if text.endswith("\ufffd") and not final:
            return
        new = text[len(self.text) :]
        if new:
            self.text += new
            self.emit(new)


def load(cfg: GenerateConfig) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)``: the causal LM ``cfg`` names (:func:`load_causal_lm`), with every adapter of
    ``cfg.adapter`` (several: named after their folders, the first active)."""
    return load_causal_lm(cfg.model, cfg.adapter, cfg.device, cfg.dtype, "pissa generate")


def load_causal_lm(model_name: str | None, adapters: str | Sequence[str] | None, device_name: str, dtype_name: DTypeName,
                   command: str) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)``: the causal LM ``model_name`` (the first adapter's recorded base when None, else
    smollm2), with ``adapters`` loaded (their fingerprints checked against the base; several are named after their
    folders, :func:`~pissa.inference.config.adapter_names`, the first active), its frozen base in ``dtype_name``,
    on ``device_name``, in eval mode; ``command`` names the caller in the error for a sequence classifier."""
    folders = [adapters] if isinstance(adapters, str) else list(adapters or [])
    name, kind, made_on = model_name or "smollm2", "auto", torch_dtype(dtype_name)
    if folders:
        name, kind, _, made_on = recorded_base(folders[0], model_name, "auto")
    if hub.resolve_kind(name, kind) != "causal-lm":
        raise PissaError(f"{command} needs a causal language model, and {name} loads as a sequence classifier"
                         f"{' (the head the adapter records)' if kind == 'seq-cls' else ''}; pass `model` with a causal LM")
    device, dtype = resolve_device(device_name), torch_dtype(dtype_name)
    loaded, tokenizer = hub.load_model(name, dtype=made_on)
    model: nn.Module = loaded
    if folders:
        for folder, adapter in zip(folders, adapter_names(folders)):
            load_adapter(model, folder, name=adapter if len(folders) > 1 else None)
        layers = [layer for _, layer in adapted_layers(model)]
        factors = {id(p) for layer in layers for p in layer.parameters()} - {
            id(p) for layer in layers for p in layer.residual.parameters()}
        for p in model.parameters():
            if id(p) not in factors and p.is_floating_point():
                p.data = p.data.to(dtype)
    return model.to(device).eval(), tokenizer


def _context(model: nn.Module) -> int | None:
    """The model's context length (``config.max_position_embeddings``), None when it states none."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return limit if isinstance(limit, int) else None


def render(tokenizer: Any, messages: Sequence[Turn]) -> str:
    """The conversation as the tokenizer's chat template writes it, ending with the assistant's generation prompt."""
    return render_messages(tokenizer, list(messages), True)


def fit(model: nn.Module, tokenizer: Any, messages: list[Turn], max_new_tokens: int) -> list[int]:
    """Token ids of the rendered conversation. While they and ``max_new_tokens`` overflow the model's context, the
    oldest exchange is dropped from ``messages`` (in place; never the system message or the last message)."""
    limit = _context(model)
    first = 1 if messages and messages[0]["role"] == "system" else 0
    while True:
        ids: list[int] = tokenizer(render(tokenizer, messages), add_special_tokens=False)["input_ids"]
        if limit is None or len(ids) + max_new_tokens <= limit or len(messages) - first < 3:
            return ids
        del messages[first : first + 2]
        log.warning(f"(the oldest exchange was dropped to fit the model's context of {limit} tokens)")


@torch.no_grad()
def reply(model: nn.Module, tokenizer: Any, ids: Sequence[int], cfg: GenerateConfig, streamer: Streamer) -> None:
    """Continue ``ids`` with ``model.generate`` (KV cache; greedy at temperature 0, else sampling), streaming the new
    tokens to ``streamer``. A PissaError, before anything is generated, when the prompt fills the model's context."""
    limit = _context(model)
    room = cfg.max_new_tokens if limit is None else min(cfg.max_new_tokens, limit - len(ids))
    if room < 1:
        raise PissaError(f"the prompt has {len(ids)} tokens and fills the model's context of {limit}; shorten it")
    device = model_device(model)
    sampling: dict[str, Any] = (
        {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p} if cfg.temperature > 0
        else {"do_sample": False, "temperature": None, "top_p": None}
    )
    with autocast(device, torch_dtype(cfg.dtype)):
        model.generate(  # type: ignore[operator]
            input_ids=torch.tensor([list(ids)], device=device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device), streamer=streamer,
            max_new_tokens=room, eos_token_id=end_tokens(tokenizer, model) or None, pad_token_id=tokenizer.pad_token_id,
            num_beams=1, top_k=None, use_cache=True, **sampling,
        )
