"""The package's shape: no import cycles, no reaching into private names, modules a reader can
take in at once, and docs/architecture.md naming every module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "wasearch"
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import in the file, at any depth
    (imports inside functions tie modules together as much as top-level ones)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            found.extend((s, []) for s in submodules)
            rest = [n for n in names if f"{target}.{n}" not in modules]
            if target in modules and rest:
                found.append((target, rest))
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names if a.name in modules)
    return [(t, n) for t, n in found if t != name]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: {t for t, _ in _imports(m, p, modules)} for m, p in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module, leaving out a package and its
    own children (an ``__init__`` re-exporting what its modules define is not a cycle)."""
    order, low, stack, on_stack, comps = {}, {}, [], set(), []

    def visit(v: str) -> None:
        order[v] = low[v] = len(order)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in order:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], order[w])
        if low[v] == order[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in graph:
        if v not in order:
            visit(v)
    return [c for c in comps if not all(x == c[0] or x.startswith(c[0] + ".") for x in c)]


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "p": {"p.x"}, "p.x": {"p"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_no_module_imports_private_names_of_another():
    modules = _modules()
    bad = []
    for name, path in modules.items():
        for target, names in _imports(name, path, modules):
            bad += [f"{name} imports {target}.{n}" for n in names if n.startswith("_")]
    assert bad == []


@pytest.mark.parametrize("name", sorted(_modules()))
def test_module_is_small_enough_to_read_at_once(name):
    lines = len(_modules()[name].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{name}: {lines} lines; split it by responsibility"


def test_architecture_doc_names_every_module():
    """Each module by its path below wasearch/ (``search/base.py``), or by its file name where
    that name is unique in the package (``splits.py`` in the data table)."""
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    files = [
        p.relative_to(PACKAGE)
        for p in _modules().values()
        if p.name != "__init__.py" and not p.name.startswith("_") and p.name != "testing.py"
    ]
    names = [f.name for f in files]
    missing = [
        f.as_posix()
        for f in files
        if f.as_posix() not in text and not (names.count(f.name) == 1 and f.name in text)
    ]
    assert missing == [], f"docs/architecture.md does not mention {missing}"
