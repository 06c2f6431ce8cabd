"""The package's layers, read from the source of every module under src/pissa (recursively).

Subpackages import each other downwards only (:data:`ALLOWED`, the picture in docs/design.md); ``methods``
imports nothing of pissa but ``errors``; only ``cli`` imports argparse, prints, or is imported by others'
code; no private name crosses a subpackage; no import cycle between modules; no pissa import hides inside a
function; no module is over 500 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pissa

SRC = Path(pissa.__file__).parent
MAX_LINES = 500

ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "options": {"errors"},
    "methods": {"errors"},
    "optim": {"errors"},
    "runtime": {"errors"},
    "files": {"errors", "methods", "runtime"},
    "adapter": {"errors", "options", "methods", "runtime", "files"},
    "data": {"errors", "runtime"},
    "calibration": {"errors", "options", "methods", "runtime", "files", "adapter", "data"},
    "checkpoints": {"errors", "options", "methods", "runtime", "files", "adapter"},
    "inference": {"errors", "options", "methods", "runtime", "files", "adapter", "data"},
    "analysis": {"errors", "options", "methods", "runtime", "files", "adapter"},
    "training": {"errors", "options", "methods", "runtime", "files", "adapter", "data", "calibration", "inference",
                 "optim", "checkpoints", "integrations"},
    "integrations": {"errors", "options", "methods", "runtime", "files", "adapter", "data"},
    "cli": {"errors", "options", "methods", "runtime", "files", "adapter", "data", "calibration", "checkpoints",
            "inference", "analysis", "training", "integrations", "optim"},
}
"""What each top-level part of pissa may import (besides itself). The package face (``pissa/__init__.py``) and
``__main__`` may import anything."""


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in sorted(SRC.rglob("*.py"))}


def _part(module: str) -> str:
    """The top-level part of ``pissa.a.b`` (``a``); ``pissa`` itself for the face."""
    return module.split(".")[1] if module.count(".") else module


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if MODULES[module].name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[ast.stmt, str, list[str], bool]]:
    """``(node, imported module, names, at top level)`` for every pissa import of ``module``."""
    tree = ast.parse(MODULES[module].read_text())
    top = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            if target.split(".")[0] == "pissa":
                names = [a.name for a in node.names]
                # `from pissa.x import y` where y is a module: the edge goes to pissa.x.y
                subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
                found += [(node, t, [], id(node) in top) for t in subs]
                rest = [n for n in names if f"{target}.{n}" not in MODULES]
                if rest:
                    found.append((node, target, rest, id(node) in top))
        elif isinstance(node, ast.Import):
            found += [(node, a.name, [], id(node) in top) for a in node.names if a.name.split(".")[0] == "pissa"]
    return found


def test_every_module_is_read() -> None:
    assert len(MODULES) > 60 and {"pissa.methods.svd", "pissa.cli", "pissa.adapter.attach"} <= set(MODULES)


@pytest.mark.parametrize("module", [m for m in MODULES if m not in ("pissa", "pissa.__main__")])
def test_imports_point_down_and_stay_public(module: str) -> None:
    part = _part(module)
    for node, target, names, at_top in _imports(module):
        assert at_top, f"{module} imports {target} inside a function (line {node.lineno}): import at the top"
        other = _part(target) if target != "pissa" else "pissa"
        assert other != "pissa", f"{module} imports the package face; import {names} from their modules"
        if other != part:
            assert other in ALLOWED[part], f"{module} ({part}) imports {target} ({other}): {part} may import {ALLOWED[part]}"
            private = [n for n in names if n.startswith("_")]
            assert not private, f"{module} imports private {private} from another part, {target}"


def test_methods_import_nothing_of_pissa_but_errors() -> None:
    for module in (m for m in MODULES if _part(m) == "methods"):
        for _, target, _, _ in _imports(module):
            assert _part(target) in ("methods", "errors"), f"{module} imports {target}"


def test_no_module_imports_another_in_a_cycle() -> None:
    graph = {m: {t if t in MODULES else t.rpartition(".")[0] for _, t, _, _ in _imports(m)} - {m} for m in MODULES}
    graph = {m: {t for t in targets if t in MODULES and (MODULES[t].name != "__init__.py" or t == "pissa.cli")}
             for m, targets in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def _main_block(tree: ast.Module) -> set[int]:
    """Line numbers inside ``if __name__ == "__main__":`` blocks."""
    lines: set[int] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            lines |= set(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    return lines


@pytest.mark.parametrize("module", [m for m in MODULES if _part(m) != "cli" and m != "pissa.__main__"])
def test_only_the_command_line_knows_argparse_and_prints(module: str) -> None:
    tree = ast.parse(MODULES[module].read_text())
    main = _main_block(tree)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            assert "argparse" not in names, f"{module} imports argparse (line {node.lineno}): options belong to pissa.cli"
            assert not any(n.startswith("pissa.cli") for n in names), f"{module} imports pissa.cli"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
            assert node.lineno in main, f"{module} prints (line {node.lineno}): return values or log to the 'pissa' logger"


@pytest.mark.parametrize("module", list(MODULES))
def test_no_module_is_over_the_line_limit(module: str) -> None:
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines (at most {MAX_LINES}): split it by concern"
