"""HF Llama, Mistral or Qwen2 base → TensorRT-LLM checkpoint via modelopt's exporter (optionally quantized).

The exporter (``modelopt.torch.export.export_tensorrt_llm_checkpoint``) does the fusion, TP split, GQA dup
and vocab padding; it runs on a CPU-only machine without TensorRT-LLM. A quantized base is made with
``mtq.quantize`` calibrated on a jsonl of ``{"text": ...}`` lines. Deltas are never quantized with the base:
the DeltaGemm adds x·Δᵀ on top of whatever the base GEMM is, so the delta path is independent of base_quant.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from deltazip.compress.calibration import read_calib_texts
from deltazip.converters.split import ModelShape, check_tp
from deltazip.errors import DeltazipError
from deltazip.fsutil import atomic_dir, check_out_dir

# --base-quant value → modelopt config name; None: export the base unquantized.
BASE_QUANT_CONFIGS = {"none": None, "w4a16_awq": "INT4_AWQ_CFG", "w8a16": "INT8_WEIGHT_ONLY_CFG",
                      "fp8": "FP8_DEFAULT_CFG"}
# The exporter pads vocab to a multiple of 64 for AWQ bases; the delta layout must pad the same way.
VOCAB_MULTIPLE = {"w4a16_awq": 64}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}  # the exporter writes fp32 as fp16


# Block-quantized bases need every rank's in_features to hold whole quantization blocks.
QUANT_BLOCK = {"w4a16_awq": 128}


def vocab_multiple(base_quant: str) -> int:
    return VOCAB_MULTIPLE.get(base_quant, 1)


def check_base_quant(base_quant: str) -> None:
    if base_quant not in BASE_QUANT_CONFIGS:
        known = ", ".join(BASE_QUANT_CONFIGS)
        raise DeltazipError(f"unknown base quantization {base_quant!r} (choose from {known})")


def check_quant_blocks(shape: ModelShape, tp: int, base_quant: str) -> None:
    """Reject a tp at which a row-parallel shard would cut the base's quantization blocks (modelopt would
    fail late, after calibration)."""
    block = QUANT_BLOCK.get(base_quant)
    if block is None:
        return
    for name, in_features in (("hidden_size", shape.hidden_size),
                              ("attention width / tp", shape.num_heads * shape.head_size // tp),
                              ("intermediate_size / tp", shape.intermediate_size // tp)):
        if in_features % block:
            raise DeltazipError(f"--base-quant {base_quant} quantizes blocks of {block} input columns, but "
                                f"{name} = {in_features} at tp {tp} is not a multiple of {block}")


def load_base_model(base_dir: Path, dtype: torch.dtype = torch.float32):
    """Load an HF Llama (architecture checked first, no remote code)."""
    from transformers import AutoModelForCausalLM

    ModelShape.from_model_dir(base_dir)
    return AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype).eval()


@contextlib.contextmanager
def quiet_modelopt() -> Iterator[None]:
    """Hide modelopt's expected chatter: per-module prints and the 'no tensorrt_llm' fallback warnings."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.filterwarnings("ignore", category=UserWarning, module=r"modelopt\.")
        yield


def quantize_base(model, tokenizer, base_quant: str, calib_texts: list[str], seq_len: int = 64):
    """Fake-quantize `model` in place with modelopt's config for `base_quant`, calibrated on the texts."""
    with quiet_modelopt():
        import modelopt.torch.quantization as mtq

    config = getattr(mtq, BASE_QUANT_CONFIGS[base_quant])
    batches = [tokenizer(t, return_tensors="pt", truncation=True, max_length=seq_len).input_ids
               for t in calib_texts]

    def forward_loop(m) -> None:
        with torch.no_grad():
            for ids in batches:
                m(ids)

    with quiet_modelopt():
        return mtq.quantize(model, config, forward_loop=forward_loop)


def rope_checkpoint_fields(hf_config: dict) -> dict:
    """The TensorRT-LLM checkpoint's rope fields for an HF config (transformers 4 or 5 spelling).

    ``rotary_base`` = rope θ; ``rotary_scaling`` = the HF rope-scaling dict (``rope_type`` + its parameters,
    e.g. llama3's factor / low_freq_factor / high_freq_factor / original_max_position_embeddings), the
    shape TensorRT-LLM's LLaMAConfig reads (tensorrt_llm/models/llama/config.py, and builder.py
    ``_init_max_seq_len`` reading ``rotary_scaling['type' | 'rope_type']``; TensorRT-LLM 1.2.0rc2-era
    sources); None for default RoPE."""
    from deltazip.hf import rope_fields

    theta, scaling = rope_fields(hf_config)
    return {"rotary_base": theta, "rotary_scaling": dict(scaling) or None}


