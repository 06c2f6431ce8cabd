"""What the columns of user data mean: a table of formats, detected by their columns, each mapped to examples.

:data:`FORMATS`, in order; the first whose ``columns`` are all present wins (other columns are ignored):

====================  ==========================================  ==========================================
format                columns                                     examples
====================  ==========================================  ==========================================
``chat``              ``messages`` (optional ``system``)          the conversation as is
``sharegpt``          ``conversations`` (optional ``system``)     the conversation, roles renamed
``alpaca``            ``instruction``, ``output`` (optional       system?, history turns, user
                      ``input``, ``system``, ``history``)         ``instruction\\n\\ninput``, assistant ``output``
``preference``        ``prompt``, ``chosen``, ``rejected``        prompt, chosen as completion, ``rejected``
``prompt-completion`` ``prompt``, ``completion``                  both verbatim (an empty prompt is allowed)
``text-label``        ``text``, ``label``                         ``Text: {text}\\nLabel:`` -> ``" {label}"``
====================  ==========================================  ==========================================

Chat formats (``chat``, ``sharegpt``, ``alpaca``) become chat examples (:attr:`Example.messages`), so the model
reads them through the tokenizer's chat template and learns every assistant turn. A conversation is a list of
turns, each ``{"role", "content"}`` (OpenAI / ``messages`` style) or ``{"from", "value"}`` (ShareGPT style),
roles ``system``, ``user``, ``assistant`` or their ShareGPT names (:data:`ROLE_NAMES`: ``human``, ``gpt``, ...);
it needs an assistant turn and must end with one. A ``.csv`` cell may hold the list as JSON text. Alpaca's
``history`` is a list of ``[instruction, response]`` pairs that come before the row's own instruction.

``columns`` (``--columns prompt=question,completion=answer``) renames the file's columns to these names before
detection: ``TARGET=SOURCE``, TARGET one of :data:`COLUMN_NAMES`. Another format adds a :class:`Format` row to
the table (before any format whose columns are a subset of its own, as ``preference`` comes before
``prompt-completion``; :mod:`pissa.data.preference` checks its rows for ``--objective dpo``).

Every row is checked before any example is returned: a malformed row is a one-line PissaError naming where it
is (``line 3`` of a .jsonl file, ``row 3`` otherwise), so nothing trains on half a file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pissa.data import preference
from pissa.data.readers import Row, Table
from pissa.errors import PissaError

TEXT_TEMPLATE = "Text: {text}\nLabel:"
"""Prompt of user files with ``text`` and ``label`` columns."""

ROLES = ("system", "user", "assistant")
"""The roles a chat message may have."""

ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
              "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system"}
"""ShareGPT's role names (``from``) -> :data:`ROLES`."""


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


@dataclass(frozen=True)
class Format:
    """One row of :data:`FORMATS`: the columns that identify it and how its rows become examples."""

    name: str
    columns: tuple[str, ...]
    """All present: the data has this format."""
    optional: tuple[str, ...]
    """Further columns it reads when present."""
    examples: Callable[[list[Row], str], list[Example]]
    """``(rows, data name) -> examples``; raises PissaError naming the first bad row."""


def chat_example(messages: tuple[Message, ...]) -> Example:
    """A chat example: completion = the last (assistant) turn, prompt = JSON ``[[role, content], ...]`` of the rest
    (the split key; the model never reads it)."""
    context = json.dumps([[m.role, m.content] for m in messages[:-1]], ensure_ascii=False)
    return Example(context, messages[-1].content, None, messages)


def _chat_rows(column: str) -> Callable[[list[Row], str], list[Example]]:
    def examples(rows: list[Row], name: str) -> list[Example]:
        return [chat_example(_system(record, where, name) + conversation(record.get(column), where, name, column))
                for where, record in rows]
    return examples


