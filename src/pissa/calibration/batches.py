"""The batches a calibration pass reads: tokenized as fine-tuning tokenizes them, regrouped by length, digested."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from pissa.data.batches import Batch, collate
from pissa.data.datasets import Dataset, load_data
from pissa.data.encoding import encode_all
from pissa.errors import PissaError
from pissa.runtime.hub import Kind


def data_digest(batches: Sequence[Batch]) -> str:
    """SHA-256 (hex, 32 characters) of the batches' token ids, attention masks and target masks, in order."""
    h = hashlib.sha256()
    for b in batches:
        for t in (b.input_ids, b.attention_mask, b.target_mask):
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()[:32]


def as_batch(b: Batch | dict[str, Tensor]) -> Batch:
    """A :class:`~pissa.data.batches.Batch`, or a dict with ``input_ids`` and optionally ``attention_mask`` and
    ``labels`` (-100: not a target; without labels every non-padding token after the first is one)."""
    if isinstance(b, Batch):
        return b
    ids = b["input_ids"]
    attn = b.get("attention_mask", torch.ones_like(ids))
    target = b["labels"] != -100 if "labels" in b else attn.bool()
    target = target.clone()
    target[:, 0] = False
    return Batch(ids, attn, target, torch.full((len(ids),), -1))


def by_length(batches: list[Batch]) -> list[Batch]:
    """The rows of ``batches`` sorted by length (stable) and cut into batches of the same sizes, each
    right-padded to its longest row: every row keeps its tokens, positions and masks, so a forward
    computes the same per-token activations (causal or masked attention ignores right padding) with
    less padding. Batches with packed rows (``position_ids``) or any row not right-padded are returned as given."""
    if not batches or any(b.position_ids is not None or b.block_mask is not None for b in batches):
        return batches
    rows = []  # (length, batch, row)
    for b in batches:
        lengths = b.attention_mask.sum(1)
        right = torch.arange(b.attention_mask.shape[1], device=lengths.device) < lengths[:, None]
        if not bool((b.attention_mask.bool() == right).all()):
            return batches
        rows += [(int(n), b, i) for i, n in enumerate(lengths.tolist())]
    rows.sort(key=lambda r: r[0])
    out, at = [], 0
    for size in (len(b.input_ids) for b in batches):
        group, at = rows[at : at + size], at + size
        T = max(1, group[-1][0])
        ids, mask, target = (pad_sequence([getattr(b, f)[i, :T] for _, b, i in group], batch_first=True)  # pads 0
                             for f in ("input_ids", "attention_mask", "target_mask"))
        out.append(Batch(ids, mask, target, torch.stack([b.labels[i] for _, b, i in group])))
    return out


def calibration_batches(tokenizer: Any, data: str | Dataset, kind: Kind, samples: int, batch_size: int,
                        max_length: int, *, val_size: int = 0, columns: Sequence[str] = (),
                        split_name: str | None = None) -> list[Batch]:
    """The first ``samples`` examples of ``data``'s training split, tokenized as fine-tuning does, in batches
    (each ``input_ids (B, T)``, B <= ``batch_size``, T <= ``max_length``).

    ``data``: a dataset name, split as ``pissa finetune --val-size val_size`` splits it
    (:func:`pissa.data.datasets.load_data`, with ``columns`` and ``split_name``), or a
    :class:`~pissa.data.datasets.Dataset` already split so.
    """
    dataset = load_data(data, val_size, columns=columns, split_name=split_name) if isinstance(data, str) else data
    if samples > len(dataset.train):
        raise PissaError(f"`samples` {samples} exceeds the {len(dataset.train)} training examples of {dataset.name}; "
                         "pass fewer")
    items = encode_all(tokenizer, dataset.train[:samples], dataset.labels, kind, max_length)
    pad = int(tokenizer.pad_token_id)
    return [collate(items[i : i + batch_size], pad, kind) for i in range(0, len(items), batch_size)]