def write_rope_fields(checkpoint_dir: Path, hf_config: dict) -> dict:
    """Set rotary_base / rotary_scaling in a checkpoint's config.json from the HF config.

    modelopt 0.47's writer (modelopt/torch/export/tensorrt_llm_utils.py) copies them only from the
    transformers 4 top-level ``rope_theta`` / ``rope_scaling``; a transformers 5 config keeps them in
    ``rope_parameters``, so without this the checkpoint has neither and an engine would silently run a
    Llama-3 base (θ 500000, llama3 scaling) with θ 10000 and no scaling."""
    path = Path(checkpoint_dir) / "config.json"
    config = json.loads(path.read_text())
    fields = rope_checkpoint_fields(hf_config)
    config["rotary_base"] = fields["rotary_base"]
    if fields["rotary_scaling"] is None:
        config.pop("rotary_scaling", None)
    else:
        config["rotary_scaling"] = fields["rotary_scaling"]
    path.write_text(json.dumps(config, indent=4))
    return fields


def decoder_type(model) -> str:
    """modelopt's decoder type for the model (its own table: Llama and Mistral → llama, Qwen2 → qwen)."""
    from modelopt.torch.export.model_utils import get_model_type

    return get_model_type(model) or "llama"


def write_architecture_fields(checkpoint_dir: Path, hf_config: dict) -> None:
    """Qwen2: the fields TensorRT-LLM's QWenConfig.from_hugging_face writes (architecture Qwen2ForCausalLM,
    qwen_type qwen2, attn_bias) — modelopt's manual writer, used without tensorrt_llm installed, leaves
    qwen_type and attn_bias out (QWenConfig would then build Qwen 1). Mistral keeps the architecture the
    exporter copies from the HF config, MistralForCausalLM, which TensorRT-LLM's MODEL_MAP builds as its
    Llama; the sliding window is a runtime setting there (max_attention_window_size) (no checkpoint field)."""
    if hf_config.get("model_type") != "qwen2":
        return
    path = Path(checkpoint_dir) / "config.json"
    config = json.loads(path.read_text())
    config.update({"architecture": "Qwen2ForCausalLM", "qwen_type": "qwen2", "attn_bias": True,
                   "mlp_bias": False})
    path.write_text(json.dumps(config, indent=4))


def export_checkpoint(model, out_dir: Path, tp: int, dtype: str = "float16", overwrite: bool = False) -> Path:
    """Write config.json + rank{r}.safetensors for `model` with modelopt's exporter, atomically (rope
    fields taken from the model's HF config, both transformers spellings: `write_rope_fields`)."""
    with quiet_modelopt():
        from modelopt.torch.export import export_tensorrt_llm_checkpoint

    with atomic_dir(Path(out_dir), overwrite) as tmp, quiet_modelopt():
        export_tensorrt_llm_checkpoint(model, decoder_type(model), DTYPES[dtype], export_dir=tmp,
                                       inference_tensor_parallel=tp)
        write_rope_fields(tmp, model.config.to_dict())
        write_architecture_fields(tmp, model.config.to_dict())
    return Path(out_dir)


def convert_base(base_dir: Path, out_dir: Path, tp: int = 1, dtype: str = "float16", base_quant: str = "none",
                 calib: Path | None = None, n_calib: int = 32, overwrite: bool = False) -> Path:
    """Base model directory → TensorRT-LLM checkpoint; every input is checked before any output is written."""
    shape = ModelShape.from_model_dir(base_dir)
    check_tp(shape, tp)
    check_base_quant(base_quant)
    check_quant_blocks(shape, tp, base_quant)
    if dtype not in DTYPES:
        raise DeltazipError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    check_out_dir(Path(out_dir), overwrite)
    texts = None
    if BASE_QUANT_CONFIGS[base_quant] is not None:
        calib = Path(calib) if calib else Path(base_dir).parent / "calib.jsonl"  # the family layout
        texts = read_calib_texts(calib, n_calib)
    model = load_base_model(base_dir)
    if texts is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
        model = quantize_base(model, tokenizer, base_quant, texts)
    return export_checkpoint(model, out_dir, tp, dtype, overwrite)
