"""Options of ``pissa generate`` (each field's docstring is its ``--help``)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pissa.errors import PissaError
from pissa.options import POSITIONAL, REPEATABLE


@dataclass
class GenerateConfig:
    """``pissa generate``: text from a model, with or without an adapter; ``--chat`` for a conversation."""

    prompt: str = field(default="-", metadata={POSITIONAL: True})
    """The prompt; "-" or none: read from stdin (with --chat: an optional first message, the turns then come from stdin)."""
    model: str | None = None
    """Embedded model (smollm2) or a local Hugging Face causal-LM folder; default: the base the adapter records, else smollm2."""
    adapter: list[str] | None = field(default=None, metadata={REPEATABLE: True})
    """Adapter folder (save_adapter / pissa finetune) applied to the model; give it several times to load several
    onto the one base, each named by its folder (the parent's for a folder called adapter): the first is active,
    /adapter NAME switches in --chat."""
    chat: bool = False
    """Interactive chat: one message a line from stdin, the history rendered with the tokenizer's chat template;
    Ctrl-C stops a reply, Ctrl-D (or Ctrl-C at the prompt) ends."""
    raw: bool = False
    """Give the prompt to the model as it is. Without it, a tokenizer that has a chat template (smollm2's has)
    renders the prompt as one user message (after --system) followed by the assistant's turn."""
    system: str | None = None
    """A system message opening the conversation (needs the chat template)."""
    max_new_tokens: int = 256
    """Most tokens generated per reply (fewer when the model's context is full)."""
    temperature: float = 0.0
    """Sampling temperature; 0: greedy decoding (deterministic)."""
    top_p: float = 1.0
    """Nucleus sampling with temperature > 0: sample among the most likely tokens holding this probability mass."""
    seed: int = 0
    """Seed of the sampling."""
    device: str = "auto"
    """Where the model runs: auto (CUDA when available, else CPU), cpu, cuda, cuda:N, mps."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the frozen base (a half one runs under autocast); an adapter made on another dtype is converted."""
    threads: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    """CPU threads (default: the cores available to this process)."""

    def __post_init__(self) -> None:
        if isinstance(self.adapter, str):
            self.adapter = [self.adapter]
        if self.adapter is not None and not self.adapter:  # `--adapter none`
            self.adapter = None
        for name, low in (("max_new_tokens", 1), ("threads", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise PissaError(f"`{name}` must be an integer >= {low}, got {value!r}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise PissaError(f"`temperature` must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise PissaError(f"`top_p` must be in (0, 1], got {self.top_p}")
        if self.chat and self.raw:
            raise PissaError("`chat` renders the conversation with the chat template; drop `raw`")
        if self.raw and self.system is not None:
            raise PissaError("`system` needs the chat template, which `raw` bypasses; drop one of them")


def adapter_names(folders: list[str]) -> list[str]:
    """A name per adapter folder: its name (its parent's when it is called ``adapter``, as ``pissa finetune``
    writes ``OUT/adapter``), ``.`` made ``_``, a repeated name numbered (``name-2``)."""
    names: list[str] = []
    for folder in folders:
        path = Path(folder).expanduser().resolve()
        name = (path.parent.name if path.name == "adapter" and path.parent.name else path.name).replace(".", "_")
        name = name.lstrip("_") or "adapter"
        base, k = name, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names
