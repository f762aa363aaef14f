"""The command line as users run it: a real subprocess."""

from __future__ import annotations

import re

import pytest

from tests.conftest import cli

COMMANDS = ["demo", "export", "predict", "chat", "eval", "train", "data", "serve", "webui", "info"]
SUBCOMMANDS = [("data", "check"), ("data", "tokenize")]


def listed_commands(help_text: str) -> list[str]:
    """The command names of a `--help` page's positional-arguments list."""
    block = help_text.split("positional arguments:")[1].split("options:")[0]
    return re.findall(r"^ {4}(\w[\w-]*)", block, flags=re.M)


def test_help_lists_every_subcommand():
    out = cli("--help")
    assert out.returncode == 0
    assert listed_commands(out.stdout) == COMMANDS  # a new command must join COMMANDS (and get its --help test)


@pytest.mark.parametrize("command", [(c,) for c in COMMANDS] + SUBCOMMANDS, ids=" ".join)
def test_every_subcommand_has_help(command):
    out = cli(*command, "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: chatglm-sft {' '.join(command)}")
    assert "--debug" in out.stdout or command == ("data",)  # a group of commands has no options of its own
    assert out.stderr == ""


def test_data_help_lists_its_subcommands():
    assert listed_commands(cli("data", "--help").stdout) == [sub for _, sub in SUBCOMMANDS]


def test_unknown_family_is_one_clear_line(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    out = cli("info", "--model", str(tmp_path), "--family", "gpt-2")
    assert out.returncode == 2
    assert "unknown family 'gpt-2'" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_traceback_before_or_after_the_command(tmp_path, where):
    args = ["info", "--model", str(tmp_path)]  # a folder without config.json: an error found while running
    plain = cli(*args)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr and "no config.json" in plain.stderr
    debug = cli("--debug", *args) if where == "before" else cli(*args, "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "no config.json" in debug.stderr


@pytest.mark.slow
def test_debug_after_a_training_command(tmp_path, tiny_checkpoint):
    data = tmp_path / "bad.json"
    data.write_text('[{"instruction": 5, "output": "x"}]')
    args = [
        "train",
        "--model",
        str(tiny_checkpoint("chatglm2-6b")),
        "--data",
        str(data),
        "--output",
        str(tmp_path / "o"),
    ]
    out = cli(*args)
    assert out.returncode == 1 and "Traceback" not in out.stderr and str(data) in out.stderr
    debug = cli(*args, "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr
