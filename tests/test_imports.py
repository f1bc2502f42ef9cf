"""The package's import graph: no cycle anywhere, layers that point one way, every train module importable alone.

Edge rule (what `module_imports` counts), chosen so that the graph is the one Python executes:
- every `import a.b` and `from a.b import c` in the file counts, at module level and inside functions alike: a
  deferred import only hides a cycle until the function first runs (it is still an arrow between the modules,
  and the other half of the cycle may be imported first elsewhere);
- imports under `if TYPE_CHECKING:` do not count for the cycle test: they never run. They do count for the
  layering test below, because an annotation-only arrow is still a component knowing its owner — the arrows
  from train/build.py and train/resume.py back to train/trainer.py were exactly of that kind;
- `from pkg import name` points at the submodule `pkg.name` when that file exists, else at `pkg` (its
  `__init__`); the implicit import of every parent package is not an edge (it is made by every import and
  would tie each module to its package's `__init__` without telling anything).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "selmix_dist"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    """Every module of selmix_dist: dotted name → file."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, type_checking: bool):
    """(node, under TYPE_CHECKING) for every Import / ImportFrom anywhere in the tree."""
    def visit(node: ast.AST, guarded: bool):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, guarded
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from visit(child, True)
            for child in node.orelse:
                yield from visit(child, guarded)
            return
        for child in ast.iter_child_nodes(node):
            yield from visit(child, guarded)

    for node, guarded in visit(tree, False):
        if type_checking or not guarded:
            yield node


def module_imports(name: str, path: Path, modules: dict[str, Path], *, type_checking: bool) -> set[str]:
    """The selmix_dist modules that `name` imports, by the edge rule of this file's docstring."""
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in _imports(ast.parse(path.read_text(), str(path)), type_checking):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                # `import a.b.c` binds and runs a.b.c; the longest prefix that is one of our modules.
                for n in range(len(parts), 0, -1):
                    if ".".join(parts[:n]) in modules:
                        targets.add(".".join(parts[:n]))
                        break
            continue
        if node.level:  # relative: from the package of `name`
            base = name.split(".") if is_package else name.split(".")[:-1]
            base = base[:len(base) - node.level + 1]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        if source not in modules:
            continue
        for alias in node.names:
            sub = f"{source}.{alias.name}"
            targets.add(sub if sub in modules else source)
    targets.discard(name)
    return targets


