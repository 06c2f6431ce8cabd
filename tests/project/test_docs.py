"""The documentation builds, and every ``pissa`` command line it shows parses with the real parser.

- ``mkdocs build --strict`` (broken links, a bad options marker, a missing API name: all fail it).
- Every ``pissa ...`` line in README.md and docs/**/*.md (```bash and ```console blocks; after ``$ `` in
  console blocks) goes through ``pissa.cli.build_parser().parse_args``. Handled: ``.venv/bin/pissa``,
  ``python -m pissa`` and ``torchrun ... -m pissa`` (the part after ``-m pissa``), ``\\`` continuations,
  ``#`` comments, environment-variable prefixes, pipes and ``&&`` chains.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pissa.cli import build_parser
from pissa.errors import PissaError

ROOT = Path(__file__).resolve().parents[2]
MKDOCS = Path(sys.executable).parent / "mkdocs"
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```", re.M | re.S)
OPERATORS = {"|", "||", "&", "&&", ";", ";;", "(", ")", "<", ">", ">>", "2>", "&>"}


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def shell_lines(text: str) -> list[str]:
    """The command lines of the ```bash / ```console blocks of a markdown text, continuations joined."""
    lines: list[str] = []
    for block in FENCE.finditer(text):
        if block.group("lang") not in ("bash", "console", "sh", "shell"):
            continue
        console = block.group("lang") == "console"
        pending = ""
        for raw in block.group("body").splitlines():
            line = raw.strip()
            if not pending and console:
                if not line.startswith("$ "):
                    continue  # output
                line = line[2:]
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            lines.append(pending + line)
            pending = ""
        if pending:
            lines.append(pending)
    return lines


def _is_pissa(tokens: list[str], i: int) -> bool:
    word = tokens[i]
    if word == "pissa" and i > 0 and tokens[i - 1] == "-m":
        return True  # python -m pissa, torchrun ... -m pissa
    return (word == "pissa" or word.endswith("/pissa")) and (i == 0 or tokens[i - 1] in OPERATORS or "=" in tokens[i - 1])


def pissa_argvs(line: str) -> list[list[str]]:
    """The argument lists of the pissa invocations in one shell line (``[]`` when it runs none)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    tokens = list(lexer)
    argvs, i = [], 0
    while i < len(tokens):
        if _is_pissa(tokens, i):
            j = i + 1
            while j < len(tokens) and tokens[j] not in OPERATORS:
                j += 1
            argvs.append(tokens[i + 1 : j])
            i = j
        i += 1
    return argvs


def documented_commands() -> list[tuple[str, list[str]]]:
    out = []
    for path in doc_files():
        for line in shell_lines(path.read_text()):
            out += [(f"{path.relative_to(ROOT)}: {line}", argv) for argv in pissa_argvs(line)]
    return out


def test_the_extractor_handles_prefixes_continuations_and_torchrun() -> None:
    text = (
        "```bash\n"
        "OMP_NUM_THREADS=1 .venv/bin/pissa finetune --rank 8   # a comment --bogus\n"
        "torchrun --nproc_per_node 2 -m pissa calibrate \\\n    --samples 4 --out s.safetensors\n"
        "printf 'x' | .venv/bin/pissa generate --raw && echo done\n"
        "vllm serve m --lora-modules mine=runs/peft\n"
        "```\n"
        "```console\n$ pissa export a --out b\nwrote b\n```\n"
    )
    argvs = [argv for line in shell_lines(text) for argv in pissa_argvs(line)]
    assert argvs == [
        ["finetune", "--rank", "8"],
        ["calibrate", "--samples", "4", "--out", "s.safetensors"],
        ["generate", "--raw"],
        ["export", "a", "--out", "b"],
    ]


def test_every_documented_command_line_parses() -> None:
    commands = documented_commands()
    assert len(commands) > 20, f"only {len(commands)} pissa command lines found in README.md and docs/"
    parser = build_parser()
    failures = []
    for where, argv in commands:
        try:
            parser.parse_args(argv)
        except PissaError as e:
            failures.append(f"{where}\n    -> {e}")
        except SystemExit as e:  # --help prints and exits 0
            if e.code:
                failures.append(f"{where}\n    -> exit {e.code}")
    assert not failures, "documented command lines that do not parse:\n" + "\n".join(failures)


def test_the_docs_site_builds_strict(tmp_path: Path) -> None:
    if not MKDOCS.exists():
        pytest.fail(f"{MKDOCS} is missing: install the docs extra (bash scripts/setup.sh)")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run([str(MKDOCS), "build", "--strict", "-d", str(tmp_path / "site")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "commands" / "finetune" / "index.html").is_file()


def test_the_readme_stays_an_overview() -> None:
    """At most 12 KB, the two set-up commands near the top; the details live in docs/."""
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= 12 * 1024, f"README.md is {len(text.encode())} bytes; move details into docs/"
    top = text.splitlines()[:15]
    setup = "bash scripts/setup.sh && "
    for command in (setup + ".venv/bin/pissa finetune", setup + ".venv/bin/python -m pytest -q"):
        assert any(line.startswith(command) for line in top), f"README.md's first lines lack {command!r}"
