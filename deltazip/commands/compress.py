"""`deltazip compress`: base + full fine-tune → NAME.dz/ delta artifact."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from deltazip.commands.context import get_config
from deltazip.errors import DeltazipError


@click.command()
@click.option("--base", "base", required=True, help="Base model: HF model directory or a name from [bases].")
@click.option("--target", "target", required=True, help="Fine-tuned model: HF model directory or a name.")
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="Artifact directory to write (default: [store].deltas/NAME.dz).")
@click.option("--name", default=None, help="Delta name (default: the target directory's name).")
@click.option("--bits", type=click.Choice(["2", "3", "4", "8", "16"]), default=None,
              help="Bits per kept value; 16 with --sparsity none is lossless.")
@click.option("--sparsity", default=None, help="2:4 | none | a fraction such as 0.5.")
@click.option("--group-size", type=int, default=None, help="-1 (one scale per row), 64 or 128.")
@click.option("--calib", type=click.Path(dir_okay=False), default=None,
              help="Calibration JSONL ({\"text\": ...} lines); default: the family's calib.jsonl.")
@click.option("--n-samples", type=int, default=None, help="Calibration sequences.")
@click.option("--seq-len", type=int, default=None, help="Tokens per calibration sequence.")
@click.option("--damp", type=float, default=None, help="Hessian damping, fraction of mean diag(H).")
@click.option("--block-size", type=int, default=None, help="Columns per OBS block.")
@click.option("--lossless", type=click.Choice(["zstd", "none"]), default=None, help="Lossless stage.")
@click.option("--device", default=None,
              help="auto | cpu | cuda | cuda:N: where calibration, Hessians, OBS and tuning run (default "
                   "auto: CUDA when available; CUDA is unverified, CPU is the tested path).")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run (same settings) from its last finished block.")
@click.option("--target-ratio", type=float, default=None,
              help="Allocate bits and sparsity per tensor (rate–distortion) so that fp16 bytes / artifact "
                   "bytes ≥ this ratio.")
@click.option("--budget-bytes", type=int, default=None,
              help="The same allocation under an explicit whole-artifact byte budget.")
@click.option("--any-precision", is_flag=True, default=None,
              help="With --bits 3|4: store nested bitplanes, installable at every precision 2..bits.")
@click.option("--force", is_flag=True, help="Replace an existing artifact.")
@click.pass_context
def compress(ctx: click.Context, base: str, target: str, out: str | None, name: str | None, bits: str | None,
             sparsity: str | None, group_size: int | None, calib: str | None, n_samples: int | None,
             seq_len: int | None, damp: float | None, block_size: int | None, lossless: str | None,
             device: str | None, resume: bool, target_ratio: float | None, budget_bytes: int | None,
             any_precision: bool | None, force: bool) -> None:
    """Compress the delta between a fine-tune and its base into an artifact."""
    from deltazip.compress import compress_model
    from deltazip.format import read_manifest
    from deltazip.ui import print_table

    config = get_config(ctx)
    from deltazip.threads import configure_threads

    configure_threads(config.runtime.threads)  # the CPUs this process may use, or [runtime] threads
    base_dir, target_dir = config.resolve_model(base), config.resolve_model(target)
    flags = {"bits": int(bits) if bits else None, "sparsity": sparsity, "group_size": group_size,
             "n_samples": n_samples, "seq_len": seq_len, "damp": damp, "block_size": block_size,
             "lossless": lossless, "device": device, "target_ratio": target_ratio,
             "budget_bytes": budget_bytes, "any_precision": any_precision or None}
    try:
        settings = dataclasses.replace(config.compress, **{k: v for k, v in flags.items() if v is not None})
    except ValueError as e:
        raise DeltazipError(str(e)) from None
    calib_path = calib or (str(config.path(settings.calib)) if settings.calib else None)
    name = name or target_dir.name
    out_dir = Path(out) if out else config.path(config.store.deltas) / f"{name}.dz"
    from deltazip.compress.device import resolve_device

    resolve_device(settings.device)  # --device cuda without CUDA: one line, exit 2, before any work
    compress_model(base_dir, target_dir, out_dir, settings, name=name, calib=calib_path, overwrite=force,
                   resume=resume)
    stats = read_manifest(out_dir)["stats"]
    print_table(f"{out_dir}", ["ratio vs fp16", "bits/weight", "lossless gain", "bytes", "seconds"],
                [[f"{stats['ratio']:.2f}x", stats["bits_per_weight"], stats["lossless_gain"],
                  stats["artifact_bytes"], stats["compress_seconds"]]])
