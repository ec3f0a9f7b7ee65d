"""The layers stay apart: the method (`rewiring/`) below the tasks and the experiment machinery
(`rewiring/experiment/`), benchmarks outside the product, and no import circle anywhere.

Imports are read from the source (every `import`, lazy ones inside functions too), so a circle or a
layer breach fails here even when nothing breaks at import time.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("rewiring", "tasks", "benchmarks")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(p): p
        for pkg in PACKAGES
        for p in (REPO / pkg).rglob("*.py")
        if "__pycache__" not in p.parts
    }


MODULES = _modules()


def _target(name: str) -> str | None:
    """The project module an imported name lives in (the longest known prefix), else None."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path) -> set[str]:
    """Project modules that `module` imports anywhere in its source."""
    out: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {  # `if TYPE_CHECKING:` imports name types for annotations and never run
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test).endswith("TYPE_CHECKING")
        for stmt in block.body
        for n in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import sub` imports the submodule when there is one, else the package
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        out |= {t for n in names if (t := _target(n)) and t != module}
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _method_layer() -> dict[str, Path]:
    return {
        m: p
        for m, p in MODULES.items()
        if m.split(".")[0] == "rewiring"
        and not m.startswith("rewiring.experiment")
        and m != "rewiring.__main__"
    }


def test_the_checker_sees_lazy_imports_and_circles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    # rewiring/experiment imports the method lazily as well as at the top: both are seen
    assert any(t.startswith("rewiring.") for t in GRAPH["rewiring.__main__"])


def test_no_import_circle():
    assert _cycles(GRAPH) == []


@pytest.mark.parametrize("module", sorted(_method_layer()))
def test_the_method_imports_nothing_above_it(module):
    above = sorted(t for t in GRAPH[module] if t.split(".")[0] in ("tasks", "benchmarks") or t.startswith("rewiring.experiment"))
    assert above == [], f"{module} imports {above}"


# `tasks.asr`, "tasks/asr.py", 'tasks:prepare': a task module named in any form
_NAMES_TASKS = re.compile(r"\btasks[./:][A-Za-z_]")


@pytest.mark.parametrize("module", sorted(_method_layer()))
def test_the_method_never_names_tasks(module):
    """Not even in strings (importlib, a preload list): the import checker could not see those."""
    tree = ast.parse(MODULES[module].read_text())
    hits = [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and _NAMES_TASKS.search(node.value)
    ]
    assert hits == [], f"{module} names tasks in {hits}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.split(".")[0] in ("rewiring", "tasks")))
def test_the_product_never_imports_benchmarks(module):
    assert not [t for t in GRAPH[module] if t.split(".")[0] == "benchmarks"]
