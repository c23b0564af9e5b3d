"""`deltazip family create|eval`: build the embedded tiny model family and print its accuracy table."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from deltazip.commands.context import get_config


@click.group()
def family() -> None:
    """The embedded model family: a base and one full fine-tune per synthetic task."""


@family.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Family directory (default: [family].dir).")
@click.option("--preset", default=None, help="tiny | small (default: [family].preset).")
@click.option("--seed", type=int, default=None, help="Random seed (default: [family].seed).")
@click.pass_context
def create(ctx: click.Context, out_dir: str | None, preset: str | None, seed: int | None) -> None:
    """Train the family (or reuse OUT when its content hash matches) and write it in Hugging Face format."""
    from deltazip.family import create_family
    from deltazip.ui import print_table

    config = get_config(ctx)
    out = Path(out_dir) if out_dir else config.path(config.family.dir)
    started = time.time()
    result = create_family(out, preset=preset or config.family.preset,
                           seed=config.family.seed if seed is None else seed)
    stats = result.stats
    print_table(f"family {result.preset} (seed {result.seed}): built in {stats.get('build_seconds')} s",
                ["model", "final loss", "||delta|| / ||W||"],
                [[name, loss, stats["relative_delta_norm"].get(name, "-")]
                 for name, loss in stats.get("final_loss", {}).items()])
    click.echo(f"family {result.preset} seed {result.seed} at {result.root} "
               f"(hash {result.content_hash[:12]}, {time.time() - started:.1f}s)")


@family.command("eval")
@click.argument("family_dir", type=click.Path(file_okay=False), required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON instead.")
@click.option("--limit", type=int, default=None, help="Use only the first N eval examples per task.")
@click.pass_context
def eval_(ctx: click.Context, family_dir: str | None, as_json: bool, limit: int | None) -> None:
    """Exact-match accuracy of every model (rows) on every task (columns)."""
    from transformers.utils import logging as hf_logging

    from deltazip.family.report import accuracy_table
    from deltazip.ui import print_table

    hf_logging.disable_progress_bar()  # one bar per loaded model would bury the table
    config = get_config(ctx)
    root = Path(family_dir) if family_dir else config.path(config.family.dir)
    table = accuracy_table(root, limit=limit)
    if as_json:
        click.echo(json.dumps(table, indent=2))
        return
    tasks = list(next(iter(table.values())))
    print_table(f"exact match, {root}", ["model", *tasks],
                [[model, *(f"{acc:.3f}" for acc in row.values())] for model, row in table.items()])
