"""Imports run one way (README, Layout): entry scripts -> run_lib -> algorithms ->
foundations (models/, sde_lib, subspace_lib, ...) -> op/, with no cycle between top-level modules
and packages. Read from the source with `ast`, so every import counts, also those inside
functions; nothing is imported.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Command lines, their plumbing and the orchestration behind them: nothing below them may import
# these. `cli` holds the command-line helpers; `utils` re-exports them, so it counts as plumbing.
ENTRY_SCRIPTS = {"main", "subspace_sample", "subspace_inpainting", "demo", "compute_dataset_stats"}
ORCHESTRATION = {"run_lib", "subspace_run", "sample_rounds", "demo_run", "demo_settings",
                 "demo_cutoffs", "demo_sampling", "demo_metrics", "demo_report"}
UPPER = ENTRY_SCRIPTS | ORCHESTRATION | {"cli", "utils"}
# The foundations import only each other (and op/, the bottom layer).
FOUNDATIONS = {"models", "op", "sde_lib", "subspace_lib", "files", "registry", "distributed",
               "errors"}


def _node(path: Path, root: Path) -> str:
    """The graph node of a file: its top-level module, or the top-level package it is in."""
    return path.relative_to(root).parts[0].removesuffix(".py")


def python_files(root: Path) -> list[Path]:
    """Every .py file under `root`, hidden folders such as .venv skipped."""
    return [p for p in sorted(root.rglob("*.py"))
            if not any(part.startswith(".") for part in p.relative_to(root).parts)]


def imported_modules(path: Path) -> set[str]:
    """The absolute module names a file imports, anywhere in it (relative imports left out)."""
    names: set[str] = set()
    for statement in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(statement, ast.Import):
            names |= {alias.name for alias in statement.names}
        elif isinstance(statement, ast.ImportFrom) and statement.level == 0:
            names.add(statement.module)
    return names


def import_graph(root: Path) -> dict[str, set[str]]:
    """{node: the other project nodes it imports} over every .py file under `root` (hidden
    folders such as .venv skipped); relative imports stay inside their package."""
    files = python_files(root)
    nodes = {_node(p, root) for p in files}
    graph: dict[str, set[str]] = {node: set() for node in nodes}
    for path in files:
        node = _node(path, root)
        graph[node] |= {n.split(".")[0] for n in imported_modules(path)} & (nodes - {node})
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None when the graph is acyclic (depth-first)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_checker_finds_a_cycle_and_a_lazy_import(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("from . import b\nimport top\n")
    (tmp_path / "top.py").write_text("def f():\n    from pkg.a import x\n")
    (tmp_path / "leaf.py").write_text("import os\nimport top\n")
    graph = import_graph(tmp_path)
    assert graph == {"pkg": {"top"}, "top": {"pkg"}, "leaf": {"top"}}
    assert find_cycle(graph) == ["top", "pkg", "top"]  # reached from leaf
    del graph["top"]
    assert find_cycle(graph) is None


def test_no_import_cycle_between_modules_and_packages():
    cycle = find_cycle(import_graph(ROOT))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_foundations_import_nothing_above_them():
    graph = import_graph(ROOT)
    for node in sorted(FOUNDATIONS & set(graph)):
        upward = sorted(graph[node] & UPPER)
        assert not upward, f"{node} imports {upward} (entry scripts, run_lib, CLI plumbing)"
        outside = sorted(graph[node] - FOUNDATIONS)
        assert not outside, f"{node} imports {outside}, which are not foundations"
    assert graph["op"] == set(), f"op/ is the bottom layer but imports {sorted(graph['op'])}"


def test_configs_and_library_code_import_no_entry_script():
    graph = import_graph(ROOT)
    assert graph["configs"] == set(), f"configs import {sorted(graph['configs'])}"
    for node in sorted(set(graph) - ENTRY_SCRIPTS - {"tests", "bench"}):
        entry = sorted(graph[node] & ENTRY_SCRIPTS)
        assert not entry, f"{node} imports the entry script(s) {entry}"


def test_only_the_compatibility_test_imports_utils():
    # `utils` re-exports the original names for code written against the original; the
    # project's own modules, scripts, benchmarks and tests import the names' homes.
    allowed = {Path("tests/test_compat_names.py")}
    importers = sorted(str(p.relative_to(ROOT)) for p in python_files(ROOT)
                       if p.relative_to(ROOT) not in allowed
                       and "utils" in imported_modules(p))
    assert importers == [], f"import the homes instead of utils: {importers}"
