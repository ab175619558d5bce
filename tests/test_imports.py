"""The import rules of docs/architecture.md, read from the source: every module under jaxseq/ is parsed with ``ast``
(imports inside functions included, since they run too), so a new module or package is checked without being
listed here.

* no import cycle between jaxseq modules;
* the core imports nothing task-level;
* models import no plots, command line, training loop or tasks;
* the training loop imports no tasks, command line, tour or models.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jaxseq"

CORE = {"cells", "sequences", "scan", "layers", "bptt", "gradients", "attention", "decoding", "interop", "native",
        "nn"}
TASK_LEVEL = {"models", "data", "training", "plots", "metrics", "commands", "cli", "tour", "tasks", "encoders"}
NOT_FROM_MODELS = {"plots", "commands", "cli", "training", "tasks"}
NOT_FROM_TRAINING = {"tasks", "commands", "cli", "tour", "models"}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The jaxseq module that importing ``name`` runs: the longest known prefix (a name may be a function)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, source: str | None = None) -> set[str]:
    """The jaxseq modules ``module`` imports anywhere in its source (not its parent packages, which Python runs
    first anyway and which every module would otherwise 'import')."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(_resolve(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = ".".join(base[:len(base) - node.level + 1])
                origin = f"{base}.{node.module}" if node.module else base
            else:
                origin = node.module or ""
            for alias in node.names:  # `from jaxseq import cells` imports the module jaxseq.cells
                found.add(_resolve(f"{origin}.{alias.name}") or _resolve(origin))
    found.discard(None)
    found.discard(module)
    return {name for name in found if name == "jaxseq" or name.startswith("jaxseq.")}


GRAPH = {module: _imports(module) for module in MODULES}


def _area(module: str) -> str:
    """``jaxseq.models.seq2seq`` -> ``models``; the package itself -> ``jaxseq``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "jaxseq"


def _reachable(start: str) -> dict[str, list[str]]:
    """Every module ``start`` imports, directly or not, with one import path to it."""
    paths, frontier = {start: [start]}, [start]
    while frontier:
        current = frontier.pop()
        for target in sorted(GRAPH[current]):
            if target not in paths:
                paths[target] = paths[current] + [target]
                frontier.append(target)
    return paths


def _in(area_names: set[str]) -> list[str]:
    return sorted(m for m in MODULES if _area(m) in area_names)


def test_the_walk_finds_the_package():
    assert {"jaxseq", "jaxseq.cells", "jaxseq.layers", "jaxseq.scan"} <= set(MODULES)
    assert "jaxseq.cells" in GRAPH["jaxseq.layers"]
    assert GRAPH["jaxseq.cells"] == set()  # the leaf of the core


def test_the_parser_sees_function_level_and_relative_imports():
    """The checks below could not fail if the parser missed imports: it must see them inside functions too."""
    source = ("import numpy\n"
              "def f():\n    from jaxseq import plots, unroll\n    import jaxseq.models.captioning\n"
              "    from . import glove\n    from ..layers import lstm\n")
    assert _imports("jaxseq.data.text", source) == {"jaxseq.plots", "jaxseq", "jaxseq.models.captioning",
                                                    "jaxseq.data.glove", "jaxseq.layers"}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_cycle(module):
    paths = _reachable(module)
    cycles = [paths[target] + [module] for target in GRAPH if target in paths and module in GRAPH[target]]
    assert not cycles, f"{module} imports itself back: {' -> '.join(min(cycles, key=len))}"


@pytest.mark.parametrize("module", ["jaxseq"] + _in(CORE))
def test_core_imports_nothing_task_level(module):
    bad = {target: path for target, path in _reachable(module).items() if _area(target) in TASK_LEVEL}
    assert not bad, f"{module} reaches task-level code: {' -> '.join(min(bad.values(), key=len))}"


@pytest.mark.parametrize("module", _in({"models"}))
def test_models_import_no_plots_command_line_training_or_tasks(module):
    bad = sorted(target for target in GRAPH[module] if _area(target) in NOT_FROM_MODELS)
    assert not bad, f"{module} imports {bad}"


@pytest.mark.parametrize("module", _in({"training"}))
def test_training_loop_imports_no_tasks_command_line_tour_or_models(module):
    bad = {target: path for target, path in _reachable(module).items() if _area(target) in NOT_FROM_TRAINING}
    assert not bad, f"{module} reaches {' -> '.join(min(bad.values(), key=len))}"
