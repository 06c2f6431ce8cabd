"""Evaluation by generation: greedy decoding, final-answer extraction, exact match.

A held-out example's context (the first ``n_prompt`` tokens of its :class:`~pissa.data.encoding.Encoded`:
the prompt, or a conversation up to the generation prompt of its last assistant turn) is
decoded greedily with the KV cache, batched with left padding, for at most ``max_new_tokens``
tokens or until an end token (the tokens of ``model.generate(do_sample=False)``). The answer is
extracted from the decoded text and compared with the one extracted from the reference completion:

1. the number after the last ``####`` (GSM8K's answer line);
2. else the number after the last "the answer is" (any case, an optional colon or ``$``;
   MetaMathQA's "The answer is: 42");
3. else the last number in the text.

Numbers are normalized (thousands commas dropped, ``3.50`` -> ``3.5``, ``7.0`` -> ``7``). A
reference with no number at all is compared as whitespace-normalized text instead.
Accuracy is the fraction of exact matches; the loss is the teacher-forced mean NLL of the
target tokens, as the likelihood evaluation computes it.

Cost (:func:`evaluate_generation`): the decoder's matmuls, nothing else. So each batch runs one
forward over ``[pad | context | reference completion | pad]`` that yields both the loss and the
contexts' KV cache (:func:`score_and_generate`: the contexts are run once, not once for the loss
and again for generation); decoding is a plain loop over ``DynamicCache`` in which rows that
ended leave the batch; and in float32 the adapted layers are swapped for merged copies while it
runs (:func:`merged_for_inference`: one matmul per layer instead of three). None of it changes
the greedy tokens beyond float32 rounding (tested against ``generate`` and the separate loss pass).
With ``--eval-dtype bfloat16`` the merged model computes in bfloat16 instead (about 2x faster where
the CPU or GPU has bfloat16 matmuls); tokens may then differ where logits nearly tie.
There is no token budget derived from the references: every row decodes until its end token or
``max_new_tokens``.

``eval="auto"`` picks generation for causal-LM data without labels whose scored references all
end in an explicit final answer (rule 1 or 2), e.g. the embedded ``arithmetic`` task; other
data (labelled, or free text without such answers) is scored by likelihood.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pissa.adapter.attach import adapted_layers, set_module
from pissa.adapter.base_layers import dense_weight, is_conv1d
from pissa.adapter.layer import PissaLinear
from pissa.adapter.quantized import QuantizedLinear
from pissa.data.encoding import Encoded
from pissa.data.loss import accepts_logits_to_keep
from pissa.errors import PissaError
from pissa.runtime.devices import model_device


def end_tokens(tokenizer, model: nn.Module) -> list[int]:
    """Token ids that end a generation: the tokenizer's eos and the model's generation-config eos ids."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    config = getattr(model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    ids += extra if isinstance(extra, list) else [] if extra is None else [extra]
    return sorted({int(i) for i in ids})


def _check_generative(model: nn.Module, end_ids: Sequence[int]) -> None:
    if not callable(getattr(model, "generate", None)):
        raise PissaError("`eval` generate needs a Hugging Face generative model (with .generate); use `eval` likelihood")
    if not end_ids:
        raise PissaError("generation needs an end token, but the tokenizer has no eos token; set one or use `eval` likelihood")


def left_padded(rows: Sequence[Sequence[int]], pad_id: int, width: int) -> tuple[Tensor, Tensor]:
    """``rows`` right-aligned in ``(len(rows), width)`` ids (``pad_id`` before them) and their 0/1 attention mask."""
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
        attention[r, width - len(row) :] = 1
    return ids, attention


def _decode(model: nn.Module, cache: Any, logits: Tensor, attention: Tensor, rows: list[int], out: list[list[int]],
            ends: Tensor, max_new_tokens: int) -> None:
    """Greedy decoding of a prefilled batch: ``logits (B, V)`` of each row's last position, ``cache`` and
    ``attention (B, T)`` (left-padded) cover the same T positions. Appends each step's token to
    ``out[rows[b]]``; a row leaves the batch (its cache rows dropped) once it produced an end token."""
    positions = attention.sum(-1, keepdim=True) - 1  # each row's last position (counted from its first real token)
    for step in range(max_new_tokens):
        token = logits.argmax(-1)
        ended = torch.isin(token, ends)
        for r, t in zip(rows, token.tolist()):
            out[r].append(t)
        if step == max_new_tokens - 1 or bool(ended.all()):
            return
        if bool(ended.any()):
            keep = (~ended).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows = [rows[k] for k in keep.tolist()]
            token, attention, positions = token[keep], attention[keep], positions[keep]
        attention = torch.cat([attention, attention.new_ones(len(rows), 1)], dim=1)
        positions = positions + 1
        logits = model(input_ids=token[:, None], attention_mask=attention, position_ids=positions,
                       past_key_values=cache, use_cache=True).logits[:, -1]


def _cut(out: list[list[int]], end_ids: Sequence[int]) -> list[list[int]]:
    ends = {int(t) for t in end_ids}
    return [new[: next((k for k, t in enumerate(new) if t in ends), len(new))] for new in out]


