"""Every `proco-ray` command the README shows parses with the CLI as written, so docs and CLI cannot drift."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest

from proco_ray.cli import COMMANDS

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    """`proco-ray ...` lines of the README's code blocks, continuation lines joined, and inline commands with arguments."""
    text = README.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("proco-ray "):
                commands.append(line)
    inline = re.findall(r"`(proco-ray [^`]+)`", text)
    commands += [c for c in inline if len(c.split()) > 2]  # `proco-ray tune` alone names a command in prose
    return commands


def parse(command: str) -> argparse.Namespace:
    words = shlex.split(command, comments=True)
    name = words[1]
    assert name in COMMANDS, f"README shows an unknown command: {command}"
    parser = argparse.ArgumentParser(prog=f"proco-ray {name}", exit_on_error=False)
    importlib.import_module(COMMANDS[name][0]).add_arguments(parser)
    return parser.parse_args(words[2:])


def test_the_readme_shows_the_main_steps():
    shown = {c.split()[1] for c in readme_commands()}
    assert {"storage", "prepare", "train", "evaluate", "predict", "export", "tune", "local-sweep"} <= shown


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command, capsys):
    try:
        parse(command)
    except SystemExit as stop:  # argparse exits on --help and on errors
        assert stop.code == 0, f"README command does not parse: {command}\n{capsys.readouterr().err}"
