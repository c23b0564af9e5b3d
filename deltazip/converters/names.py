"""The one HF → TensorRT-LLM name table for the Llama family, and the split rule of each TRT-LLM module.

Mistral and Qwen2 share Llama's module names; Qwen2's q/k/v biases land in the fused ``attention.qkv.bias``
(split like the qkv weight's rows).

TRT-LLM module names are weight names without ``.weight`` (``transformer.layers.0.attention.qkv``).
The parallel kind says how tensor parallelism splits the weight [out, in]:
``column`` splits dim 0 (out), ``row`` splits dim 1 (in), ``vocab`` splits dim 0 after padding the vocab,
``replicated`` copies it to every rank. ``qkv`` is column-parallel over the fused q, k, v (with GQA dup).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from deltazip.errors import DeltazipError

# HF architecture → model_type of the decoders the converters support (modelopt exports all three)
SUPPORTED = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}

# HF module suffix inside model.layers.{i}. → (TRT-LLM suffix inside transformer.layers.{i}., parallel kind)
_LAYER_LINEARS = {
    "self_attn.o_proj": ("attention.dense", "row"),
    "mlp.gate_proj": ("mlp.fc", "column"),  # fc gets the activation: it is HF gate_proj
    "mlp.up_proj": ("mlp.gate", "column"),  # TRT-LLM's "gate" is HF up_proj
    "mlp.down_proj": ("mlp.proj", "row"),
}
QKV_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LAYER_NORMS = {
    "input_layernorm": "input_layernorm",
    "post_attention_layernorm": "post_layernorm",
}
_GLOBAL = {
    "model.embed_tokens": ("transformer.vocab_embedding", "vocab"),
    "lm_head": ("lm_head", "vocab"),
    "model.norm": ("transformer.ln_f", "replicated"),
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class TrtTarget:
    """Where one HF module lands: the TRT-LLM module, its split kind, and its slot in a fused module."""

    module: str  # e.g. transformer.layers.0.attention.qkv
    parallel: str  # column | row | vocab | replicated | qkv
    part: str | None = None  # q | k | v inside the fused qkv, else None


def trt_target(hf_module: str) -> TrtTarget:
    """Map an HF module name (no ``.weight``) to its TRT-LLM target; unknown names are an error."""
    if hf_module in _GLOBAL:
        module, kind = _GLOBAL[hf_module]
        return TrtTarget(module, kind)
    match = _LAYER_RE.match(hf_module)
    if match:
        layer, rest = match.groups()
        prefix = f"transformer.layers.{layer}."
        if rest in QKV_PARTS:
            return TrtTarget(prefix + "attention.qkv", "qkv", rest[len("self_attn.")])
        if rest in _LAYER_LINEARS:
            suffix, kind = _LAYER_LINEARS[rest]
            return TrtTarget(prefix + suffix, kind)
        if rest in _LAYER_NORMS:
            return TrtTarget(prefix + _LAYER_NORMS[rest], "replicated")
    raise DeltazipError(f"no TensorRT-LLM name for '{hf_module}' (only Llama, Mistral and Qwen2 modules are "
                        "supported)")


def hf_module_of_param(param_name: str) -> tuple[str, str]:
    """Split an HF parameter name into (module, leaf): 'model.norm.weight' → ('model.norm', 'weight')."""
    module, _, leaf = param_name.rpartition(".")
    return module, leaf


def layer_modules(layer: int) -> list[str]:
    """Every HF linear module of one decoder layer, qkv parts first (the order conversion walks)."""
    prefix = f"model.layers.{layer}."
    return [prefix + name for name in (*QKV_PARTS, *_LAYER_LINEARS)]
