"""Lint and type checks as tests, so the README's test command (and CI) runs them: ruff and mypy,
configured in pyproject.toml, must report nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_ruff_reports_nothing() -> None:
    result = _run(str(BIN / "ruff"), "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_reports_nothing() -> None:
    result = _run(str(BIN / "mypy"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_two_test_modules_share_a_name() -> None:
    """pytest imports test modules by their basename (no packages under tests/): two of one name break the
    collection of the whole suite, though each folder passes alone."""
    names = [p.name for p in Path(__file__).parents[1].rglob("test_*.py")]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []
