"""The README stays true: every setting and every CLI command is documented there."""

import re

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

