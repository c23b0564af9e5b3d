"""`deltazip eval`: quality report of a compressed delta beside the full fine-tune, the base and baselines."""

from __future__ import annotations

from pathlib import Path

import click

from deltazip.commands.context import get_config
from deltazip.errors import DeltazipError
from deltazip.eval.baselines import BASELINE_NAMES


def parse_baselines(value: str) -> tuple[str, ...]:
    """'all', 'none' or a comma list of baseline names → a tuple of names in table order."""
    value = value.strip().lower()
    if value in ("", "none"):
        return ()
    if value == "all":
        return BASELINE_NAMES
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [n for n in names if n not in BASELINE_NAMES]
    if unknown:
        choices = ", ".join(BASELINE_NAMES)
        raise DeltazipError(f"unknown baseline '{unknown[0]}' (choose from: all, none, {choices})")
    return tuple(n for n in BASELINE_NAMES if n in names)


@click.command("eval")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--base", "base", default=None, help="Base model dir or [bases] name (default: build.base).")
@click.option("--family", "family_dir", type=click.Path(path_type=Path), default=None,
              help="Family directory with eval sets and fine-tunes (default: family.dir).")
@click.option("--task", default=None, help="Family task to score (default: the artifact's target).")
@click.option("--baselines", default="none", show_default=True,
              help="Baselines to add to the table: all, none, or a comma list of sparsegpt,awq,bitdelta,svd.")
@click.option("--max-examples", type=int, default=None, help="Score only the first N eval examples.")
@click.option("--lm-eval-tasks", "lm_eval_tasks", multiple=True, type=click.Path(path_type=Path),
              help="Local lm-eval-harness task YAML (repeatable; needs deltazip[eval]; unverified here).")
@click.option("--no-store", is_flag=True, help="Print the report without writing it into the manifest.")
@click.option("--device", default="auto", show_default=True,
              help="auto | cpu | cuda | cuda:N for scoring (CUDA unverified; CPU is the tested path).")
@click.pass_context
def eval_cmd(ctx: click.Context, artifact: Path, base: str | None, family_dir: Path | None,
             task: str | None, baselines: str, max_examples: int | None, lm_eval_tasks: tuple[Path, ...],
             no_store: bool, device: str) -> None:
    """Exact-match accuracy and perplexity of ARTIFACT (a NAME.dz delta) on its family task."""
    from transformers.utils import logging as hf_logging

    from deltazip.eval.report import evaluate_artifact
    from deltazip.ui import console, print_table

    hf_logging.disable_progress_bar()  # one progress bar (ours), not one per model load
    baseline_names = parse_baselines(baselines)
    config = get_config(ctx)
    from deltazip.threads import configure_threads

    configure_threads(config.runtime.threads)  # the CPUs this process may use, or [runtime] threads
    from deltazip.compress.device import resolve_device

    resolve_device(device)  # --device cuda without CUDA: one line, exit 2, before any work
    if not (artifact / "manifest.json").is_file():
        raise DeltazipError(f"delta artifact not found: {artifact} (no manifest.json)")
    base_dir = config.resolve_model(base or config.build.base)
    family = family_dir or config.path(config.family.dir)
    if not (Path(family) / "family.json").is_file():
        raise DeltazipError(f"no model family at {family} (run `deltazip family create` or pass --family)")
    report = evaluate_artifact(base_dir, artifact, family, task=task, baselines=baseline_names,
                               max_examples=max_examples, n_samples=config.compress.n_samples,
                               seq_len=config.compress.seq_len, lm_eval_tasks=lm_eval_tasks,
                               store=not no_store, device=device)
    rows = [[r["method"], "-" if r["size_bytes"] is None else r["size_bytes"],
             "-" if r["ratio_vs_fp16"] is None else f"{r['ratio_vs_fp16']:.2f}x",
             f"{100 * r['accuracy']:.1f}%", r["perplexity"], r["note"]] for r in report["rows"]]
    print_table(f"quality: {artifact.name} on task '{report['task']}' ({report['n_examples']} examples)",
                ["method", "bytes", "ratio vs fp16", "exact match", "perplexity", "note"], rows)
    if not no_store:
        console.print(f"stored under \"quality\" in {artifact / 'manifest.json'}")
