"""The TensorRT-LLM engine path of `deltazip build --backend trtllm` (TensorRT-LLM 1.2.x + TensorRT 10.x).

GPU only — not verified on this machine: TensorRT-LLM cannot be installed here and there is no GPU. What
is verified on CPU is everything this calls before the engine build (converters, delta layouts, plugin
rules, PTX). Without TensorRT-LLM `build_trtllm` raises a DeltazipError at once, before any work.

Output (OUT): ``checkpoint/`` (base, TensorRT-LLM checkpoint), ``deltas/<name>/`` (per-rank delta layouts),
``engine/rank{r}.engine`` + ``engine/config.json``, and ``trtllm_build.json``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

from deltazip.converters.output import atomic_dir
from deltazip.errors import DeltazipError

SUPPORTED_TRTLLM = "1.2."  # the last release line with the TensorRT engine backend and plugins
# TRT-LLM Llama module suffixes that get a DeltaLinear (column-parallel first, row-parallel last)
COLUMN_MODULES = ("attention.qkv", "mlp.fc", "mlp.gate")
ROW_MODULES = ("attention.dense", "mlp.proj")
# An embedding delta is a row lookup, not a GEMM: the DeltaGemm plugin cannot apply it (not supported yet).
NOT_IN_ENGINE = ("transformer.vocab_embedding",)


def require_trtllm():
    """Import tensorrt_llm 1.2.x or raise a one-line DeltazipError saying why it is not available here."""
    if importlib.util.find_spec("tensorrt_llm") is None:
        raise DeltazipError("the trtllm backend needs TensorRT-LLM 1.2.x, which is not available here "
                            "(GPU only: pip install tensorrt_llm==1.2.* on a CUDA machine)")
    try:
        trtllm = importlib.import_module("tensorrt_llm")
    except (ImportError, OSError) as err:  # e.g. libcuda.so.1 missing on a CPU-only machine
        raise DeltazipError(f"TensorRT-LLM is installed but not available here: {err}") from None
    if not trtllm.__version__.startswith(SUPPORTED_TRTLLM):
        raise DeltazipError(f"the trtllm backend needs TensorRT-LLM {SUPPORTED_TRTLLM}x (engine backend), "
                            f"found {trtllm.__version__}")
    return trtllm


def build_trtllm(base_dir: Path, delta_dirs: Sequence[Path], out_dir: Path, *, tp: int = 1,
                 dtype: str = "float16", base_quant: str = "none", calib: Path | None = None,
                 delta_slots: int = 8, max_batch_size: int = 16, max_input_len: int = 256,
                 max_seq_len: int = 512, overwrite: bool = False) -> Path:
    """Convert the base and every delta, then build one engine per rank with DeltaGemm after each linear."""
    require_trtllm()  # first: nothing is converted or written without TensorRT-LLM
    from deltazip.converters.base import convert_base, vocab_multiple
    from deltazip.converters.delta import convert_delta

    delta_dirs = [Path(d) for d in delta_dirs]
    with atomic_dir(Path(out_dir), overwrite) as tmp:
        convert_base(Path(base_dir), tmp / "checkpoint", tp=tp, dtype=dtype, base_quant=base_quant,
                     calib=calib)
        names = []
        for delta_dir in delta_dirs:
            name = delta_dir.name.removesuffix(".dz")
            convert_delta(delta_dir, Path(base_dir), tmp / "deltas" / name, tp, vocab_multiple(base_quant))
            names.append(name)
        layout = _slot_layout(tmp / "deltas", names)
        for rank in range(tp):
            _build_rank_engine(tmp / "checkpoint", tmp / "engine", rank, layout, delta_slots, max_batch_size,
                               max_input_len, max_seq_len)
        info = {"backend": "trtllm", "tp": tp, "dtype": dtype, "base_quant": base_quant, "deltas": names,
                "delta_slots": delta_slots, "max_batch_size": max_batch_size, "max_seq_len": max_seq_len,
                "delta_modules": layout,
                "deltas_not_applied_in_engine": [*NOT_IN_ENGINE, "dense (norm) deltas"]}
        (tmp / "trtllm_build.json").write_text(json.dumps(info, indent=2) + "\n")
    return Path(out_dir)


def _slot_layout(deltas_root: Path, names: list[str]) -> dict[str, dict]:
    """Per TRT-LLM module: the widest bits, finest group and 2:4 flag over all deltas (slots hold any)."""
    from deltazip.converters.readers import read_delta_layout

    layout: dict[str, dict] = {}
    for name in names:
        for module, info in read_delta_layout(deltas_root / name).manifests[0]["packed"].items():
            if module in NOT_IN_ENGINE:
                continue
            entry = layout.setdefault(module, dict(info))
            if info["sparse24"] != entry["sparse24"]:
                raise DeltazipError(f"{module}: deltas mix 2:4 and dense storage; one slot layout cannot "
                                    "hold both")
            entry["bits"] = max(entry["bits"], info["bits"])
            entry["group_size"] = min(entry["group_size"], info["group_size"])
    return layout


def _build_rank_engine(checkpoint: Path, engine_dir: Path, rank: int, layout: dict[str, dict],
                       delta_slots: int, max_batch_size: int, max_input_len: int, max_seq_len: int) -> None:
    """GPU only — not verified on this machine. Load rank `rank`, swap in DeltaLinear, build, save."""
    from tensorrt_llm import BuildConfig, build
    from tensorrt_llm.models import LLaMAForCausalLM

    model = LLaMAForCausalLM.from_checkpoint(str(checkpoint), rank=rank)
    swap_delta_linears(model, layout, delta_slots, max_batch_size * max_input_len)
    config = BuildConfig(max_batch_size=max_batch_size, max_input_len=max_input_len, max_seq_len=max_seq_len)
    engine = build(model, config)
    engine.save(str(engine_dir))


def swap_delta_linears(model, layout: dict[str, dict], delta_slots: int, max_num_tokens: int) -> int:
    """GPU only — not verified on this machine. Replace each Linear named in `layout` by a DeltaLinear."""
    from deltazip.plugins.trtllm_layer import make_delta_linear

    swapped = 0
    for name, module in list(model.named_modules()):
        if name not in layout:
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model if not parent_name else dict(model.named_modules())[parent_name]
        row_parallel = name.endswith(ROW_MODULES)
        setattr(parent, attr, make_delta_linear(module, name, layout[name], delta_slots, max_num_tokens,
                                                row_parallel))
        swapped += 1
    if swapped != len(layout):
        raise DeltazipError(f"the TensorRT-LLM model has {swapped} of the {len(layout)} delta modules")
    return swapped