@torch.no_grad()
def generate(model: nn.Module, prompts: Sequence[Sequence[int]], *, pad_id: int, end_ids: Sequence[int],
             max_new_tokens: int, batch_size: int) -> list[list[int]]:
    """Greedy continuations of token-id ``prompts``, each cut before its first end token.

    Prompts are batched by length (``batch_size`` a batch) and left-padded with ``pad_id``; each
    batch runs once over its prompts (positions counted from each row's first real token, logits of
    the last position only), then one token at a time with the KV cache (a ``DynamicCache``), taking
    the argmax, for at most ``max_new_tokens`` tokens. A row that produced an end token leaves the
    batch (its cache rows are dropped): the tokens are those of ``model.generate(do_sample=False)``,
    without its per-token overhead and without computing rows that already ended. Returns one list
    of new token ids per prompt, in the order of ``prompts``.
    """
    _check_generative(model, end_ids)
    from transformers import DynamicCache

    device = model_device(model)
    ends = torch.tensor(sorted(set(end_ids)), device=device)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, attention = left_padded([prompts[i] for i in chunk], pad_id, max(len(prompts[i]) for i in chunk))
        ids, attention = ids.to(device), attention.to(device)
        cache = DynamicCache(config=getattr(model, "config", None))
        kwargs = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
        logits = model(input_ids=ids, attention_mask=attention, position_ids=(attention.cumsum(-1) - 1).clamp(min=0),
                       past_key_values=cache, use_cache=True, **kwargs).logits[:, -1]
        _decode(model, cache, logits, attention, list(chunk), out, ends, max_new_tokens)
    return _cut(out, end_ids)


@torch.no_grad()
def score_and_generate(model: nn.Module, items: Sequence[Encoded], *, pad_id: int, end_ids: Sequence[int],
                       max_new_tokens: int, batch_size: int) -> tuple[float, int, list[list[int]]]:
    """The teacher-forced loss of ``items`` and greedy continuations of their contexts, from one forward
    pass over each batch.

    A batch lays its items out with their contexts (the first ``n_prompt`` tokens) right-aligned at
    column ``W`` and their reference completions after it, right-padded: ``[pad | context | completion | pad]``.
    One forward over the whole width gives the logits of every target token (the loss) and, at column
    ``W - 1``, of the first generated token; the KV cache it fills is then cropped to the first ``W``
    columns, which is exactly the cache of the contexts alone (causal attention: no context position
    sees a completion token), and decoding continues from it (:func:`generate`'s loop). So the
    contexts are run once instead of twice. Batches are formed by context length.

    Returns ``(summed target NLL, number of targets, new tokens per item cut before the first end token)``.
    """
    _check_generative(model, end_ids)
    from transformers import DynamicCache

    device = model_device(model)
    ends = torch.tensor(sorted(set(end_ids)), device=device)
    order = sorted(range(len(items)), key=lambda i: (items[i].n_prompt, len(items[i].ids)))
    out: list[list[int]] = [[] for _ in items]
    total, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        chunk = [items[i] for i in order[start : start + batch_size]]
        W = max(e.n_prompt for e in chunk)
        T = W + max(len(e.ids) - e.n_prompt for e in chunk)
        ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        attention = torch.zeros(len(chunk), T, dtype=torch.long)
        target = torch.zeros(len(chunk), T, dtype=torch.bool)
        for r, e in enumerate(chunk):
            at = W - e.n_prompt
            ids[r, at : at + len(e.ids)] = torch.tensor(e.ids)
            attention[r, at : at + len(e.ids)] = 1
            if e.mask is not None:
                target[r, at : at + len(e.ids)] = torch.tensor(e.mask)
            else:
                target[r, W : at + len(e.ids)] = True
        predict = target[:, 1:]  # column t predicts token t + 1
        needed = predict.any(0)
        needed[W - 1] = True  # the context's last column predicts the first new token
        keep = needed.nonzero().squeeze(1)
        ids, attention = ids.to(device), attention.to(device)
        cache = DynamicCache(config=getattr(model, "config", None))
        kwargs = {"logits_to_keep": keep.to(device)} if accepts_logits_to_keep(model) else {}
        logits = model(input_ids=ids, attention_mask=attention, position_ids=(attention.cumsum(-1) - 1).clamp(min=0),
                       past_key_values=cache, use_cache=True, **kwargs).logits
        if not kwargs:
            logits = logits[:, keep.to(device)]
        mask = predict[:, keep].to(device)
        targets = ids[:, 1:][:, keep.to(device)][mask]
        total += F.cross_entropy(logits[mask].float(), targets, reduction="sum").item()
        count += int(mask.sum())
        first = logits[:, int((keep == W - 1).nonzero())]
        del logits
        cache.crop(W - T)  # drop the completion columns (a negative count removes that many)
        _decode(model, cache, first, attention[:, :W], order[start : start + len(chunk)], out, ends, max_new_tokens)
    return total, count, _cut(out, end_ids)


