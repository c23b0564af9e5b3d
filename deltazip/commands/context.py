"""What every command reads from the click context: the Config, loaded from deltazip.toml on first use."""

from __future__ import annotations

import click

from deltazip.config import Config, load_config


class LazyConfig:
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
