"""The `deltazip` command: a click group of the commands in deltazip/commands/.

Command modules import only click and the standard library at the top; each command imports what it
needs (torch, transformers, the subsystem it drives) inside its function, so `deltazip --help` stays fast.
"""

from __future__ import annotations

import sys

import click

from deltazip import __version__
from deltazip.commands.build import build
from deltazip.commands.client import client
from deltazip.commands.compress import compress
from deltazip.commands.context import LazyConfig, get_config
from deltazip.commands.convert import convert
from deltazip.commands.demo import demo
from deltazip.commands.eval import eval_cmd
from deltazip.commands.family import family
from deltazip.commands.generate import generate
from deltazip.commands.inspect import inspect
from deltazip.commands.serve import serve
from deltazip.commands.status import status
from deltazip.commands.variants import variants
from deltazip.errors import DeltazipError
from deltazip.threads import early_env
from deltazip.ui import set_verbosity

__all__ = ["cli", "get_config", "main"]


class DeltazipGroup(click.Group):
    """A click group that turns DeltazipError into one line + exit 2, and Ctrl-C into exit 130."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DeltazipError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=DeltazipGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="deltazip")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="deltazip.toml to use (default: the nearest one, else built-in defaults).")
@click.option("-v", "--verbose", count=True, help="More log output (repeatable).")
@click.option("-q", "--quiet", count=True, help="Less output: no progress bars.")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, verbose: int, quiet: int) -> None:
    """deltazip: compress full fine-tunes into deltas against one base and serve them all together."""
    early_env()  # OMP_WAIT_POLICY=PASSIVE: before any command imports torch (OpenMP reads it once)
    set_verbosity(verbose, quiet)
    ctx.obj = LazyConfig(config_path)


for command in (build, client, compress, convert, demo, eval_cmd, family, generate, inspect, serve, status,
                variants):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="deltazip")


if __name__ == "__main__":
    sys.exit(main())
