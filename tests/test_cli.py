"""The deltazip command: help on every command, version, and one-line user errors with exit code 2."""

import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from deltazip.cli import cli

REPO = Path(__file__).resolve().parent.parent
COMMANDS = ("build", "client", "compress", "convert", "demo", "eval", "family", "generate", "inspect",
            "serve")
HEAVY_MODULES = ("torch", "transformers", "safetensors", "tokenizers", "numpy", "tritonclient", "triton")


def _all_commands(group: click.Group, ctx: click.Context, prefix: tuple[str, ...] = ()):
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from _all_commands(command, ctx, (*prefix, name))


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and "0.1.0" in result.output


def test_help_on_every_command():
    ctx = click.Context(cli)
    paths = list(_all_commands(cli, ctx))
    assert set(COMMANDS) <= set(cli.list_commands(ctx)) and len(paths) > len(COMMANDS)
    for path in paths:
        result = CliRunner().invoke(cli, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage:" in result.output


def test_help_does_not_import_heavy_modules():
    """`deltazip --help` (and every command's --help) imports no torch/transformers: they load in commands."""
    code = (
        "import sys\n"
        "import click\n"
        "from deltazip.cli import cli\n"
        "paths = [[]] + [[name] for name in cli.commands]\n"
        "paths += [[name, sub] for name, group in cli.commands.items() if isinstance(group, click.Group)"
        " for sub in group.commands]\n"
        "for path in paths:\n"
        "    try:\n"
        "        cli([*path, '--help'], prog_name='deltazip')\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, path\n"
        f"print('heavy:', *(m for m in {HEAVY_MODULES!r} if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "heavy:", f"imported by --help: {proc.stdout.splitlines()[-1]}"


def test_unknown_command_exits_2():
    result = CliRunner().invoke(cli, ["frobnicate"])
    assert result.exit_code == 2


def test_bad_config_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "deltazip.toml"
    bad.write_text("[compress]\nbitz = 3\n")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "deltazip.cli", "--config", str(bad), "family", "create"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {bad}: unknown key 'compress.bitz' (known: {lines[0].split('(known: ')[1]}"]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deltazip.toml"]


@pytest.mark.parametrize("flag", ["-v", "-q"])
def test_verbosity_flags_accepted(flag):
    result = CliRunner().invoke(cli, [flag, "--help"])
    assert result.exit_code == 0
