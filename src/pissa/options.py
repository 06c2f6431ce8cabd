"""Config dataclasses as data: field docstrings, flattening, building from flat values, config files.

Every option of pissa is one field of a config dataclass (``AdapterConfig``, ``RunConfig``, ...); the
string literal after a field is its documentation (:func:`field_docs`), which the command line shows
as ``--help`` (:mod:`pissa.cli.parser` builds argparse from these classes). Nested config dataclasses
(``RunConfig.adapter: AdapterConfig``) are flattened, so every field has one flat name. Values
resolve in one order: dataclass defaults < a config file (.json / .yaml, :func:`read_config_file`)
< what the caller sets; a run writes its resolved config (:func:`config_text`) for ``--config`` and
``--resume`` to read back. Field metadata marks options that cannot change a run's result
(:data:`RESUME_SAFE`), positional ones and text choices.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import re
import textwrap
import typing
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

from pissa.errors import PissaError

C = TypeVar("C")

RESUME_SAFE = "resume_safe"
"""Field metadata key: the option cannot change a run's result (threads, checkpoint interval)."""
POSITIONAL = "positional"
"""Field metadata key: the option is a positional argument."""
CHOICES = "choices"
"""Field metadata key: the values a text option accepts."""
REPEATABLE = "repeatable"
"""Field metadata key (a list option): the flag may be given several times, its values joined in order."""


@cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` from the string literals that follow each field in the class bodies of ``cls``'s MRO."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # no source (a frozen install): options without help
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, after in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                text = " ".join(inspect.cleandoc(after.value.value).split())
                docs[node.target.id] = re.sub(r":\w+:`~?([^`]+)`", r"\1", text).replace("``", "")
    return docs




def fields_of(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init]


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def show(value: Any) -> str:
    """A value as it is written on the command line."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def flatten(config: Any) -> dict[str, Any]:
    """A config dataclass as ``{field: value}`` with nested dataclasses flattened."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flatten(value))
        else:
            out[f.name] = value
    return out


def build(cls: type[C], values: dict[str, Any]) -> C:
    """An instance of ``cls`` from flat ``{field: value}`` (nested dataclass fields taken by name); missing fields keep
    their defaults; unknown names are a PissaError."""
    known = set(flat_names(cls))
    unknown = sorted(set(values) - known)
    if unknown:
        raise PissaError(f"unknown option(s) {', '.join(unknown)}; see --help for the options")
    return _build(cls, values)


def _build(cls: Any, values: dict[str, Any]) -> Any:
    kwargs = {}
    for f, tp in fields_of(cls):
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, values)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
        elif default_of(f) is dataclasses.MISSING:
            raise PissaError(f"`{f.name}` is required")
    return cls(**kwargs)


def flat_names(cls: type) -> list[str]:
    """Every field name of ``cls`` with nested dataclasses flattened."""
    names: list[str] = []
    for f, tp in fields_of(cls):
        names += flat_names(tp) if dataclasses.is_dataclass(tp) else [f.name]  # type: ignore[arg-type]
    return names


def resume_safe(cls: type) -> set[str]:
    """Names of the fields (flattened) marked as unable to change a run's result."""
    out: set[str] = set()
    for f, tp in fields_of(cls):
        if dataclasses.is_dataclass(tp):
            out |= resume_safe(tp)  # type: ignore[arg-type]
        elif f.metadata.get(RESUME_SAFE):
            out.add(f.name)
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A config file (``.json``, ``.yaml``/``.yml``) as flat ``{field: value}``; nested sections are flattened."""
    path = Path(path)
    if not path.is_file():
        raise PissaError(f"config file {path} does not exist; pass a config.yaml a run wrote, or a .json/.yaml file")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml  # PyYAML: a dependency of transformers

            doc = yaml.safe_load(text)
        elif path.suffix == ".json":
            doc = json.loads(text)
        else:
            raise PissaError(f"config file {path} must end in .json, .yaml or .yml")
    except (json.JSONDecodeError, ValueError) as e:
        raise PissaError(f"config file {path} cannot be parsed ({str(e).splitlines()[0]}); fix it or write a new one") from None
    if not isinstance(doc, dict):
        raise PissaError(f"config file {path} must hold a mapping of option names to values")
    return flatten_doc(doc)


def flatten_doc(doc: dict[str, Any]) -> dict[str, Any]:
    """A nested config mapping (a config file, ``dataclasses.asdict``) as flat ``{field: value}`` (``extra`` kept whole)."""
    out: dict[str, Any] = {}
    for k, v in doc.items():
        if isinstance(v, dict) and k != "extra":
            out.update(flatten_doc(v))
        else:
            out[str(k).replace("-", "_")] = v
    return out


def config_text(config: Any) -> str:
    """A config dataclass as the YAML text of a config file (nested sections kept)."""
    import yaml

    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)


def resume_safe_field(**kw: Any) -> Any:
    """A field (``default=`` or ``default_factory=``) that cannot change a run's result: ``--resume`` accepts a new value."""
    return dataclasses.field(metadata={RESUME_SAFE: True}, **kw)
