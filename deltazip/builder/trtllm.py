"""The TensorRT-LLM stage of `deltazip build --backend trtllm` (TensorRT-LLM 1.2.x + TensorRT 10.x).

Two steps: `convert` (CPU: base → TensorRT-LLM checkpoint via modelopt, each delta → per-rank layout) and
the engine build (GPU only, `trtllm_engine.py` — not verified on this machine: TensorRT-LLM cannot be
installed here and there is no GPU). `planned_files` says exactly which files the stage writes; the dry
run prints it, and `build_trtllm` checks what it wrote against it. Without TensorRT-LLM 1.2.x
`build_trtllm` raises a one-line DeltazipError before any work.

Output (OUT = the stage's directory): ``checkpoint/`` (config.json + rank{r}.safetensors), ``deltas/<name>/``
(rank{r}.safetensors + rank{r}.json), ``engine/`` (config.json + rank{r}.engine) and ``trtllm_build.json``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

from deltazip.errors import DeltazipError
from deltazip.fsutil import atomic_dir

SUPPORTED_TRTLLM = "1.2."  # the last release line with the TensorRT engine backend and plugins
# TRT-LLM Llama modules (suffixes) and what each gets: column/row-parallel linears, lm_head, norms, embedding.
COLUMN_MODULES = ("attention.qkv", "mlp.fc", "mlp.gate")
ROW_MODULES = ("attention.dense", "mlp.proj")
LM_HEAD = "lm_head"
EMBEDDING = "transformer.vocab_embedding"
NORM_PARAMS = ("input_layernorm.weight", "post_layernorm.weight", "transformer.ln_f.weight")
# TensorRT-LLM's fuse_gate_mlp (PluginConfig.use_fused_mlp, on by default) merges mlp.fc and mlp.gate into one
# GEMM by reading mlp.gate.weight, which a swapped delta layer does not have, and the fused layer would drop
# the deltas. deltazip builds with it off; the cost, per layer: one more GEMM launch and one more read of
# the MLP input (the weight bytes read are the same), and no fused SwiGLU epilogue. Not measured here.
FUSED_MLP = False
FUSED_MLP_COST = ("use_fused_mlp off: one more GEMM launch and one more read of the MLP input per layer "
                  "(same weight bytes), no fused SwiGLU epilogue; not measured")


def delta_layer_kind(name: str) -> str:
    """Which delta layer wraps TensorRT-LLM module `name` (a packed module or a norm of the slot layout):
    "column" / "row" (DeltaGemm), "lm_head" (DeltaGemm over request rows), "embedding", "norm"."""
    if name == LM_HEAD:
        return "lm_head"
    if name == EMBEDDING:
        return "embedding"
    if name.endswith(COLUMN_MODULES):
        return "column"
    if name.endswith(ROW_MODULES):
        return "row"
    if f"{name}.weight".endswith(NORM_PARAMS):
        return "norm"
    raise DeltazipError(f"no delta layer for TensorRT-LLM module {name}")


def require_trtllm():
    """Import tensorrt_llm 1.2.x or raise a one-line DeltazipError saying why it is not available here."""
    if importlib.util.find_spec("tensorrt_llm") is None:
        raise DeltazipError("the trtllm backend needs TensorRT-LLM 1.2.x, which is not available here "
                            "(GPU only: pip install tensorrt_llm==1.2.1 on a CUDA machine)")
    try:
        trtllm = importlib.import_module("tensorrt_llm")
    except (ImportError, OSError) as err:  # e.g. libcuda.so.1 missing on a CPU-only machine
        raise DeltazipError(f"TensorRT-LLM is installed but not available here: {err}") from None
    if not trtllm.__version__.startswith(SUPPORTED_TRTLLM):
        raise DeltazipError(f"the trtllm backend needs TensorRT-LLM {SUPPORTED_TRTLLM}x (engine backend), "
                            f"found {trtllm.__version__}")
    return trtllm


def delta_name(delta_dir: Path) -> str:
    return Path(delta_dir).name.removesuffix(".dz")


def planned_files(delta_names: Sequence[str], tp: int) -> list[str]:
    """Every file the stage writes, relative to its directory, sorted."""
    # modelopt's exporter writes quant_cfg.json beside config.json for every base, quantized or not
    files = ["trtllm_build.json", "checkpoint/config.json", "checkpoint/quant_cfg.json", "engine/config.json"]
    for rank in range(tp):
        files += [f"checkpoint/rank{rank}.safetensors", f"engine/rank{rank}.engine"]
        for name in delta_names:
            files += [f"deltas/{name}/rank{rank}.safetensors", f"deltas/{name}/rank{rank}.json"]
    return sorted(files)


def written_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*") if p.is_file())


def convert(base_dir: Path, delta_dirs: Sequence[Path], work: Path, *, tp: int, dtype: str, base_quant: str,
            calib: Path | None) -> list[str]:
    """CPU step: the base checkpoint into work/checkpoint, each delta's layout into work/deltas/<name>."""
    from deltazip.converters.base import convert_base, vocab_multiple
    from deltazip.converters.delta import convert_delta

    convert_base(Path(base_dir), work / "checkpoint", tp=tp, dtype=dtype, base_quant=base_quant, calib=calib)
    names = []
    for delta_dir in delta_dirs:
        name = delta_name(delta_dir)
        convert_delta(Path(delta_dir), Path(base_dir), work / "deltas" / name, tp, vocab_multiple(base_quant))
        names.append(name)
    return names


