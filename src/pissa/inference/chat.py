"""``pissa generate``: talk to a model, with or without an adapter, its reply streamed as it is produced.

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
(:func:`pissa.generation.end_tokens`) or after ``max_new_tokens``, fewer when the model's context
(``max_position_embeddings``) is full; a chat first drops its oldest exchanges to make room.

Dtypes: an adapter's fingerprint covers the dtype of the base it was made on (the base a
``--dtype`` run attached to, recorded in the adapter), so the base loads in that dtype, is adapted,
and its frozen weights are then converted to ``--dtype``; the factors keep their dtype, and a half
base runs under autocast, as in training.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from pissa import options
from pissa.adapter.attach import adapted_layers
from pissa.data.encoding import _render
from pissa.errors import PissaError
from pissa.files import adapter_dir as io
from pissa.inference.decoding import end_tokens
from pissa.runtime import hub
from pissa.runtime.devices import autocast, model_device, resolve_device, torch_dtype
from pissa.training.config import GenerateConfig

Message = dict[str, str]
"""A chat message: ``{"role": "system" | "user" | "assistant", "content": text}``."""


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


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def load(cfg: GenerateConfig) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)``: the causal LM ``cfg`` names (the adapter's recorded base when ``--model`` is not
    given), adapted when ``cfg.adapter`` is set, its frozen base in ``cfg.dtype``, on ``cfg.device``, in eval mode."""
    name, kind, made_on = cfg.model or "smollm2", "auto", torch_dtype(cfg.dtype)
    if cfg.adapter is not None:
        name, kind, _, made_on = io.recorded_base(cfg.adapter, cfg.model, "auto")
    if hub.resolve_kind(name, kind) != "causal-lm":
        raise PissaError(f"pissa generate needs a causal language model, and {name} loads as a sequence classifier"
                         f"{' (the head the adapter records)' if kind == 'seq-cls' else ''}; pass --model with a causal LM")
    device, dtype = resolve_device(cfg.device), torch_dtype(cfg.dtype)
    loaded, tokenizer = hub.load_model(name, dtype=made_on)
    model: nn.Module = loaded
    if cfg.adapter is not None:
        io.load_adapter(model, cfg.adapter)
        factors = {id(p) for _, layer in adapted_layers(model) for p in layer.parameters(recurse=False)}
        for p in model.parameters():
            if id(p) not in factors and p.is_floating_point():
                p.data = p.data.to(dtype)
    return model.to(device).eval(), tokenizer


def _context(model: nn.Module) -> int | None:
    """The model's context length (``config.max_position_embeddings``), None when it states none."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return limit if isinstance(limit, int) else None


def render(tokenizer: Any, messages: Sequence[Message]) -> str:
    """The conversation as the tokenizer's chat template writes it, ending with the assistant's generation prompt."""
    return _render(tokenizer, list(messages), True)


def fit(model: nn.Module, tokenizer: Any, messages: list[Message], max_new_tokens: int) -> list[int]:
    """Token ids of the rendered conversation. While they and ``max_new_tokens`` overflow the model's context, the
    oldest exchange is dropped from ``messages`` (in place; never the system message or the last message)."""
    limit = _context(model)
    first = 1 if messages and messages[0]["role"] == "system" else 0
    while True:
        ids: list[int] = tokenizer(render(tokenizer, messages), add_special_tokens=False)["input_ids"]
        if limit is None or len(ids) + max_new_tokens <= limit or len(messages) - first < 3:
            return ids
        del messages[first : first + 2]
        print(f"(the oldest exchange was dropped to fit the model's context of {limit} tokens)", file=sys.stderr)


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


def chat(model: nn.Module, tokenizer: Any, cfg: GenerateConfig, messages: list[Message], first: str | None) -> int:
    """The ``--chat`` loop over stdin lines (``first``: an opening message), appending each exchange to ``messages``.

    Ctrl-C during a reply stops it and keeps what was shown (nothing, when nothing was); the end of input or
    Ctrl-C at the prompt returns 0.
    """
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  # line editing and history for input()
        print("chat: Enter sends a message, Ctrl-C stops a reply, Ctrl-D ends", file=sys.stderr)
    while True:
        if first is not None:
            text, first = first, None
        else:
            try:
                text = input("> " if interactive else "")
            except (EOFError, KeyboardInterrupt):
                if interactive:
                    print(file=sys.stderr)
                return 0
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        streamer = Streamer(tokenizer, _write)
        try:
            reply(model, tokenizer, fit(model, tokenizer, messages, cfg.max_new_tokens), cfg, streamer)
        except KeyboardInterrupt:
            print("\n(reply stopped)", file=sys.stderr, end="")
        _write("\n")
        if streamer.text:
            messages.append({"role": "assistant", "content": streamer.text})
        else:
            messages.pop()


def generate(cfg: GenerateConfig) -> int:
    """``pissa generate``: one streamed reply to the prompt, or the ``--chat`` loop; returns the exit code."""
    first = None if cfg.prompt == "-" else cfg.prompt
    if first is None and not cfg.chat:
        if sys.stdin.isatty():
            print("reading the prompt from stdin; end it with Ctrl-D", file=sys.stderr)
        first = sys.stdin.read().rstrip("\n")
    if first is not None and not first.strip():
        raise PissaError("the prompt is empty; pass it as an argument or on stdin")
    torch.set_num_threads(cfg.threads)
    model, tokenizer = load(cfg)
    templated = not cfg.raw and bool(getattr(tokenizer, "chat_template", None))
    if not templated and (cfg.chat or cfg.system is not None):
        option = "--chat" if cfg.chat else "--system"
        raise PissaError(f"{option} needs a tokenizer with a chat template, and this model's has none; "
                         f"use a chat model (e.g. smollm2) or drop {option}")
    torch.manual_seed(cfg.seed)
    messages: list[Message] = [] if cfg.system is None else [{"role": "system", "content": cfg.system}]
    if cfg.chat:
        return chat(model, tokenizer, cfg, messages, first)
    assert first is not None
    if templated:
        ids = fit(model, tokenizer, [*messages, {"role": "user", "content": first}], cfg.max_new_tokens)
    else:
        ids = tokenizer(first)["input_ids"]
    try:
        reply(model, tokenizer, ids, cfg, Streamer(tokenizer, _write))
    except KeyboardInterrupt:  # end the line; the command line reports the interrupt
        _write("\n")
        raise
    _write("\n")
    return 0


def command_generate(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """``pissa generate [--model M] [--adapter DIR] [--chat] [PROMPT]``: options from :class:`GenerateConfig`."""
    options.add_options(parser, GenerateConfig)
    return lambda args: generate(options.resolve(GenerateConfig, args)[0])
