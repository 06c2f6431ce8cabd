"""Command-line options and config files generated from config dataclasses.

One field, one option: ``rank: int = 16`` with its attribute docstring becomes ``--rank RANK``
whose help is that docstring. Nested config dataclasses (``RunConfig.adapter: AdapterConfig``)
are flattened, so ``--dropout`` sets ``RunConfig.adapter.dropout``. Values resolve in one order:

    dataclass defaults  <  --config FILE (.json / .yaml)  <  options given on the command line

Options are added with ``default=SUPPRESS``, so the parsed namespace holds exactly the options
the user typed (:func:`given`): a resumed run can refuse every one of them that changes the run,
whatever its value. Types come from the annotations: ``int``, ``float``, ``str``, ``bool``
(``--x`` / ``--no-x``), ``Literal`` (choices), ``X | None`` (``none`` gives None), lists
(comma-separated), dicts (JSON).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import operator
import re
import textwrap
import types
import typing
from collections.abc import Callable
from functools import cache, reduce
from pathlib import Path
from typing import Any, TypeVar, Union

from pissa.errors import PissaError

C = TypeVar("C")

RESUME_SAFE = "resume_safe"
"""Field metadata key: the option cannot change a run's result (threads, checkpoint interval)."""
POSITIONAL = "positional"
"""Field metadata key: the option is a positional argument."""
CHOICES = "choices"
"""Field metadata key: the values a text option accepts."""


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


def option_name(f: dataclasses.Field) -> str:
    """``--field-name``."""
    return "--" + f.name.replace("_", "-")


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (Union, types.UnionType) and type(None) in args:
        rest = tuple(a for a in args if a is not type(None))
        return (rest[0] if len(rest) == 1 else reduce(operator.or_, rest)), True
    return tp, False


def _is_list(tp: Any) -> bool:
    return typing.get_origin(tp) in (list, tuple) or any(typing.get_origin(a) in (list, tuple) for a in typing.get_args(tp))


def _list_item(tp: Any) -> Any:
    for t in (tp, *typing.get_args(tp)):
        if typing.get_origin(t) in (list, tuple):
            return typing.get_args(t)[0]
    return str


def converter(tp: Any, name: str) -> Callable[[str], Any]:
    """The parser of a command-line string of annotated type ``tp`` (ArgumentTypeError on a bad value)."""
    inner, optional = _strip_optional(tp)

    def wrap(parse: Callable[[str], Any], what: str) -> Callable[[str], Any]:
        def run(text: str) -> Any:
            if optional and text.lower() in ("none", "null"):
                return None
            try:
                return parse(text)
            except (ValueError, json.JSONDecodeError):
                raise argparse.ArgumentTypeError(f"{name} takes {what}, got {text!r}") from None

        return run

    if typing.get_origin(inner) is typing.Literal:
        choices = [str(c) for c in typing.get_args(inner)]

        def literal(text: str) -> str:
            if text not in choices:
                raise ValueError(text)
            return text

        return wrap(literal, "one of " + ", ".join(choices))
    if _is_list(inner):
        item = _list_item(inner)
        keep_all = inner is not list and str in typing.get_args(inner)  # "all-linear" or a list

        def items(text: str) -> Any:
            if keep_all and "," not in text and text == "all-linear":
                return text
            return [item(t.strip()) for t in text.split(",") if t.strip()]

        return wrap(items, f"comma-separated {item.__name__} values")
    if typing.get_origin(inner) is dict or inner is dict:
        return wrap(json.loads, "a JSON object")
    if inner in (int, float, str):
        return wrap(inner, "an integer" if inner is int else "a number" if inner is float else "text")
    raise TypeError(f"no command-line form for {name}: {tp}")


def _one_of(parse: Callable[[str], Any], choices: tuple[str, ...], name: str) -> Callable[[str], Any]:
    def run(text: str) -> Any:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"{name} takes one of {', '.join(choices)}, got {text!r}")
        return parse(text)

    return run


