"""Which layers an adapter targets: the one matcher of names (exact, dotted suffix or full regex) and the output
heads that "all-linear" leaves out.
"""

from __future__ import annotations

import re

from torch import nn

from pissa.adapter.base_layers import is_adaptable, is_linear
from pissa.errors import PissaError

HEAD_NAMES = ("lm_head", "score", "classifier")
"""Module names treated as output heads (never adapted by "all-linear"), as in PEFT."""


def _embedding(model: nn.Module, getter: str) -> nn.Module | None:
    """``model.<getter>()`` (``get_input_embeddings`` / ``get_output_embeddings``), None when the model has none:
    no such method, or transformers' NotImplementedError of a composite model (CLIPModel: two towers, two embeddings)."""
    get = getattr(model, getter, None)
    if not callable(get):
        return None
    try:
        return get()
    except NotImplementedError:
        return None


def _head_names(model: nn.Module) -> set[str]:
    """Names of the output head and of any layer whose weight is the input embedding matrix."""
    out = _embedding(model, "get_output_embeddings")
    emb = _embedding(model, "get_input_embeddings")
    emb_weight = getattr(emb, "weight", None)
    heads = set()
    for name, module in model.named_modules():
        tied = emb_weight is not None and getattr(module, "weight", None) is emb_weight
        if module is out or tied or any(part in HEAD_NAMES for part in name.split(".")):
            heads.add(name)
    return heads


def matches(name: str, pattern: str) -> bool:
    """A target pattern matches a module name as the whole name, a dotted suffix, or a full regex."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def find_targets(model: nn.Module, targets: str | list[str]) -> list[str]:
    """Names of the layers selected by ``targets`` (see AdapterConfig.targets): "all-linear" picks every Linear/Conv1D
    but the output head; names or patterns pick Linear, Conv1D and (one-group) Conv2d layers."""
    layers = [name for name, m in model.named_modules() if name and is_adaptable(m)]
    if targets == "all-linear":
        heads = _head_names(model)
        chosen = [n for n in layers if n not in heads and is_linear(model.get_submodule(n))]
        if not chosen:
            raise PissaError("the model has no Linear or Conv1D layer besides its output head; nothing to adapt")
        return chosen
    patterns = [targets] if isinstance(targets, str) else list(targets)
    chosen = [n for n in layers if any(matches(n, p) for p in patterns)]
    if not chosen:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in layers})
        raise PissaError(
            f"targets {patterns} matched no Linear/Conv1D/Conv2d layer; available names end in: {', '.join(suffixes[:20])}"
            + (f" (e.g. {layers[0]})" if layers else "")
        )
    return chosen
