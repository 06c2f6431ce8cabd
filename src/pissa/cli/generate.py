"""``pissa generate``: one streamed reply to a prompt, or (``--chat``) a conversation over stdin.

Ctrl-C during a reply stops it (the chat keeps what was shown); Ctrl-C at the prompt, or the end of
input (Ctrl-D), ends the chat. In the chat, ``/adapter`` lists the loaded adapters and ``/adapter NAME`` switches to
one (``--adapter`` given several times; the base is shared, :func:`pissa.set_adapter`).
The model, the prompt rendering and decoding are :mod:`pissa.inference.chat`'s.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pissa.adapter.attach import adapted_layers
from pissa.adapter.named import active_adapter, list_adapters, set_adapter
from pissa.cli.parser import add_options, resolve
from pissa.errors import PissaError
from pissa.inference.chat import Streamer, Turn, fit, load, reply
from pissa.inference.config import GenerateConfig


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def chat(model: nn.Module, tokenizer: Any, cfg: GenerateConfig, messages: list[Turn], first: str | None) -> int:
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
        if text.split()[0] == "/adapter":
            switch_adapter(model, text.split()[1:])
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


def switch_adapter(model: nn.Module, words: list[str]) -> None:
    """The chat's ``/adapter [NAME]``: list the adapters (the active one starred) or make NAME the active one;
    a mistake is reported on stderr and the chat goes on."""
    if not any(True for _ in adapted_layers(model)):
        print("no adapters are loaded (pass --adapter DIR, several times for several)", file=sys.stderr)
        return
    try:
        if words:
            set_adapter(model, words[0])
    except PissaError as e:
        print(str(e).replace("`name`", "adapter"), file=sys.stderr)
        return
    active = active_adapter(model)
    print("adapters: " + ", ".join(f"*{n}" if n == active else n for n in list_adapters(model)), file=sys.stderr)


def talk(cfg: GenerateConfig) -> int:
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
    messages: list[Turn] = [] if cfg.system is None else [{"role": "system", "content": cfg.system}]
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
    """``pissa generate [--model M] [--adapter DIR]... [--chat] [PROMPT]``: options from :class:`GenerateConfig`."""
    add_options(parser, GenerateConfig)
    return lambda args: talk(resolve(GenerateConfig, args)[0])
