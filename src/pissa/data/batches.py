"""Encoded examples as tensors: padded batches and packed rows (each example attends only to itself)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pissa.data.encoding import Encoded
from pissa.runtime.hub import Kind


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