def _keep_suppress(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` for an optional positional: argparse passes its absent value (the SUPPRESS default) through it."""
    return lambda text: text if text is argparse.SUPPRESS else parse(text)


def _fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init]


def _default(f: dataclasses.Field) -> Any:
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


def add_options(parser: argparse.ArgumentParser, cls: type, skip: frozenset[str] = frozenset()) -> None:
    """Add one option per field of dataclass ``cls`` (nested dataclasses flattened), except ``skip``."""
    docs = field_docs(cls)
    for f, tp in _fields(cls):
        if f.name in skip:
            continue
        if dataclasses.is_dataclass(tp):
            add_options(parser, tp, skip)  # type: ignore[arg-type]
            continue
        default = _default(f)
        help_text = docs.get(f.name, "").replace("%", "%%")
        inner, _ = _strip_optional(tp)
        if f.metadata.get(POSITIONAL):
            parse = converter(tp, f.name)
            if default is dataclasses.MISSING:
                parser.add_argument(f.name, type=parse, help=help_text, metavar=f.name.upper())
            else:  # optional: an absent one stays unset
                parser.add_argument(f.name, nargs="?", default=argparse.SUPPRESS, help=help_text, metavar=f.name.upper(),
                                    type=_keep_suppress(parse))
            continue
        if default is dataclasses.MISSING:
            help_text += " (required)"
        elif f.default is not dataclasses.MISSING and default is not None and not isinstance(default, bool):
            help_text += f" (default: {show(default)})"
        name = option_name(f)
        if inner is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
            continue
        parse = converter(tp, name)
        metavar = None
        if typing.get_origin(inner) is typing.Literal:
            metavar = "{" + ",".join(str(c) for c in typing.get_args(inner)) + "}"
        if CHOICES in f.metadata:
            metavar = "{" + ",".join(f.metadata[CHOICES]) + "}"
            parse = _one_of(parse, tuple(f.metadata[CHOICES]), name)
        parser.add_argument(name, type=parse, default=argparse.SUPPRESS, help=help_text, metavar=metavar,
                            required=default is dataclasses.MISSING, dest=f.name)


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The options of ``cls`` (flattened, nested ones included) that the command line set: ``{field: value}``."""
    out: dict[str, Any] = {}
    for f, tp in _fields(cls):
        if dataclasses.is_dataclass(tp):
            out.update(given(args, tp))  # type: ignore[arg-type]
        elif hasattr(args, f.name):
            out[f.name] = getattr(args, f.name)
    return out


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
    for f, tp in _fields(cls):
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, values)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
        elif _default(f) is dataclasses.MISSING:
            raise PissaError(f"{option_name(f)} is required")
    return cls(**kwargs)


def flat_names(cls: type) -> list[str]:
    """Every field name of ``cls`` with nested dataclasses flattened."""
    names: list[str] = []
    for f, tp in _fields(cls):
        names += flat_names(tp) if dataclasses.is_dataclass(tp) else [f.name]  # type: ignore[arg-type]
    return names


def resume_safe(cls: type) -> set[str]:
    """Names of the fields (flattened) marked as unable to change a run's result."""
    out: set[str] = set()
    for f, tp in _fields(cls):
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
    return _flatten_doc(doc)


def _flatten_doc(doc: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in doc.items():
        if isinstance(v, dict) and k != "extra":
            out.update(_flatten_doc(v))
        else:
            out[str(k).replace("-", "_")] = v
    return out


def config_text(config: Any) -> str:
    """A config dataclass as the YAML text of a config file (nested sections kept)."""
    import yaml

    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)


def resolve(cls: type[C], args: argparse.Namespace, config_file: str | None = None,
            overrides: dict[str, Any] | None = None) -> tuple[C, dict[str, Any]]:
    """``(config, explicit)``: defaults < ``config_file`` < the options given on the command line < ``overrides``.

    ``explicit`` holds every value that did not come from the defaults (file and command line).
    """
    explicit = read_config_file(config_file) if config_file else {}
    explicit.update(given(args, cls))
    return build(cls, {**explicit, **(overrides or {})}), explicit
