"""The architecture, enforced: every module of ``src/gatekeeper`` lives in one room, and
imports point one way, down the house:

    cli > ui > http > runtime > delivery > store > engine > rules > expr > ground

A room may import itself and any room below it, never one above. Every import counts,
wherever it is written: at module level, inside a function (a lazily imported room is still
a dependency) and under ``if TYPE_CHECKING:``. Module-level imports (the ones that run when
the module is imported) form no cycle. ``gatekeeper check`` and friends start without
aiohttp, and every package says in its ``__init__`` docstring what it owns.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import gatekeeper

PACKAGE = Path(gatekeeper.__file__).resolve().parent

ROOMS = ("cli", "ui", "http", "runtime", "delivery", "store", "engine", "rules", "expr", "ground")
"""Highest first: a room may import its own modules and those of any room after it."""

GROUND = frozenset({"clock", "problems", "config", "yamlsource", "schemas", "jsonwire", "metrics"})
"""The top-level modules (and the ``schemas`` package) every room may use."""


@dataclass(frozen=True)
class Import:
    """One import statement's target inside gatekeeper: who imports what, and where."""

    source: str  # importing module, e.g. "gatekeeper.runtime.daemon"
    target: str  # imported module, e.g. "gatekeeper.store.sqlite"
    path: Path
    line: int
    text: str  # the statement as written
    module_level: bool  # runs when ``source`` is imported (not in a function or TYPE_CHECKING)


def module_name(path: Path) -> str:
    """``gatekeeper.store.sqlite`` for ``.../gatekeeper/store/sqlite.py``."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def room_of(module: str) -> str:
    """The room a gatekeeper module belongs to. Fails on a module no room claims."""
    parts = module.split(".")
    if parts == ["gatekeeper"]:
        return "ground"  # the package itself: only ``__version__``
    if parts[1] == "__main__":
        return "cli"  # ``python -m gatekeeper`` is the command
    if parts[1] in GROUND:
        return "ground"
    if parts[1] in ROOMS:
        return parts[1]
    raise AssertionError(f"{module}: no room claims this module; add it to test_layers.py")


def is_type_checking(test: ast.expr) -> bool:
    """``if TYPE_CHECKING:`` or ``if typing.TYPE_CHECKING:``."""
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def resolve(source: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names, relative imports included."""
    if not node.level:
        return node.module or ""
    base = source.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(source: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import of a gatekeeper module that ``source`` writes, wherever it stands."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    found: list[Import] = []

    def add(node: ast.stmt, target: str, module_level: bool) -> None:
        if target == "gatekeeper" or target.startswith("gatekeeper."):
            statement = " ".join(line.strip() for line in lines[node.lineno - 1 : node.end_lineno])
            found.append(Import(source, target, path, node.lineno, statement, module_level))

    def visit(body: list[ast.stmt], module_level: bool) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(node, alias.name, module_level)
            elif isinstance(node, ast.ImportFrom):
                base = resolve(source, path.name == "__init__.py", node)
                for alias in node.names:
                    # ``from gatekeeper import store`` imports the module gatekeeper.store.
                    submodule = f"{base}.{alias.name}"
                    add(node, submodule if submodule in modules else base, module_level)
            elif isinstance(node, ast.If) and is_type_checking(node.test):
                visit(node.body, False)
                visit(node.orelse, module_level)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                visit(node.body, False)
            elif isinstance(node, ast.ClassDef):
                visit(node.body, module_level)
            else:
                for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                    inner = getattr(node, field, None)
                    if isinstance(inner, list):
                        visit([n for n in inner if isinstance(n, ast.stmt)], module_level)
                        for n in inner:
                            if isinstance(n, ast.ExceptHandler | ast.match_case):
                                visit(n.body, module_level)

    visit(ast.parse(text, filename=str(path)).body, True)
    return found


def all_imports() -> list[Import]:
    modules = all_modules()
    return [i for name, path in modules.items() for i in imports_of(name, path, modules)]


def upward(imports: list[Import]) -> list[str]:
    """One line per import of a room above the importer's: ``file:line: room -> room: text``."""
    rank = {room: n for n, room in enumerate(ROOMS)}
    wrong = []
    for imp in imports:
        mine, theirs = room_of(imp.source), room_of(imp.target)
        if rank[theirs] < rank[mine]:
            where = imp.path.relative_to(PACKAGE.parents[1])
            wrong.append(f"{where}:{imp.line}: {mine} imports {theirs}: {imp.text}")
    return wrong


def cycles(imports: list[Import]) -> list[list[str]]:
    """The import cycles among module-level imports (each a strongly connected component of
    more than one module, or a module importing itself), as sorted module lists."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        if imp.module_level:
            graph.setdefault(imp.source, set()).add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_every_module_belongs_to_a_room() -> None:
    for name in all_modules():
        assert room_of(name) in ROOMS


def test_the_scan_sees_lazy_and_type_checking_imports(tmp_path: Path) -> None:
    source = tmp_path / "probe.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "import gatekeeper.clock\n"
        "if TYPE_CHECKING:\n"
        "    from gatekeeper.http import app\n"
        "def serve() -> None:\n"
        "    try:\n"
        "        import gatekeeper.runtime.daemon\n"
        "    except ImportError:\n"
        "        pass\n",
        encoding="utf-8",
    )
    found = imports_of("gatekeeper.rules.probe", source, all_modules())
    assert [(i.target, i.line, i.module_level) for i in found] == [
        ("gatekeeper.clock", 2, True),
        ("gatekeeper.http.app", 4, False),
        ("gatekeeper.runtime.daemon", 7, False),
    ]


def test_no_room_imports_a_room_above_it() -> None:
    wrong = upward(all_imports())
    assert not wrong, "imports that point up the house:\n" + "\n".join(wrong)


def test_an_upward_import_is_named_by_file_and_line() -> None:
    planted = Import(
        "gatekeeper.engine.evaluate",
        "gatekeeper.runtime.daemon",
        PACKAGE / "engine" / "evaluate.py",
        7,
        "from gatekeeper.runtime.daemon import Daemon",
        True,
    )
    assert upward([planted]) == [
        "src/gatekeeper/engine/evaluate.py:7: engine imports runtime: "
        "from gatekeeper.runtime.daemon import Daemon"
    ]


def test_no_import_cycles() -> None:
    found = cycles(all_imports())
    assert not found, "import cycles (module-level imports):\n" + "\n".join(
        " <-> ".join(c) for c in found
    )


def test_a_cycle_is_found() -> None:
    def edge(source: str, target: str) -> Import:
        return Import(source, target, PACKAGE / "x.py", 1, "", True)

    chain = [edge("gatekeeper.a", "gatekeeper.b"), edge("gatekeeper.b", "gatekeeper.a")]
    lazy = Import("gatekeeper.c", "gatekeeper.a", PACKAGE / "x.py", 1, "", False)
    assert cycles([*chain, lazy, edge("gatekeeper.a", "gatekeeper.c")]) == [
        ["gatekeeper.a", "gatekeeper.b"]
    ]


def test_the_cli_starts_without_aiohttp() -> None:
    probe = "import gatekeeper.cli.main, sys; assert 'aiohttp' not in sys.modules, 'aiohttp'"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


def test_every_package_says_what_it_owns() -> None:
    for init in sorted(PACKAGE.rglob("__init__.py")):
        docstring = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert docstring, f"{init.relative_to(PACKAGE.parents[1])} has no docstring"
        if init.parent.name in ROOMS:
            assert "May import" in docstring, f"{init.parent.name}: say what it may import"
