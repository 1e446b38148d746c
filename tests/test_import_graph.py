"""docs/design.md "Boundaries": the differ's modules form no import cycle.

A cycle is how a package starts needing "split from X, which re-exports" modules and imports
hidden inside functions. This reads every module of difftest/ with `ast` (nothing is imported, so
a cycle cannot hide behind import order), follows `import difftest.x` / `from difftest.x import y`
/ `from difftest import x` at any depth. Imports inside functions and under `if TYPE_CHECKING:`
count too: they postpone a cycle or hide it from the interpreter, but the two modules still
depend on each other (the old pair.py <-> conformance.py cycle was a TYPE_CHECKING one).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "difftest"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(tree: ast.AST, modules: set[str], here: str, is_package: bool) -> set[str]:
    """Modules of the package that `tree` imports (the most specific existing module name)."""
    found: set[str] = set()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE and (m := resolve(alias.name)):
                    found.add(m)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here if is_package else here.rpartition(".")[0]
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            if base.split(".")[0] == PACKAGE:
                for alias in node.names:  # `from difftest import x`: x may be a module, else base is
                    if m := resolve(f"{base}.{alias.name}"):
                        found.add(m)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(here)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, for every module under root/difftest."""
    files = sorted((root / PACKAGE).rglob("*.py"))
    names = {f: _module_name(f, root) for f in files}
    modules = set(names.values())
    return {
        names[f]: _imports(ast.parse(f.read_text()), modules, names[f], f.name == "__init__.py")
        for f in files
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (iterative DFS with colours)."""
    colour: dict[str, int] = dict.fromkeys(graph, 0)  # 0 new, 1 on the stack, 2 done
    for start in sorted(graph):
        if colour[start]:
            continue
        stack: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        path = [start]
        colour[start] = 1
        while stack:
            node, todo = stack[-1]
            if not todo:
                colour[node] = 2
                stack.pop()
                path.pop()
                continue
            nxt = todo.pop(0)
            if colour.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if colour.get(nxt) == 0:
                colour[nxt] = 1
                path.append(nxt)
                stack.append((nxt, sorted(graph.get(nxt, ()))))
    return None


def test_difftest_has_no_import_cycle() -> None:
    graph = import_graph(ROOT)
    assert len(graph) > 20  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize(
    ("sources", "cycle"),
    [
        ({"a": "import difftest.b", "b": "from difftest.c import x", "c": "from difftest import a"}, True),
        ({"a": "import difftest.b", "b": "def f():\n    from difftest import a"}, True),  # deferred: still a cycle
        ({"a": "import difftest.b", "b": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import difftest.a"}, True),
        ({"a": "from . import b", "b": "from .a import x"}, True),  # relative imports
        ({"a": "import difftest.b", "b": "import json"}, False),
    ],
)  # fmt: skip
def test_cycle_finder_on_small_graphs(tmp_path: Path, sources: dict[str, str], cycle: bool) -> None:
    """The checker itself: it must find real cycles (else the test above proves nothing)."""
    pkg = tmp_path / PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name, src in sources.items():
        (pkg / f"{name}.py").write_text(src + "\n")
    assert (find_cycle(import_graph(tmp_path)) is not None) == cycle
