"""mkdocs hooks: option tables generated from the real command-line parser, and pages from outside docs/.

- ``<!-- options: finetune -->`` (or ``analyze spectrum``, ...) becomes a table of that command's
  options: option, default, help. The rows come from ``pissa.cli.build_parser()``, whose help texts
  are the config dataclasses' field docstrings (the same text as ``--help``), so the table never
  drifts from the code. A command with sub-commands (``analyze``) gets a table of those.
- ``<!-- commands -->`` becomes the table of every ``pissa`` command with its one-line help.
- Sphinx roles in rendered docstrings (``:func:`~pissa.x.f```) become plain code (``f``).
- Every file in ``benchmarks/results/`` and the repository's ``CHANGELOG.md`` join the site
  (``benchmarks/results/NAME`` and ``CHANGELOG.md``), so pages link to them without copies in docs/.
"""

from __future__ import annotations

import argparse
import html
import posixpath
import re
from functools import cache
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
OUTSIDE = ["benchmarks/results", "CHANGELOG.md"]
"""Paths relative to the repository root (folders: every file in them) that become part of the site."""

OPTIONS = re.compile(r"^<!--\s*options:\s*(\w[\w -]*?)\s*-->[ \t]*$", re.M)  # alone on its line
COMMANDS = re.compile(r"^<!--\s*commands\s*-->[ \t]*$", re.M)
ROLE = re.compile(r":(?:func|class|meth|attr|data|mod|obj|exc):<code>(~?)([^<]*)</code>")
"""A Sphinx role left in a rendered docstring (mkdocstrings keeps ``:func:`x``` as text before the code)."""
DEFAULT = re.compile(r"\s*\((default: (?P<default>.*)|(?P<required>required))\)$")


@cache
def _parser() -> argparse.ArgumentParser:
    from pissa.cli import build_parser

    return build_parser()


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def _command(words: list[str]) -> argparse.ArgumentParser:
    parser = _parser()
    for i, word in enumerate(words):
        sub = _subcommands(parser)
        if sub is None or word not in sub.choices:
            known = ", ".join(sub.choices) if sub else "none"
            raise PluginError(f"options marker: 'pissa {' '.join(words[: i + 1])}' is not a command (known: {known})")
        parser = sub.choices[word]
    return parser


def _text(s: str) -> str:
    """Help text as a table cell: argparse's %% unescaped, markdown's table and emphasis characters escaped."""
    s = html.escape(s.replace("%%", "%"), quote=False)
    return re.sub(r"([|*_\[\]`\\])", r"\\\1", s)


def _help_table(parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    sub = _subcommands(parser)
    return [(a.dest, a.help or "") for a in sub._choices_actions] if sub else []


def options_table(words: list[str]) -> str:
    """The markdown table of ``pissa WORDS``'s options (or of its sub-commands)."""
    parser = _command(words)
    subs = _help_table(parser)
    if subs:
        rows = [f"| `pissa {' '.join([*words, name])}` | {_text(text)} |" for name, text in subs]
        return "\n".join(["| command | what it does |", "|---|---|", *rows])
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        text = action.help or ""
        match = DEFAULT.search(text)
        default = ""
        if match:
            text = text[: match.start()]
            default = "required" if match.group("required") else f"`{match.group('default').replace('%%', '%')}`"
        if not action.option_strings:  # a positional argument
            name = f"`{action.metavar or action.dest.upper()}`"
            default = default or ("required" if action.nargs is None else "optional")
        elif isinstance(action, argparse.BooleanOptionalAction):
            name = " / ".join(f"`{o}`" for o in action.option_strings)
        else:
            name = f"`{action.option_strings[0]}`" + (f" `{action.metavar}`" if action.metavar else "")
        rows.append(f"| {name} | {default} | {_text(text)} |")
    if not rows:
        raise PluginError(f"options marker: 'pissa {' '.join(words)}' has no options")
    return "\n".join(["| option | default | help |", "|---|---|---|", *rows])


def commands_table(page_uri: str = "commands/index.md") -> str:
    """Every ``pissa`` command, linked to its page ``commands/NAME.md`` (relative to ``page_uri``), with its help."""
    here = posixpath.dirname(page_uri) or "."
    rows = [f"| [`pissa {name}`]({posixpath.relpath(f'commands/{name}.md', here)}) | {_text(text)} |"
            for name, text in _help_table(_parser())]
    return "\n".join(["| command | what it does |", "|---|---|", *rows])


def on_files(files: Files, config) -> Files:
    for entry in OUTSIDE:
        path = ROOT / entry
        paths = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        for p in paths:
            files.append(File(p.relative_to(ROOT).as_posix(), src_dir=str(ROOT), dest_dir=config["site_dir"],
                              use_directory_urls=config["use_directory_urls"]))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    markdown = OPTIONS.sub(lambda m: options_table(m.group(1).split()), markdown)
    return COMMANDS.sub(lambda m: commands_table(page.file.src_uri), markdown)


def on_page_content(html: str, page, config, files) -> str:
    return ROLE.sub(lambda m: f"<code>{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}</code>", html)
