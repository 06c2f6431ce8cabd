"""argparse from config dataclasses: one field, one option (the field's docstring is its ``--help``).

``rank: int = 16`` becomes ``--rank RANK``; nested config dataclasses are flattened (``--dropout`` sets
``RunConfig.adapter.dropout``). Options are added with ``default=SUPPRESS``, so the parsed namespace
holds exactly what the user typed (:func:`given`): a resumed run can refuse every such option that
changes the run. Values resolve as ``defaults < --config FILE < the command line`` (:func:`resolve`).
Types come from the annotations: ``int``, ``float``, ``str``, ``bool`` (``--x`` / ``--no-x``),
``Literal`` (choices), ``X | None`` (``none`` gives None), lists (comma-separated; a ``REPEATABLE`` one also
by repeating the flag; a positional list takes one word per item), dicts (JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import operator
import types
import typing
from collections.abc import Callable
from functools import reduce
from typing import Any, Union

from pissa.errors import PissaError
from pissa.options import CHOICES, POSITIONAL, REPEATABLE, C, build, default_of, field_docs, fields_of, read_config_file, show


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are a PissaError (one line, exit 2) instead of a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise PissaError(f"{self.prog}: {message} (see --help)")


def flag(name: str) -> str:
    """The option of field ``name``: ``max_rank`` -> ``--max-rank``."""
    return "--" + name.replace("_", "-")


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


def _or_empty(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` whose None (``none``) is an empty list, for a repeatable list option."""
    return lambda text: [] if (value := parse(text)) is None else value


def _keep_suppress(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` for an optional positional: argparse passes its absent value (the SUPPRESS default) through it."""
    return lambda text: text if text is argparse.SUPPRESS else parse(text)


def add_options(parser: argparse.ArgumentParser, cls: type, skip: frozenset[str] = frozenset()) -> None:
    """Add one option per field of dataclass ``cls`` (nested dataclasses flattened), except ``skip``."""
    docs = field_docs(cls)
    for f, tp in fields_of(cls):
        if f.name in skip:
            continue
        if dataclasses.is_dataclass(tp):
            add_options(parser, tp, skip)  # type: ignore[arg-type]
            continue
        default = default_of(f)
        help_text = docs.get(f.name, "").replace("%", "%%")
        inner, _ = _strip_optional(tp)
        if f.metadata.get(POSITIONAL):
            parse = converter(tp, f.name)
            if _is_list(inner):  # a list positional takes one or more words (none when it has a default)
                parser.add_argument(f.name, nargs="+" if default is dataclasses.MISSING else "*", help=help_text,
                                    metavar=f.name.upper().removesuffix("S"), default=argparse.SUPPRESS,
                                    type=_keep_suppress(converter(_list_item(inner), f.name)))
            elif default is dataclasses.MISSING:
                parser.add_argument(f.name, type=parse, help=help_text, metavar=f.name.upper())
            else:  # optional: an absent one stays unset
                parser.add_argument(f.name, nargs="?", default=argparse.SUPPRESS, help=help_text, metavar=f.name.upper(),
                                    type=_keep_suppress(parse))
            continue
        if default is dataclasses.MISSING:
            help_text += " (required)"
        elif f.default is not dataclasses.MISSING and default is not None and not isinstance(default, bool):
            help_text += f" (default: {show(default)})"
        name = flag(f.name)
        if inner is bool:
            if isinstance(default, bool):
                help_text += f" (default: {'on' if default else 'off'})"
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
            continue
        parse = converter(tp, name)
        metavar = None
        if typing.get_origin(inner) is typing.Literal:
            metavar = "{" + ",".join(str(c) for c in typing.get_args(inner)) + "}"
        if CHOICES in f.metadata:
            metavar = "{" + ",".join(f.metadata[CHOICES]) + "}"
            parse = _one_of(parse, tuple(f.metadata[CHOICES]), name)
        action = "store"
        if f.metadata.get(REPEATABLE):  # each occurrence adds its list; `none` adds nothing
            action, parse = "extend", _or_empty(parse)
        parser.add_argument(name, type=parse, default=argparse.SUPPRESS, help=help_text, metavar=metavar,
                            required=default is dataclasses.MISSING, dest=f.name, action=action)


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The options of ``cls`` (flattened, nested ones included) that the command line set: ``{field: value}``."""
    out: dict[str, Any] = {}
    for f, tp in fields_of(cls):
        if dataclasses.is_dataclass(tp):
            out.update(given(args, tp))  # type: ignore[arg-type]
        elif hasattr(args, f.name):
            out[f.name] = getattr(args, f.name)
    return out


def resolve(cls: type[C], args: argparse.Namespace, config_file: str | None = None,
            overrides: dict[str, Any] | None = None) -> tuple[C, dict[str, Any]]:
    """``(config, explicit)``: defaults < ``config_file`` < the options given on the command line < ``overrides``.

    ``explicit`` holds every value that did not come from the defaults (file and command line).
    """
    explicit = read_config_file(config_file) if config_file else {}
    explicit.update(given(args, cls))
    return build(cls, {**explicit, **(overrides or {})}), explicit