def _alpaca_rows(rows: list[Row], name: str) -> list[Example]:
    out = []
    for where, record in rows:
        instruction = _text(record, "instruction", where, name)
        extra = _text(record, "input", where, name, required=False)
        output = _text(record, "output", where, name)
        turns: list[dict[str, Any]] = []
        history = record.get("history")
        if history is not None:
            if isinstance(history, str):
                history = _json(history)
            if not isinstance(history, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in history):
                raise PissaError(f"{where} of '{name}': 'history' must be a list of [instruction, response] pairs")
            for query, response in history:
                turns += [{"role": "user", "content": query}, {"role": "assistant", "content": response}]
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        turns += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        out.append(chat_example(_system(record, where, name) + conversation(turns, where, name, "output")))
    return out


def _free_rows(rows: list[Row], name: str) -> list[Example]:
    prompts = column(rows, "prompt", name, allow_blank=True)
    return [Example(p, c, None) for p, c in zip(prompts, column(rows, "completion", name))]


def _preference_rows(rows: list[Row], name: str) -> list[Example]:
    return [Example(p, c, None, rejected=r) for p, c, r in preference.preference_fields(rows, name, column)]


def _labelled_rows(rows: list[Row], name: str) -> list[Example]:
    texts = [squash(t) for t in column(rows, "text", name)]
    labels = [squash(label) for label in column(rows, "label", name)]
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise PissaError(f"column 'label' of '{name}' has the single value '{classes[0]}'; classification needs "
                         "at least 2 labels (or use prompt,completion columns for free text)")
    return [Example(TEXT_TEMPLATE.format(text=t), f" {label}", label) for t, label in zip(texts, labels)]


FORMATS: tuple[Format, ...] = (
    Format("chat", ("messages",), ("system",), _chat_rows("messages")),
    Format("sharegpt", ("conversations",), ("system",), _chat_rows("conversations")),
    Format("alpaca", ("instruction", "output"), ("input", "system", "history"), _alpaca_rows),
    Format("preference", preference.COLUMNS, (), _preference_rows),
    Format("prompt-completion", ("prompt", "completion"), (), _free_rows),
    Format("text-label", ("text", "label"), (), _labelled_rows),
)
"""The formats user data may have, in the order they are tried (:func:`detect`)."""

COLUMN_NAMES = tuple(dict.fromkeys(c for f in FORMATS for c in f.columns + f.optional))
"""Every column name a format reads: the targets ``columns`` may map to."""


def detect(columns: Sequence[str], name: str) -> Format:
    """The first format of :data:`FORMATS` whose columns are all in ``columns``; PissaError listing them if none."""
    for fmt in FORMATS:
        if set(fmt.columns) <= set(columns):
            return fmt
    wanted = "; ".join(f"{','.join(f.columns)} ({f.name})" for f in FORMATS)
    raise PissaError(f"'{name}' has columns {', '.join(map(str, columns)) or '(none)'}; it needs {wanted}, "
                     "or map yours with `columns` (e.g. prompt=question,completion=answer)")


def to_examples(table: Table, name: str, columns: Sequence[str] = ()) -> list[Example]:
    """Validate every row of ``table`` (renamed by ``columns``, ``TARGET=SOURCE`` items) and build its examples."""
    names, rows = rename(table, parse_columns(columns), name)
    if not rows:
        raise PissaError(f"'{name}' has no rows; it needs the columns of one format ({', '.join(f.name for f in FORMATS)})")
    if len(rows) < 2:
        raise PissaError(f"'{name}' has only {len(rows)} row; it needs at least 2 (to train on and to test)")
    return detect(names, name).examples(rows, name)


def parse_columns(items: Sequence[str]) -> dict[str, str]:
    """``["prompt=question", ...]`` as ``{target: source}``; PissaError naming `columns` for a bad item."""
    mapping: dict[str, str] = {}
    for item in items:
        target, eq, source = (part.strip() for part in item.partition("="))
        if not eq or not target or not source:
            raise PissaError(f"`columns` item '{item}' must be TARGET=SOURCE, e.g. prompt=question")
        if target not in COLUMN_NAMES:
            raise PissaError(f"`columns` maps to '{target}', which no format reads; targets are {', '.join(COLUMN_NAMES)}")
        if target in mapping:
            raise PissaError(f"`columns` maps '{target}' twice ({mapping[target]} and {source}); map it once")
        mapping[target] = source
    return mapping


