"""The README and the pages of docs/ stay true: every setting and every CLI command is documented, every command
they show parses, every link between them finds its page and heading, the front page stays a front page, its
sample answer has the server's shape, what they run from the venv after `make run` is installed by `make run`, and
the fine-tune of EfficientNet-Lite0 runs as written and is served as it says."""

import ast
import importlib.metadata
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import cli
from client import cli as client_cli
from conftest import ROOT, b64, encode, make_key, photo
from edge.schemas import Classification
from inference import Prediction
from settings import Settings

README = (ROOT / "README.md").read_text()
PAGES = {path: path.read_text() for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
EVERY_PAGE = "\n".join(PAGES.values())
FRONT_PAGE_LINES = 250  # read in ten minutes


def test_every_setting_is_in_the_settings_page():
    documented = set(re.findall(r"^\| `([A-Z0-9_]+)` \|", (ROOT / "docs" / "settings.md").read_text(), re.MULTILINE))
    assert documented == {name.upper() for name in Settings.model_fields}


def test_every_cli_command_is_in_the_keys_page():
    cli_source = (ROOT / "cli.py").read_text()
    commands = set(re.findall(r'commands\.add_parser\("([a-z-]+)"', cli_source))
    keys_page = (ROOT / "docs" / "keys.md").read_text()
    assert commands and all(f"cli.py {command}" in keys_page for command in commands)


def test_the_quickstart_commands_are_in_the_readme():
    assert "make run" in README and "make test" in README


def test_no_page_has_a_placeholder_left():
    assert "BENCHMARK_TABLE" not in EVERY_PAGE


def test_the_readme_is_a_front_page_and_links_to_every_page_of_docs():
    assert len(README.splitlines()) <= FRONT_PAGE_LINES
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)", README))
    assert linked == {path.name for path in (ROOT / "docs").glob("*.md")}


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE)}


def test_every_link_between_the_pages_finds_its_page_and_heading():
    broken = []
    for path, text in PAGES.items():
        for target, anchor in re.findall(r"\]\(([\w./-]*\.md|)(?:#([\w-]+))?\)", text):
            page = (path.parent / target).resolve() if target else path
            if not page.is_file() or (anchor and anchor not in heading_anchors(page.read_text())):
                broken.append(f"{path.name}: ({target}#{anchor})")
    assert not broken, broken


def shell_lines() -> list[str]:
    """The lines of the README's and the docs' sh blocks, continuation lines joined."""
    blocks = re.findall(r"```sh\n(.*?)```", EVERY_PAGE, re.DOTALL)
    return [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]


SHOWN_COMMANDS = [(match[1], match[2]) for line in shell_lines()
                  if (match := re.search(r"python (cli\.py|-m client) (.+)", line))]


@pytest.mark.parametrize("program, arguments", SHOWN_COMMANDS)
def test_every_command_the_readme_shows_parses(program, arguments):
    """With its optional parts (`[--option value]`): argparse exits on an unknown command or option."""
    parse = {"cli.py": cli.parse_args, "-m client": client_cli.parse_args}[program]
    parse([word.strip("[]") for word in shlex.split(arguments, comments=True)])


def test_the_pages_show_commands_of_both_command_lines():
    programs = {program for program, _ in SHOWN_COMMANDS}
    assert programs == {"cli.py", "-m client"} and len(SHOWN_COMMANDS) >= 10
    assert "python client.py" not in EVERY_PAGE  # the client is a package: `python -m client`


def test_the_quickstarts_sample_answer_has_the_servers_shape_and_order():
    quickstart = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    answer = json.loads(re.search(r"```json\n(.*?)```", quickstart, re.DOTALL)[1])
    assert list(answer) == list(Classification.model_fields)  # in the order the server writes them
    assert all(list(prediction) == list(Prediction.model_fields) for prediction in answer["predictions"])
    Classification.model_validate(answer)
    confidences = [prediction["confidence"] for prediction in answer["predictions"]]
    assert confidences == sorted(confidences, reverse=True) and answer["model"] == "efficientnet_lite0"


def test_the_pages_run_uvicorn_from_the_venv_and_use_no_missing_photo():
    assert not re.search(r"(?<!\.venv/bin/)\buvicorn main:app", EVERY_PAGE)
    assert "cat.jpg" not in EVERY_PAGE  # the Quickstart's $IMG is the photo every example uses


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
    """`make run` installs requirements.txt only: the client the README runs from the venv (client/), the CLI
    and the server must need nothing that only requirements-dev.txt brings."""
    packages = [path.parent for path in ROOT.glob("*/__init__.py")]
    sources = [*ROOT.glob("*.py"), *(path for package in packages for path in package.glob("*.py")),
               *(ROOT / "migrations").rglob("*.py")]
    ours = {path.stem for path in ROOT.glob("*.py")} | {package.name for package in packages}
    distributions = importlib.metadata.packages_distributions()
    runtime = installed_by(ROOT / "requirements.txt")
    missing = {}
    for path in sources:
        for module in imported_modules(path) - ours - set(sys.stdlib_module_names):
            if not {canonicalize_name(name) for name in distributions.get(module, [module])} & runtime:
                missing.setdefault(module, []).append(path.name)
    assert {"client", "edge", "engine", "ledger", "operations"} <= ours and "httpx" not in ours
    assert not missing, f"imported but not installed by requirements.txt: {missing}"


FINE_TUNE = re.search(r"```python\n(# fine_tune\.py: .*?)```", EVERY_PAGE, re.DOTALL)[1]


def test_the_fine_tune_of_efficientnet_lite0_runs_as_written_and_is_served_as_it_says(start_server, tmp_path):
    """fine_tune.py as the README has it, on a photos/ folder of four classes (random crops of four of
    scikit-image's photos), then the command that serves it, with its settings as written: the server labels
    crops of those photos it never saw."""
    from own_models import PHOTOS, crops, held_out_crops

    rng = np.random.default_rng(0)
    for label, name in PHOTOS.items():
        (tmp_path / "photos" / label).mkdir(parents=True)
        picture = photo(name).convert("RGB")
        for index, view in enumerate([picture, *crops(picture, 7, rng)]):
            view.save(tmp_path / "photos" / label / f"{index}.png")
    (tmp_path / "fine_tune.py").write_text(FINE_TUNE)
    done = subprocess.run([sys.executable, "fine_tune.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "32 photos of 4 classes" in done.stdout
    [command] = [line for line in shell_lines() if "MODEL_WEIGHTS=photos.pth" in line]
    settings = dict(word.split("=", 1) for word in shlex.split(command.split("make run")[0]))
    assert settings == {"MODEL_NAME": "efficientnet_lite0", "MODEL_WEIGHTS": "photos.pth", "MODEL_LABELS": "photos.txt"}
    server = start_server({name: str(tmp_path / value) if value.endswith((".pth", ".txt")) else value
                           for name, value in settings.items()})
    held_out = held_out_crops()
    with server.client(make_key(server.database_url)) as client:
        answer = client.post("/v1/classify", json={"images": [b64(encode(crop, "PNG")) for _, crop in held_out]})
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == "efficientnet_lite0"
    assert [result["predictions"][0]["label"] for result in answer.json()["results"]] == [label for label, _ in held_out]
