"""The README stays true: every setting and every CLI command is documented there, and what it runs from the
venv after `make run` is installed by `make run`."""

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import ROOT
from settings import Settings

README = (ROOT / "README.md").read_text()


def test_every_setting_is_in_the_readme():
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", README, re.MULTILINE))
    assert documented == {name.upper() for name in Settings.model_fields}


def test_every_cli_command_is_in_the_readme():
    cli_source = (ROOT / "cli.py").read_text()
    commands = set(re.findall(r'commands\.add_parser\("([a-z-]+)"', cli_source))
    assert commands and all(f"cli.py {command}" in README for command in commands)


def test_the_quickstart_commands_are_in_the_readme():
    assert "make run" in README and "make test" in README


def test_the_readme_has_no_placeholder_left():
    assert "BENCHMARK_TABLE" not in README


def installed_by(requirements: Path) -> set[str]:
    """The distributions `pip install -r requirements` installs: those it names (not those of files it includes
    with -r) and, recursively, what they require."""
    wanted = [Requirement(line.split("#")[0]) for line in requirements.read_text().splitlines()
              if line.split("#")[0].strip() and not line.startswith("-")]
    installed: set[str] = set()
    while wanted:
        requirement = wanted.pop()
        name = canonicalize_name(requirement.name)
        if name in installed:
            continue
        installed.add(name)
        for needed in map(Requirement, importlib.metadata.requires(name) or []):
            extras = requirement.extras or {""}
            if needed.marker is None or any(needed.marker.evaluate({"extra": extra}) for extra in extras):
                wanted.append(needed)
    return installed


def imported_modules(path: Path) -> set[str]:
    """The top-level names of the modules `path` imports, wherever the import statement is."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_what_the_server_the_cli_and_the_client_import_is_installed_by_make_run():
    """`make run` installs requirements.txt only: the client the README runs from the venv (client.py), the CLI
    and the server must need nothing that only requirements-dev.txt brings."""
    sources = [*ROOT.glob("*.py"), *(ROOT / "migrations").rglob("*.py")]
    ours = {path.stem for path in ROOT.glob("*.py")}
    distributions = importlib.metadata.packages_distributions()
    runtime = installed_by(ROOT / "requirements.txt")
    missing = {}
    for path in sources:
        for module in imported_modules(path) - ours - set(sys.stdlib_module_names):
            if not {canonicalize_name(name) for name in distributions.get(module, [module])} & runtime:
                missing.setdefault(module, []).append(path.name)
    assert "client.py" in {path.name for path in sources} and "httpx" not in ours
    assert not missing, f"imported but not installed by requirements.txt: {missing}"
