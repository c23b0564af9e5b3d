"""GPU only — not verified on this machine: one TensorRT-LLM 1.2.x engine per rank with the delta layers.

Imported only by `deltazip.builder.trtllm.build_trtllm` after `require_trtllm()` succeeded. Every call below
was read against TensorRT-LLM sources (NVIDIA/TensorRT-LLM, the 1.2.0rc2-era snapshot available here; 1.2.1
is the pinned release — re-read on upgrade):

- tensorrt_llm/models/modeling_utils.py: ``PretrainedModel.from_checkpoint(ckpt_dir, rank=...)``,
  ``Module.named_modules()``; tensorrt_llm/models/llama/model.py: module names
  ``transformer.vocab_embedding``,
  ``transformer.layers.{i}.{attention.qkv, attention.dense, mlp.fc, mlp.gate, mlp.proj, input_layernorm,
  post_layernorm}``, ``transformer.ln_f``, ``lm_head`` (lm_head runs after ``gather_last_token_logits``).
- tensorrt_llm/builder.py: ``build(model, build_config)`` calls ``optimize_model_with_config`` (which applies
  ``fuse_gate_mlp`` when ``build_config.plugin_config.use_fused_mlp``), then
  ``Builder().create_builder_config(...)`` → ``BuilderConfig.trt_builder_config`` (the ``trt.IBuilderConfig``)
  and ``Engine.save(engine_dir)`` (config.json + rank{r}.engine).
- tensorrt_llm/plugin/plugin.py: ``PluginConfig.use_fused_mlp`` (default True); tensorrt_llm/builder.py:
  ``BuildConfig`` (dataclass: max_batch_size, max_input_len, max_seq_len, max_num_tokens,
  output_timing_cache, plugin_config).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from deltazip.builder.trtllm import delta_layer_kind
from deltazip.errors import DeltazipError


@contextlib.contextmanager
def aliased_plugin_io() -> Iterator[None]:
    """Every builder config TensorRT-LLM creates inside the block gets
    ``trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03`` (without it TensorRT ignores the DeltaGemm's aliased
    output and y is never written). ``build()`` creates its config itself, so the method is wrapped for the
    duration of the build and restored after."""
    from tensorrt_llm.builder import Builder

    from deltazip.plugins.registration import enable_aliased_io

    original = Builder.create_builder_config

    def create_builder_config(self, *args, **kwargs):
        config = original(self, *args, **kwargs)
        enable_aliased_io(config.trt_builder_config)
        return config

    Builder.create_builder_config = create_builder_config
    try:
        yield
    finally:
        Builder.create_builder_config = original


def swap_delta_layers(model, layout: dict, inputs) -> list[str]:
    """Replace each module that a delta changes by its delta layer; returns the swapped names."""
    from deltazip.plugins.delta_gemm_plugin import DeltaGemmShape
    from deltazip.plugins.trtllm_layers import TrtDeltaEmbedding, TrtDeltaLinear, TrtDeltaNorm

    modules = dict(model.named_modules())
    norms = (p.removesuffix(".weight") for p in layout["dense"])
    wanted = dict.fromkeys(layout["packed"]) | dict.fromkeys(norms)
    swapped = []
    for name in wanted:
        module = modules.get(name)
        if module is None:
            raise DeltazipError(f"the TensorRT-LLM model has no module {name} (a delta changes it)")
        parent_name, _, attr = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        kind = delta_layer_kind(name)
        if kind == "embedding":
            info = layout["packed"][name]
            # the full vocabulary (rank layouts split it)
            vocab = getattr(module, "num_embeddings", None) or info["out_features"]
            layer = TrtDeltaEmbedding(module, name, vocab, info["in_features"], inputs)
        elif kind == "norm":
            hidden = layout["dense"][f"{name}.weight"]["shape"][0]
            layer = TrtDeltaNorm(module, name, hidden, getattr(module, "eps", 1e-6), inputs)
        else:
            info = layout["packed"][name]
            shape = DeltaGemmShape(info["out_features"], info["in_features"], info["bits"],
                                   info["group_size"], info["sparse24"], inputs.num_slots)
            layer = TrtDeltaLinear(module, name, shape, kind, inputs)
        setattr(parent, attr, layer)
        swapped.append(name)
    return swapped


def build_rank_engine(checkpoint: Path, engine_dir: Path, rank: int, layout: dict, *, delta_slots: int,
                      max_batch_size: int, max_input_len: int, max_seq_len: int, use_fused_mlp: bool) -> None:
    """Load rank `rank` of the checkpoint, swap in the delta layers, build with fusion off, save."""
    from tensorrt_llm.builder import BuildConfig, build
    from tensorrt_llm.models import LLaMAForCausalLM

    from deltazip.plugins.trtllm_layers import DeltaEngineInputs

    model = LLaMAForCausalLM.from_checkpoint(str(checkpoint), rank=rank)
    max_num_tokens = max_batch_size * max_input_len
    inputs = DeltaEngineInputs(delta_slots, max_num_tokens, max_batch_size, model.config.dtype)
    swap_delta_layers(model, layout, inputs)
    # BuildConfig is a dataclass in tensorrt_llm/builder.py; output_timing_cache defaults to 'model.cache',
    # which build() would write into the current directory: off, so the build writes only planned files
    config = BuildConfig(max_batch_size=max_batch_size, max_input_len=max_input_len, max_seq_len=max_seq_len,
                         max_num_tokens=max_num_tokens, output_timing_cache=None)
    config.plugin_config.use_fused_mlp = use_fused_mlp  # fuse_gate_mlp would drop the mlp.fc/gate deltas
    with aliased_plugin_io():
        engine = build(model, config)
    engine.save(str(engine_dir))
