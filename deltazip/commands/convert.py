"""`deltazip convert base|delta`: TensorRT-LLM checkpoints for the base and per-rank layouts for deltas."""

from __future__ import annotations

from pathlib import Path

import click

from deltazip.commands.context import get_config

BASE_QUANTS = ("none", "w4a16_awq", "w8a16", "fp8")


@click.group()
def convert() -> None:
    """Convert a base model or a delta artifact into TensorRT-LLM layouts."""


@convert.command("base")
@click.option("--base", "base", default=None, help="Base name from [bases] or a model directory "
              "(default: build.base).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Checkpoint directory.")
@click.option("--tp", type=int, default=None, help="Tensor-parallel size: 1, 2, 4 or 8 (default: build.tp).")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16"]), default="float16", show_default=True)
@click.option("--base-quant", type=click.Choice(BASE_QUANTS), default="none", show_default=True,
              help="Quantize the base with NVIDIA Model Optimizer; deltas are added on top of it unchanged.")
@click.option("--calib", type=click.Path(dir_okay=False), default=None,
              help="Calibration jsonl ({\"text\": ...}) for --base-quant "
              "(default: the family's calib.jsonl).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.pass_context
def convert_base_cmd(ctx: click.Context, base: str | None, out: str, tp: int | None, dtype: str,
                     base_quant: str, calib: str | None, force: bool) -> None:
    """HF Llama base → TensorRT-LLM checkpoint (config.json + rank{N}.safetensors) via modelopt."""
    from deltazip.converters.base import convert_base
    from deltazip.converters.readers import read_trtllm_checkpoint
    from deltazip.ui import print_table

    config = get_config(ctx)
    base_dir = config.resolve_model(base or config.build.base)
    tp = tp if tp is not None else config.build.tp
    if calib is None and config.compress.calib:
        calib = str(config.path(config.compress.calib))
    path = convert_base(base_dir, Path(out), tp=tp, dtype=dtype, base_quant=base_quant,
                        calib=Path(calib) if calib else None, overwrite=force)
    checkpoint = read_trtllm_checkpoint(path)
    rows = []
    for rank in range(checkpoint.tp):
        file = checkpoint.rank_path(rank)
        mib = file.stat().st_size / 2**20
        rows.append((rank, file.name, len(checkpoint.tensor_names(rank)), f"{mib:.2f}"))
    quant = checkpoint.config.get("quantization", {}).get("quant_algo")
    print_table(f"TensorRT-LLM checkpoint {path} (tp {tp}, {dtype}, quant {quant})",
                ["rank", "file", "tensors", "MiB"], rows)


@convert.command("delta")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.option("--base", "base", default=None, help="The base the delta was compressed against "
              "(name from [bases] or a model directory; default: build.base).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Layout directory.")
@click.option("--tp", type=int, default=None, help="Tensor-parallel size: 1, 2, 4 or 8 (default: build.tp).")
@click.option("--base-quant", type=click.Choice(BASE_QUANTS), default="none", show_default=True,
              help="The base checkpoint's quantization (an AWQ base pads the vocab to 64).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.pass_context
def convert_delta_cmd(ctx: click.Context, artifact: str, base: str | None, out: str, tp: int | None,
                      base_quant: str, force: bool) -> None:
    """Delta artifact → per-rank packed delta layout (rank{N}.safetensors + rank{N}.json)."""
    from deltazip.converters.base import vocab_multiple
    from deltazip.converters.delta import convert_delta
    from deltazip.converters.readers import read_delta_layout
    from deltazip.ui import print_table

    config = get_config(ctx)
    base_dir = config.resolve_model(base or config.build.base)
    tp = tp if tp is not None else config.build.tp
    path = convert_delta(Path(artifact), base_dir, Path(out), tp, vocab_multiple(base_quant), overwrite=force)
    layout = read_delta_layout(path)
    rows = []
    for manifest in layout.manifests:
        file = path / f"rank{manifest['rank']}.safetensors"
        rows.append((manifest["rank"], len(manifest["packed"]), len(manifest["dense"]),
                     f"{file.stat().st_size / 2**20:.3f}"))
    print_table(f"delta layout {path} (tp {tp})", ["rank", "packed modules", "dense deltas", "MiB"], rows)
