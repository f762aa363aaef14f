"""The command line as users run it: a real subprocess."""

from __future__ import annotations

from tests.conftest import cli


def test_help_lists_subcommands():
    out = cli("--help")
    assert out.returncode == 0
    for command in ("export", "info"):
        assert command in out.stdout


def test_unknown_family_is_one_clear_line(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    out = cli("info", "--model", str(tmp_path), "--family", "gpt-2")
    assert out.returncode == 2
    assert "unknown family 'gpt-2'" in out.stderr and "Traceback" not in out.stderr


def test_debug_shows_traceback(tmp_path):
    out = cli("--debug", "info", "--model", str(tmp_path / "absent"))
    assert out.returncode != 0 and "Traceback" in out.stderr