def slot_layout(deltas_root: Path, names: Sequence[str]) -> dict:
    """What the engine must hold for these deltas: per packed module the widest bits / finest group / 2:4
    flag over all deltas (slots hold any narrower one), and the dense (norm) params any delta changes."""
    from deltazip.converters.readers import read_delta_layout

    packed: dict[str, dict] = {}
    dense: dict[str, dict] = {}
    for name in names:
        manifest = read_delta_layout(Path(deltas_root) / name).manifests[0]
        for module, info in manifest["packed"].items():
            delta_layer_kind(module)  # every module must have a delta layer (raises before any GPU work)
            entry = packed.setdefault(module, dict(info))
            if info["sparse24"] != entry["sparse24"]:
                raise DeltazipError(f"{module}: deltas mix 2:4 and dense storage; one slot layout cannot "
                                    "hold both")
            entry["bits"] = max(entry["bits"], info["bits"])
            entry["group_size"] = min(entry["group_size"], info["group_size"])
        for param, info in manifest["dense"].items():
            if not param.endswith(NORM_PARAMS):
                raise DeltazipError(f"delta '{name}' stores {param} densely (16-bit deltas): the engine "
                                    "applies "
                                    "dense deltas to norms only; compress it with bits < 16")
            dense.setdefault(param, dict(info))
    return {"packed": packed, "dense": dense}


def build_trtllm(base_dir: Path, delta_dirs: Sequence[Path], out_dir: Path, *, tp: int = 1,
                 dtype: str = "float16", base_quant: str = "none", calib: Path | None = None,
                 delta_slots: int = 8, max_batch_size: int = 16, max_input_len: int = 256,
                 max_seq_len: int = 512, overwrite: bool = False) -> dict:
    """Convert the base and every delta, build one engine per rank with the delta layers; returns the
    stage's record (also written as trtllm_build.json)."""
    require_trtllm()  # first: nothing is converted or written without TensorRT-LLM
    from deltazip.builder.trtllm_engine import build_rank_engine

    delta_dirs = [Path(d) for d in delta_dirs]
    with atomic_dir(Path(out_dir), overwrite) as tmp:
        names = convert(base_dir, delta_dirs, tmp, tp=tp, dtype=dtype, base_quant=base_quant, calib=calib)
        layout = slot_layout(tmp / "deltas", names)
        settings = {"delta_slots": delta_slots, "max_batch_size": max_batch_size,
                    "max_input_len": max_input_len,
                    "max_seq_len": max_seq_len, "use_fused_mlp": FUSED_MLP}
        for rank in range(tp):
            build_rank_engine(tmp / "checkpoint", tmp / "engine", rank, layout, **settings)
        info = {"backend": "trtllm", "tp": tp, "dtype": dtype, "base_quant": base_quant, "deltas": names,
                **settings, "fused_mlp_cost": FUSED_MLP_COST, "layout": layout,
                "tensorrt_llm": importlib.import_module("tensorrt_llm").__version__}
        (tmp / "trtllm_build.json").write_text(json.dumps(info, indent=2) + "\n")
        missing = sorted(set(planned_files(names, tp)) - set(written_files(tmp)))
        if missing:
            raise DeltazipError(f"the TensorRT-LLM build did not write {missing}")
    return info
