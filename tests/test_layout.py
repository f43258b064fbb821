"""The layout shows the architecture: every import, drawn from the source with `ast` (in functions and under
TYPE_CHECKING too), runs one way between the packages of a request's journey, no module imports itself round a
circle, each package's docstring lists its modules, and no name of ours is a standard-library module's or an
installed distribution's.

    main.py, cli.py   ->  edge/  ->  engine/ (with inference.py), ledger/  ->  operations/  ->  db.py, settings.py
    client/ stands apart: it is what a user installs, and imports nothing of the server.

    $ .venv/bin/python -m pytest tests/test_layout.py
"""

import ast
import importlib.metadata
import sys
from collections.abc import Iterator
from pathlib import Path

from conftest import ROOT

PACKAGES = ("edge", "engine", "ledger", "operations", "client")
# A root module's part of the journey; a package's modules are its own.
ROOT_MODULES = {"main": "app", "cli": "app", "inference": "engine", "db": "base", "settings": "base"}
MAY_IMPORT = {
    "app": {"app", "edge", "engine", "ledger", "operations", "base"},
    "edge": {"edge", "engine", "ledger", "operations", "base"},
    "engine": {"engine", "operations", "base"},
    "ledger": {"ledger", "operations", "base"},
    "operations": {"operations", "base"},
    "base": {"base"},
    "client": {"client"},
}


def our_modules() -> dict[str, Path]:
    """Dotted name -> file, for the root modules and every module of the packages."""
    modules = {path.stem: path for path in ROOT.glob("*.py")}
    for package in PACKAGES:
        for path in (ROOT / package).glob("*.py"):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def imported(path: Path, modules: dict[str, Path]) -> Iterator[str]:
    """The modules of ours that `path` imports, wherever the statement is: `from edge import api_docs` counts as
    edge.api_docs, `from edge.schemas import X` as edge.schemas."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
            submodules = [f"{node.module}.{alias.name}" for alias in node.names]
            found = [name for name in submodules if name in modules]
            yield from found or [node.module]


def part(module: str) -> str:
    return ROOT_MODULES.get(module) or module.split(".")[0]


def import_graph() -> dict[str, set[str]]:
    modules = our_modules()
    return {name: set(imported(path, modules)) - {name} for name, path in modules.items()}


def test_every_import_runs_the_way_of_the_journey():
    wrong_way = [f"{module} imports {target}" for module, targets in import_graph().items() for target in targets
                 if part(target) not in MAY_IMPORT[part(module)]]
    assert not wrong_way, wrong_way


def test_no_module_imports_itself_round_a_circle():
    graph = import_graph()
    circles: list[list[str]] = []
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                circles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, circles


def test_each_package_opens_with_a_docstring_that_lists_its_modules():
    for package in PACKAGES:
        docstring = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text())) or ""
        modules = {path.name for path in (ROOT / package).glob("*.py")} - {"__init__.py", "__main__.py"}
        assert docstring and not [name for name in modules if name not in docstring], (package, docstring)


def test_no_name_of_ours_is_the_standard_librarys_or_a_dependencys():
    installed = importlib.metadata.packages_distributions()
    ours = [*PACKAGES, *(path.stem for path in ROOT.glob("*.py"))]
    taken = [name for name in ours if name in sys.stdlib_module_names or name in installed]
    assert not taken, taken
