"""`deltazip build`: validate deltas against the base and render the Triton model repository."""

from __future__ import annotations

from pathlib import Path

import click

from deltazip.commands.context import get_config


@click.command()
@click.option("--base", default=None, help="Base model: a name from [bases] or an HF model directory.")
@click.option("--deltas", "deltas_dir", default=None, type=click.Path(file_okay=False),
              help="Directory of NAME.dz/ delta artifacts (default: [build].deltas).")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Build directory ([build].out).")
@click.option("--backend", type=click.Choice(["torch", "trtllm"]), default=None,
              help="Execution backend ([build].backend); trtllm needs TensorRT-LLM (GPU).")
@click.option("--dry-run", is_flag=True,
              help="Check every input and print exactly which files the build would write; write nothing.")
@click.pass_context
def build(ctx: click.Context, base: str | None, deltas_dir: str | None, out: str | None,
          backend: str | None, dry_run: bool) -> None:
    """Check every delta against the base fingerprint, then write OUT/triton_repo and OUT/build.json
    (--backend trtllm: also OUT/trtllm, the TensorRT-LLM checkpoint, delta layouts and engines)."""
    from deltazip.builder.build import build as run_build
    from deltazip.ui import console, print_table

    config = get_config(ctx)
    backend = backend or config.build.backend
    if backend == "trtllm" and not dry_run:  # fail before loading anything: needs TensorRT-LLM 1.2.x
        from deltazip.builder.trtllm import require_trtllm

        require_trtllm()
    base_name = base or config.build.base
    base_dir = config.resolve_model(base_name)
    deltas = Path(deltas_dir) if deltas_dir else config.path(config.build.deltas)
    out_dir = Path(out) if out else config.path(config.build.out)
    console.print(f"validating deltas in {deltas} against {base_dir} …")
    manifest = run_build(base_dir, deltas, out_dir, config.runtime, backend=backend, base_name=base_name,
                         tp=config.build.tp, on_delta=lambda name: console.print(f"  ok  {name}"),
                         dry_run=dry_run)
    if dry_run:
        root = out_dir.resolve()
        click.echo(f"dry run: `deltazip build --backend {backend}` would write "
                   f"{len(manifest['files'])} files "
                   f"under {root} (nothing written):")
        for rel in manifest["files"]:
            click.echo(str(root / rel))
        return
    rows = [(d["name"], d["manifest_sha256"][:12], d["base_fingerprint"].removeprefix("sha256:")[:12])
            for d in manifest["deltas"]]
    print_table(f"build {out_dir.resolve()}", ["delta", "manifest sha256", "base fingerprint"], rows)
    console.print(f"model repository: {out_dir.resolve() / 'triton_repo'} ({manifest['settings']['kind']}); "
                  f"serve it with `deltazip serve {out_dir}`")