def rename(table: Table, mapping: dict[str, str], name: str) -> Table:
    """``table`` with column ``source`` renamed ``target`` for each ``{target: source}`` (a column already named
    ``target`` is replaced); PissaError naming `columns` when the data lacks a source column."""
    names, rows = table
    if not mapping:
        return table
    missing = [s for s in mapping.values() if s not in names]
    if missing:
        raise PissaError(f"`columns` names '{missing[0]}', which '{name}' lacks (its columns: {', '.join(names) or 'none'})")
    sources = set(mapping.values())
    kept = [c for c in names if c not in sources and c not in mapping]
    renamed = [(where, {**{c: r.get(c) for c in kept}, **{t: r.get(s) for t, s in mapping.items()}}) for where, r in rows]
    return kept + list(mapping), renamed


def conversation(value: Any, where: str, name: str, column: str = "messages") -> tuple[Message, ...]:
    """One conversation cell as validated messages (a JSON text of the list is accepted, as CSV holds); see the
    module docstring for the rules."""
    if isinstance(value, str):
        value = _json(value)
    if not isinstance(value, list) or not value:
        raise PissaError(f"{where} of '{name}': '{column}' must be a non-empty list of {{\"role\", \"content\"}} objects")
    messages = []
    for number, item in enumerate(value, start=1):
        role, content = _turn(item)
        if not isinstance(role, str) or not isinstance(content, str):
            raise PissaError(f"{where} of '{name}': message {number} must be an object with text 'role' and 'content' "
                             "(or 'from' and 'value')")
        if role not in ROLES and role not in ROLE_NAMES:
            raise PissaError(f"{where} of '{name}': message {number} has the unknown role '{role}'; "
                             f"roles must be {', '.join(ROLES)} (or {', '.join(n for n in ROLE_NAMES if n not in ROLES)})")
        messages.append(Message(ROLE_NAMES.get(role, role), content))
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


def _turn(item: Any) -> tuple[Any, Any]:
    """``(role, content)`` of a ``{"role", "content"}`` or ``{"from", "value"}`` object (None, None otherwise)."""
    if not isinstance(item, dict):
        return None, None
    if "from" in item and "role" not in item:
        return item.get("from"), item.get("value")
    return item.get("role"), item.get("content")


def _system(record: dict[str, Any], where: str, name: str) -> tuple[Message, ...]:
    """The row's ``system`` column as a leading system turn (none when absent or blank)."""
    text = _text(record, "system", where, name, required=False)
    return (Message("system", text),) if text.strip() else ()


def _text(record: dict[str, Any], key: str, where: str, name: str, required: bool = True) -> str:
    """Cell ``key`` as text: missing / None / NaN is "" (an error when ``required``, as is blank text)."""
    value = record.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        value = ""
    if not isinstance(value, str):
        raise PissaError(f"{where} of '{name}': column '{key}' holds a {type(value).__name__}; it must hold text")
    if required and not value.strip():
        raise PissaError(f"{where} of '{name}': column '{key}' is empty; fill it in or drop the row")
    return value


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def column(rows: list[Row], key: str, name: str, allow_blank: bool = False) -> list[str]:
    """The cells of column ``key`` as text; missing, NaN or (unless allowed) blank cells are an error."""
    values: list[str] = []
    bad: list[str] = []
    for where, record in rows:
        value = record.get(key)
        if isinstance(value, (dict, list)):
            raise PissaError(f"{where} of '{name}': column '{key}' holds a {type(value).__name__}; it must hold text")
        missing = value is None or (isinstance(value, float) and math.isnan(value))
        text = "" if missing else str(value)
        if missing or (not allow_blank and not text.strip()):
            bad.append(where)
        values.append(text)
    if bad:
        what = "missing or NaN" if allow_blank else "empty, missing or NaN"
        raise PissaError(f"column '{key}' of '{name}' is {what} in {len(bad)} of {len(rows)} rows (first: {bad[0]}); "
                         "fill them in or drop those rows")
    return values


def squash(text: str) -> str:
    """Collapse every run of whitespace to one space and strip the ends."""
    return " ".join(text.split())
