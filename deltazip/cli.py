"""The `deltazip` command: a click group whose subcommands are imported only when used."""

from __future__ import annotations

import importlib
import sys

import click

from deltazip import __version__
from deltazip.config import Config, load_config
from deltazip.errors import DeltazipError
from deltazip.ui import set_verbosity

# name -> "module:attribute" of a click command; loaded lazily so `deltazip --help` stays fast
# and one subsystem's import cost is paid only by its own commands.
COMMANDS: dict[str, str] = {
    "family": "deltazip.commands.family:family",
    "compress": "deltazip.commands.compress:compress",
    "inspect": "deltazip.commands.inspect:inspect",
    "eval": "deltazip.commands.eval:eval_cmd",
    "convert": "deltazip.commands.convert:convert",
    "generate": "deltazip.commands.generate:generate",
    "build": "deltazip.commands.build:build",
    "serve": "deltazip.commands.serve:serve",
    "client": "deltazip.commands.client:client",
    "demo": "deltazip.commands.demo:demo",
}


class LazyGroup(click.Group):
    """Resolves subcommands from COMMANDS on demand and turns DeltazipError into one line + exit 2."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DeltazipError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="deltazip")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="deltazip.toml to use (default: the nearest one, else built-in defaults).")
@click.option("-v", "--verbose", count=True, help="More log output (repeatable).")
@click.option("-q", "--quiet", count=True, help="Less output: no progress bars.")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, verbose: int, quiet: int) -> None:
    """deltazip: compress full fine-tunes into deltas against one base and serve them all together."""
    set_verbosity(verbose, quiet)
    ctx.obj = _LazyConfig(config_path)


class _LazyConfig:
    """Reads deltazip.toml the first time a command asks for it (so `--help` never fails on it)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._config: Config | None = None

    def get(self) -> Config:
        if self._config is None:
            self._config = load_config(self.path)
        return self._config


def get_config(ctx: click.Context) -> Config:
    """The Config for the running command (from the group's --config)."""
    return ctx.find_root().obj.get()


def main() -> None:
    cli(prog_name="deltazip")


if __name__ == "__main__":
    sys.exit(main())
