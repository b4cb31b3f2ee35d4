"""The house in order (issue 10): module sizes, one-way imports, the store's private names
kept private, a docstring on every module.

Every check reads the source with ``ast`` and runs none of it.  Each is a function over a
package directory, so the tests at the end can give it a tiny broken package in tmp_path and
see it complain: a check that cannot fail checks nothing.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "nekko_sm"
MAX_LINES = 450


@dataclass(frozen=True)
class Module:
    name: str  # dotted: nekko_sm.store.locks
    path: Path
    is_package: bool  # an __init__.py
    tree: ast.Module


def modules(package: Path) -> dict[str, Module]:
    """Every module of ``package`` (a directory with an __init__.py), by dotted name."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        found[name] = Module(name, path, is_package, ast.parse(path.read_text(), str(path)))
    return found


def _where(m: Module, node: ast.AST, package: Path) -> str:
    return f"{m.path.relative_to(package.parent)}:{getattr(node, 'lineno', 0)}"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


# What can hold a statement (an expression cannot: no need to look inside one).
_BLOCKS = (ast.stmt, ast.excepthandler, getattr(ast, "match_case", ast.excepthandler))


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth (in functions too), but not those only a type
    checker runs (the body of ``if TYPE_CHECKING:``)."""
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(c for c in ast.iter_child_nodes(node) if isinstance(c, _BLOCKS))


def _base(m: Module | None, node: ast.ImportFrom) -> str | None:
    """The module ``from X import ...`` names, relative imports resolved (None: not ours)."""
    if node.level == 0:
        return node.module
    if m is None:
        return None
    parts = m.name.split(".") if m.is_package else m.name.split(".")[:-1]
    if node.level > 1:
        parts = parts[: -(node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


# --------------------------------------------------------------------------------------------
# (a) size


def long_modules(package: Path, limit: int = MAX_LINES) -> list[str]:
    """``"nekko_sm/api.py: 688 lines"`` for each module over ``limit`` lines."""
    out = []
    for m in modules(package).values():
        n = len(m.path.read_text().splitlines())
        if n > limit:
            out.append(f"{m.path.relative_to(package.parent)}: {n} lines")
    return out


# --------------------------------------------------------------------------------------------
# (b) import cycles


def import_graph(package: Path) -> dict[str, dict[str, str]]:
    """module -> {module of the package it imports: where (file:line)}."""
    mods = modules(package)
    graph: dict[str, dict[str, str]] = {name: {} for name in mods}
    for m in mods.values():
        for node in _imports(m.tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = _base(m, node)
                if base is None:
                    continue
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names
                ]
            for target in targets:
                while target and target not in mods:  # import a.b.c of a module a.b
                    target = target.rpartition(".")[0]
                if target and target != m.name:
                    graph[m.name].setdefault(target, _where(m, node, package))
    return graph


def _components(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def import_cycles(package: Path) -> list[str]:
    """One shortest cycle per group of modules that import each other, as
    ``"a -> b (a.py:3) -> a (b.py:9)"``: each arrow names the import that makes it."""
    graph = import_graph(package)
    out = []
    for comp in _components(graph):
        start, members = comp[0], set(comp)
        parent: dict[str, str] = {start: ""}
        queue = deque([start])
        while queue:
            u = queue.popleft()
            if start in graph[u]:
                path = [u]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                path = [*reversed(path), start]
                out.append(
                    path[0] + "".join(f" -> {b} ({graph[a][b]})" for a, b in zip(path, path[1:]))
                )
                break
            for w in sorted(graph[u]):
                if w in members and w not in parent:
                    parent[w] = u
                    queue.append(w)
    return out


# --------------------------------------------------------------------------------------------
# (c) the store's private names


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_store_uses(package: Path, others: Iterable[Path] = ()) -> list[str]:
    """Every import of an underscore name or module of ``PACKAGE.store`` outside the store,
    in the package's other modules and in the files ``others`` (tests, bench); and in the
    package, every ``module._name`` of a store module it imported as a name.  (Tests may
    still poke a private attribute of a store module they imported: white-box tests do.)"""
    store = f"{package.name}.store"
    mods = modules(package)

    def in_store(name: str | None) -> bool:
        return name is not None and (name == store or name.startswith(store + "."))

    files: list[tuple[Module | None, Path, ast.Module]] = [
        (m, m.path, m.tree) for m in mods.values() if not in_store(m.name)
    ]
    files += [(None, p, ast.parse(p.read_text(), str(p))) for p in others]
    out = []
    for m, path, tree in files:
        where = str(path.relative_to(package.parent)) if m else str(path)
        bound: dict[str, str] = {}  # local name -> the store module it is
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                pairs = [(a.name, a.asname, a.name.rpartition(".")[2]) for a in node.names]
            else:
                base = _base(m, node)
                if base is None:
                    continue
                pairs = [(f"{base}.{a.name}", a.asname or a.name, a.name) for a in node.names]
            for full, local, shown in pairs:
                if not in_store(full) and not in_store(full.rpartition(".")[0]):
                    continue
                if any(_private(p) for p in full[len(store) :].split(".")):
                    out.append(f"{where}:{node.lineno}: {shown} from {full.rpartition('.')[0]}")
                elif local and (f"{full}" in mods or full == store):
                    bound[local] = full
        if not bound or m is None:
            continue
        assigned = {
            n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
        }
        assigned |= {
            a.arg
            for n in ast.walk(tree)
            if isinstance(n, ast.arguments)
            for a in [*n.posonlyargs, *n.args, *n.kwonlyargs]
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in bound
                and node.value.id not in assigned
                and _private(node.attr)
            ):
                out.append(f"{where}:{node.lineno}: {node.attr} of {bound[node.value.id]}")
    return sorted(out, key=lambda line: (line.split(":")[0], int(line.split(":")[1])))


# --------------------------------------------------------------------------------------------
# (d) docstrings


def undocumented(package: Path) -> list[str]:
    """Each module without a module docstring."""
    return [
        str(m.path.relative_to(package.parent))
        for m in modules(package).values()
        if not (ast.get_docstring(m.tree) or "").strip()
    ]


# --------------------------------------------------------------------------------------------
# the house


def test_no_module_is_over_450_lines():
    found = long_modules(PACKAGE)
    assert not found, f"over {MAX_LINES} lines, split them:\n" + "\n".join(found)


def test_no_import_cycle():
    found = import_cycles(PACKAGE)
    assert not found, "modules that import each other:\n" + "\n".join(found)


def test_nothing_outside_the_store_imports_its_private_names():
    others = [p for d in ("tests", "bench") for p in sorted((ROOT / d).rglob("*.py"))]
    found = private_store_uses(PACKAGE, others)
    assert not found, "make these public in the store:\n" + "\n".join(found)


def test_every_module_has_a_docstring():
    found = undocumented(PACKAGE)
    assert not found, "no module docstring:\n" + "\n".join(found)


# --------------------------------------------------------------------------------------------
# each check fails where it should (tiny packages in tmp_path)


def package(tmp_path: Path, files: dict[str, str]) -> Path:
    """A package ``nekko_sm`` in tmp_path with ``files`` (path -> text), each module given a
    docstring unless its text starts with ``!`` (which is dropped)."""
    root = tmp_path / "nekko_sm"
    for name, text in {"__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text[1:] if text.startswith("!") else f'"""{name}."""\n{text}')
    return root


def test_a_long_module_is_found(tmp_path):
    pkg = package(tmp_path, {"big.py": "x = 1\n" * 451, "fits.py": "x = 1\n" * 449})
    assert long_modules(pkg) == ["nekko_sm/big.py: 452 lines"]  # 451 and the docstring


def test_a_cycle_is_found_through_a_function_level_import(tmp_path):
    pkg = package(
        tmp_path,
        {
            "a.py": "from nekko_sm import b\n",
            "b.py": "def f():\n    import nekko_sm.a\n",
            "c.py": "from nekko_sm import a\n",  # imports into the cycle, is not in it
        },
    )
    assert import_cycles(pkg) == [
        "nekko_sm.a -> nekko_sm.b (nekko_sm/a.py:2) -> nekko_sm.a (nekko_sm/b.py:3)"
    ]


def test_a_cycle_of_relative_imports_in_a_subpackage_is_found(tmp_path):
    pkg = package(
        tmp_path,
        {
            "store/__init__.py": "from .gc import sweep\n",
            "store/gc.py": "from ..service import Service\n",
            "service.py": "from nekko_sm.store import Store\n",
        },
    )
    assert import_cycles(pkg) == [
        (
            "nekko_sm.service -> nekko_sm.store (nekko_sm/service.py:2)"
            " -> nekko_sm.store.gc (nekko_sm/store/__init__.py:2)"
            " -> nekko_sm.service (nekko_sm/store/gc.py:2)"
        )
    ]


def test_imports_only_a_type_checker_runs_make_no_cycle(tmp_path):
    pkg = package(
        tmp_path,
        {
            "a.py": "import nekko_sm.b\n",
            "b.py": "import typing\nif typing.TYPE_CHECKING:\n    from nekko_sm.a import A\n"
            "else:\n    import json\n",
            "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n",
        },
    )
    assert import_graph(pkg)["nekko_sm.b"] == {}
    assert import_cycles(pkg) == []


@pytest.mark.parametrize(
    "text, found",
    [  # found: line (after the docstring) and what
        (
            "from nekko_sm.store.locks import _FileLock, FileLock\n",
            "2: _FileLock from nekko_sm.store.locks",
        ),
        ("from nekko_sm.store import Store, _key\n", "2: _key from nekko_sm.store"),
        ("from .store import _key\n", "2: _key from nekko_sm.store"),
        ("from nekko_sm.store._util import helper\n", "2: helper from nekko_sm.store._util"),
        ("import nekko_sm.store._util\n", "2: _util from nekko_sm.store"),
        (
            "def f():\n    from nekko_sm.store.layout import _write_atomic\n",
            "3: _write_atomic from nekko_sm.store.layout",
        ),
        (
            "from nekko_sm import store\nstore._write_atomic(1)\n",
            "3: _write_atomic of nekko_sm.store",
        ),
        (
            "from nekko_sm.store import locks as lk\nlk._FileLock()\n",
            "3: _FileLock of nekko_sm.store.locks",
        ),
    ],
)
def test_a_private_store_name_used_outside_the_store_is_found(tmp_path, text, found):
    store = {
        "store/__init__.py": "",
        "store/locks.py": "",
        "store/layout.py": "",
        "store/_util.py": "",
        "store/index.py": "from .locks import _FileLock\n",
    }
    pkg = package(tmp_path, {**store, "service.py": text})
    assert private_store_uses(pkg) == [f"nekko_sm/service.py:{found}"]


def test_public_store_names_and_the_store_itself_are_fine(tmp_path):
    pkg = package(
        tmp_path,
        {
            "store/__init__.py": "from .locks import _FileLock\n__version__ = 1\n",
            "store/locks.py": "",
            "service.py": "from nekko_sm.store import Store, FileLock, __version__\n"
            "import nekko_sm.store as st\nst.Store\nst.__doc__\n",
            "other.py": "from nekko_sm import store\ndef f(store):\n    return store._x\n",
            "sources/hf.py": "from ..store.locks import FileLock\nfrom nekko_sm.egress import _deny\n",
            "egress.py": "",
        },
    )
    assert private_store_uses(pkg) == []
    bad = tmp_path / "test_x.py"
    bad.write_text("from nekko_sm.store.locks import _FileLock\n")
    poke = tmp_path / "test_poke.py"  # a white-box test: allowed
    poke.write_text("from nekko_sm.store import locks\nlocks._FileLock\n")
    assert private_store_uses(pkg, [bad, poke]) == [f"{bad}:1: _FileLock from nekko_sm.store.locks"]


def test_a_module_without_a_docstring_is_found(tmp_path):
    pkg = package(
        tmp_path,
        {
            "bare.py": "!x = 1\n",
            "comment.py": '!# a comment is not a docstring\nx = """late"""\n',
            "empty.py": '!""" """\n',
            "sub/__init__.py": "!",
            "fine.py": "x = 1\n",
        },
    )
    assert undocumented(pkg) == [
        "nekko_sm/bare.py",
        "nekko_sm/comment.py",
        "nekko_sm/empty.py",
        "nekko_sm/sub/__init__.py",
    ]