def import_graph(*, type_checking: bool) -> dict[str, set[str]]:
    modules = all_modules()
    return {name: module_imports(name, path, modules, type_checking=type_checking) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle (a → … → a) per strongly connected component of more than one module (Tarjan), from the
    component's first module; `strongly_connected` lists every module of each."""
    return [_cycle_through(graph, set(c)) for c in strongly_connected(graph)]


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module, each sorted (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return components


def _cycle_through(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest path from the component's first module back to itself, inside the component (breadth first)."""
    start = min(component)
    parent = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, v, start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in its own component {sorted(component)}")


def _names(graph: dict[str, set[str]]) -> str:
    """Each cycle, and every module caught in it (its strongly connected component)."""
    return "; ".join(f"{' → '.join(_cycle_through(graph, set(c)))} (modules in this cycle: {', '.join(c)})"
                     for c in strongly_connected(graph))


# ----------------------------------------------------------------- the walker on hand-made graphs


def test_find_cycles_names_each_cycle_and_ignores_a_dag():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) == []
    assert find_cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b", "a"]]
    # two separate cycles, one of three modules with a chord that is not on the shortest way back
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "x": {"y"}, "y": {"x", "a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["x", "y", "x"]]


def test_module_imports_counts_function_level_and_skips_type_checking(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("from typing import TYPE_CHECKING\n"
                   "import selmix_dist.core.rng\n"
                   "from selmix_dist.train import trainer\n"
                   "from selmix_dist.core import head_tail_masks\n"
                   "if TYPE_CHECKING:\n    from selmix_dist.report import x\n"
                   "def f():\n    from selmix_dist.atomic import y\n")
    modules = all_modules()
    got = module_imports("selmix_dist.train.m", src, modules, type_checking=False)
    assert got == {"selmix_dist.core.rng", "selmix_dist.train.trainer", "selmix_dist.core", "selmix_dist.atomic"}
    got = module_imports("selmix_dist.train.m", src, modules, type_checking=True)
    assert "selmix_dist.report" in got


def test_relative_imports_resolve_against_the_package(tmp_path):
    (tmp_path / "pkg").mkdir()
    init = tmp_path / "pkg" / "__init__.py"
    init.write_text("from .trainer import Trainer\nfrom . import build\n")
    leaf = tmp_path / "pkg" / "leaf.py"
    leaf.write_text("from ..core import rng\nfrom .rundir import RunDir\nfrom . import nothing_here\n")
    modules = all_modules()
    assert module_imports("selmix_dist.train", init, modules, type_checking=False) == {
        "selmix_dist.train.trainer", "selmix_dist.train.build"}
    assert module_imports("selmix_dist.train.leaf", leaf, modules, type_checking=False) == {
        "selmix_dist.core.rng", "selmix_dist.train.rundir", "selmix_dist.train"}


# ----------------------------------------------------------------- the package itself


def test_no_import_cycle():
    graph = import_graph(type_checking=False)
    assert not find_cycles(graph), f"import cycles in selmix_dist: {_names(graph)}"


def test_no_import_cycle_counting_type_checking_imports():
    """Annotation-only imports too: a component that names its owner's type still points back up."""
    graph = import_graph(type_checking=True)
    assert not find_cycles(graph), f"import cycles in selmix_dist (TYPE_CHECKING imports counted): {_names(graph)}"


# Lower layers never import a higher one (TYPE_CHECKING imports counted): core is pure torch; data, features and
# heads are read by train and experiments; train's components are owned by the trainer and never import it.
_FORBIDDEN = {
    "selmix_dist.core": ("selmix_dist.data", "selmix_dist.features", "selmix_dist.heads", "selmix_dist.train",
                         "selmix_dist.experiments", "selmix_dist.report", "selmix_dist.distributed"),
    "selmix_dist.data": ("selmix_dist.features", "selmix_dist.heads", "selmix_dist.train", "selmix_dist.experiments"),
    "selmix_dist.features": ("selmix_dist.heads", "selmix_dist.train", "selmix_dist.experiments"),
    "selmix_dist.heads": ("selmix_dist.train", "selmix_dist.experiments"),
    "selmix_dist.config": ("selmix_dist.train", "selmix_dist.experiments", "selmix_dist.features",
                           "selmix_dist.data", "selmix_dist.heads"),
}
_TRAINER_OWNERS = ("selmix_dist.train.entry",)  # the only train module that may import the trainer


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_layers_point_one_way():
    graph = import_graph(type_checking=True)
    wrong = []
    for module, targets in sorted(graph.items()):
        for lower, higher in _FORBIDDEN.items():
            if _within(module, lower):
                wrong += [f"{module} → {t}" for t in sorted(targets) if any(_within(t, h) for h in higher)]
        if _within(module, "selmix_dist.train") and module not in (*_TRAINER_OWNERS, "selmix_dist.train.trainer"):
            wrong += [f"{module} → {t}" for t in sorted(targets) if t == "selmix_dist.train.trainer"]
    assert not wrong, "imports against the layers: " + "; ".join(wrong)


TRAIN_MODULES = sorted(n for n in all_modules() if _within(n, "selmix_dist.train"))


@pytest.mark.parametrize("module", TRAIN_MODULES)
def test_train_module_imports_alone(module):
    """Each train module imported first, in a fresh interpreter: an order-dependent cycle fails here."""
    done = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, f"import {module} alone failed:\n{done.stderr[-3000:]}"
