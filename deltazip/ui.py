"""Terminal output shared by every command: progress bars, tables, verbosity."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

T = TypeVar("T")

console = Console()
_quiet = False


def set_verbosity(verbose: int, quiet: int) -> None:
    """-v / -q from the CLI: logging level and whether progress bars show."""
    global _quiet
    _quiet = quiet > 0
    level = logging.WARNING - 10 * verbose + 10 * quiet
    logging.basicConfig(level=max(logging.DEBUG, level), format="%(levelname)s %(name)s: %(message)s")


def is_quiet() -> bool:
    return _quiet


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """A progress bar over `items` (hidden with -q or when stderr is not a terminal)."""
    yield from tqdm(items, desc=desc, total=total, disable=_quiet or None, leave=False, dynamic_ncols=True)


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Print rows as a rich table (always shown, even with -q: it is the command's result)."""
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*(_fmt(v) for v in row))
    console.print(table)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
