"""The package's floor plan: nothing imports upward, no import cycle, the CLI is a leaf.

Every ``import`` statement of every module under ``eenet/`` (module level and inside
functions) is read with ``ast``; an edge goes to the module it names (a submodule
when ``from package import submodule``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import eenet

ROOT = Path(eenet.__file__).resolve().parent

# bottom to top: a module may import its own layer and the layers below it
LAYERS = [
    ("eenet.errors", "eenet.io", "eenet.run_folder", "eenet.conf"),
    ("eenet.models",),
    ("eenet.cost", "eenet.losses", "eenet.policies", "eenet.build"),
    ("eenet.inference", "eenet.calibration", "eenet.export"),
    ("eenet.data", "eenet.training", "eenet.reporting"),
    ("eenet.config", "eenet.config_checks", "eenet.runs"),
    ("eenet.jobs",),
    ("eenet.cli",),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The eenet modules that ``path`` imports."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in modules else base)
    return {m for m in out if m in modules and m != name}


def _layer(module: str) -> int:
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py: place it")


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    # the package top only re-exports, lazily, by name: it is not part of the floor plan
    return {m: _imports(p, modules) - {"eenet"} for m, p in modules.items() if m != "eenet"}


def test_every_module_has_a_layer():
    for m in _graph():
        _layer(m)


def test_nothing_imports_upward():
    upward = [(m, d) for m, deps in _graph().items() for d in deps if _layer(d) > _layer(m)]
    assert not upward, "upward imports (module -> what it imports): " + ", ".join(
        f"{m} -> {d}" for m, d in sorted(upward))


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_library_never_imports_an_entry_point():
    graph = _graph()
    bad = [(m, d) for m, deps in graph.items() if not m.startswith("eenet.cli")
           for d in deps if d.startswith("eenet.cli")]
    assert not bad, bad
    hydra_main = [m for m, p in _modules().items() if not m.startswith("eenet.cli")
                  and any(isinstance(d, ast.Call) and ast.unparse(d.func) == "hydra.main"
                          for node in ast.walk(ast.parse(p.read_text()))
                          if isinstance(node, ast.FunctionDef) for d in node.decorator_list)]
    assert not hydra_main, f"@hydra.main outside eenet.cli: {hydra_main}"


def test_the_checks_see_a_planted_violation(tmp_path, monkeypatch):
    """The walker finds an upward import and a cycle when one is planted (it can fail)."""
    pkg = tmp_path / "eenet"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("from eenet.models import staged\n")
    (pkg / "models" / "__init__.py").write_text("")
    (pkg / "models" / "staged.py").write_text("from eenet import errors\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", pkg)
    graph = _graph()
    assert graph["eenet.errors"] == {"eenet.models.staged"}
    assert graph["eenet.models.staged"] == {"eenet.errors"}
    with pytest.raises(AssertionError, match="upward imports"):
        test_nothing_imports_upward()
    with pytest.raises(AssertionError, match="import cycle"):
        test_no_import_cycle()