@contextmanager
def merged_for_inference(model: nn.Module, dtype: torch.dtype = torch.float32) -> Iterator[bool]:
    """Within the block, ``model``'s linear layers compute with merged weights in ``dtype``; every replaced
    module is put back on exit (the model's outputs are then bit-identical to before). Yields whether it merged.

    ``torch.float32``: each adapted layer is replaced by its merged copy (``W_res + s B A``,
    :meth:`~pissa.adapter.layer.PissaLinear.merged`): one matmul per layer instead of three, so decoding a
    token costs the base model's time. Done only when every adapted layer computes in float32 (a float32
    residual, dense or 4-bit, float32 factors, no autocast): the merged weight then gives the same outputs
    to float32 rounding (a half-precision base would round the merged weight to its dtype, which it does
    not do unmerged). Costs one float32 copy of the adapted weights while it lasts.

    ``torch.bfloat16``: each adapted layer (a Linear or Conv1D residual, dense, half or 4-bit, dequantized)
    is replaced by a :class:`CastLinear` holding ``W_res + s B A`` formed in float32 and rounded to
    bfloat16; so are the other plain linear layers and the output head (a bfloat16 copy of its weight,
    also when it is tied to the input embedding), and every other floating parameter (embeddings, norms)
    holds a bfloat16 copy while the block lasts. So the whole forward runs in bfloat16, as a bfloat16
    model would: matmuls, attention, norms, the residual stream and the KV cache (about 2x float32's speed
    on CPUs with AVX512-BF16 or AMX, and on GPUs); buffers (rotary frequencies) are left as they are, and
    callers take the loss in float32 from the bfloat16 logits. The outputs move by bfloat16 rounding (8
    significant bits), so greedy tokens can differ where two logits nearly tie. Costs 2 bytes per weight
    while it lasts: half of the float32 merge's copies.

    Either way a model holding FSDP shards (DTensor parameters) is left as it is (yields False).
    """
    swaps: list[tuple[str, nn.Module, nn.Module]]  # (name, the module there, its stand-in)
    if dtype == torch.float32:
        layers = list(adapted_layers(model))
        if not layers or torch.is_autocast_enabled() or not all(_float32_layer(layer) for _, layer in layers):
            yield False
            return
        with torch.no_grad():
            swaps = [(name, layer, layer.merged()) for name, layer in layers]
    elif dtype == torch.bfloat16:
        if _sharded(model):
            yield False  # no whole weight to merge in this process
            return
        with torch.no_grad():
            swaps = [(name, old, _cast_copy(old, dtype)) for name, old in _linear_layers(model)]
    else:
        raise PissaError(f"`eval_dtype` must be float32 or bfloat16, got {dtype}")
    recast: list[tuple[nn.Parameter, Tensor]] = []  # (parameter, its own data) of the parameters given bf16 copies
    try:
        for name, _, new in swaps:
            set_module(model, name, new)
        if dtype != torch.float32:
            for param in model.parameters():  # what the swaps left: embeddings, norms, ... (each tied one once)
                if param.is_floating_point() and param.dtype != dtype:
                    recast.append((param, param.data))
                    param.data = param.data.to(dtype)
        yield True
    finally:
        for param, data in recast:
            param.data = data
        for name, old, _ in swaps:
            set_module(model, name, old)


class CastLinear(nn.Module):
    """A frozen linear layer that computes in its weight's dtype: ``y = x.to(W.dtype) @ W^T + b`` with
    ``W (out, in)`` and the bias held in ``W``'s dtype, ``y`` in it too. :func:`merged_for_inference` puts it in
    place of a layer for a while."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(weight.dtype), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, dtype={self.weight.dtype}"


def _linear_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every adapted layer with a Linear or Conv1D residual and of every plain ``nn.Linear`` or
    Conv1D outside them (the output head included), in module order."""
    out: list[tuple[str, nn.Module]] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            if isinstance(child, PissaLinear):
                residual = child.residual
                if isinstance(residual, QuantizedLinear) or type(residual) is nn.Linear or is_conv1d(residual):
                    out.append((prefix + name, child))
            elif type(child) is nn.Linear or is_conv1d(child):
                out.append((prefix + name, child))
            else:
                walk(child, f"{prefix}{name}.")

    walk(model, "")
    return out


def _cast_copy(layer: nn.Module, dtype: torch.dtype) -> CastLinear:
    """``layer`` as a :class:`CastLinear` in ``dtype``: an adapted layer's merged weight formed in float32
    (at least) and then rounded, a plain layer's weight copied and rounded."""
    module = layer.merged(torch.float32) if isinstance(layer, PissaLinear) else layer
    bias = getattr(module, "bias", None)
    return CastLinear(dense_weight(module).detach().to(dtype, copy=True).contiguous(), bias)


def _float32_layer(layer: PissaLinear) -> bool:
    if _sharded(layer):
        return False
    residual = layer.residual
    dtype = residual.weight_dtype if isinstance(residual, QuantizedLinear) else dense_weight(residual).dtype
    return dtype == torch.float32 and all(p.dtype == torch.float32 for p in layer.parameters())


def _sharded(module: nn.Module) -> bool:
    """``module`` holds FSDP's DTensor shards (a tensor with a device mesh)."""
    return any(hasattr(t, "device_mesh") for t in [*module.parameters(), *module.buffers()])
