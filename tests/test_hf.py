"""deltazip.hf: config.json in both rope spellings (against transformers) and sharded safetensors weights."""

from __future__ import annotations

import json

import pytest
import torch
from factories import tiny_llama
from transformers import LlamaConfig

from deltazip.errors import DeltazipError
from deltazip.hf import ModelWeights, parse_config, read_config

# The architecture part of meta-llama/Llama-2-7b-hf's config.json (transformers 4: no rope_theta key at all).
LLAMA2_V4 = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 11008, "max_position_embeddings": 4096, "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "tie_word_embeddings": False, "torch_dtype": "float16", "vocab_size": 32000,
}
LLAMA3_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}
# meta-llama/Llama-3.1-8B as transformers 4 wrote it: top-level rope_theta + rope_scaling.
LLAMA3_V4 = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
    "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 131072,
    "mlp_bias": False,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_scaling": {**LLAMA3_SCALING, "rope_type": "llama3"}, "rope_theta": 500000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256,
}
# The same model as transformers 5 writes it: one rope_parameters object that holds rope_theta.
LLAMA3_V5 = {k: v for k, v in LLAMA3_V4.items() if k not in ("rope_scaling", "rope_theta", "torch_dtype")} | {
    "rope_parameters": {**LLAMA3_SCALING, "rope_type": "llama3", "rope_theta": 500000.0}, "dtype": "bfloat16"}


def hf_llama(**config):
    """A small random Llama (2 layers, hidden 32) for the saved-directory tests."""
    return tiny_llama(vocab_size=96, hidden_size=32, intermediate_size=64, max_position_embeddings=2048,
                      **config)


def test_llama2_v4_default_rope():
    cfg = parse_config(LLAMA2_V4)
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.rope_type) == (10000.0, {}, "default")
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers) == (32, 32, 128, 32)
    assert cfg.dtype == "float16" and cfg.rms_norm_eps == 1e-5 and not cfg.tie_word_embeddings


@pytest.mark.parametrize("raw", [LLAMA3_V4, LLAMA3_V5], ids=["v4", "v5"])
def test_llama3_rope_in_both_spellings(raw):
    cfg = parse_config(raw)
    assert cfg.rope_theta == 500000.0 and cfg.rope_type == "llama3"
    assert cfg.rope_scaling == {**LLAMA3_SCALING, "rope_type": "llama3"}
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size) == (8, 128, 14336, 128256)
    assert cfg.dtype == "bfloat16"


def test_v4_legacy_type_key():
    raw = LLAMA2_V4 | {"rope_scaling": {"type": "linear", "factor": 2.0}}
    assert parse_config(raw).rope_scaling == {"type": "linear", "factor": 2.0, "rope_type": "linear"}


@pytest.mark.parametrize("raw", [LLAMA2_V4, LLAMA3_V4, LLAMA3_V5], ids=["llama2", "llama3-v4", "llama3-v5"])
def test_rope_frequencies_match_transformers(raw):
    """The oracle: transformers' own rotary embedding, built from the same config.json."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from deltazip.runtime.model import rope_inv_freq

    ours = rope_inv_freq(parse_config(raw))
    theirs = LlamaRotaryEmbedding(LlamaConfig.from_dict(dict(raw))).inv_freq
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=0)


def test_missing_or_mistyped_field_names_key_and_file(tmp_path):
    no_hidden = {k: v for k, v in LLAMA2_V4.items() if k != "hidden_size"}
    (tmp_path / "config.json").write_text(json.dumps(no_hidden))
    with pytest.raises(DeltazipError, match=r"config\.json: missing 'hidden_size'"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_V4 | {"num_hidden_layers": "32"}))
    with pytest.raises(DeltazipError, match="'num_hidden_layers' must be int"):
        read_config(tmp_path)
    with pytest.raises(DeltazipError, match="no config.json"):
        read_config(tmp_path / "nowhere")


def test_tied_embeddings_read_from_a_saved_model(tmp_path):
    model, path = hf_llama(tie_word_embeddings=True), tmp_path / "tied"
    model.save_pretrained(path)
    cfg = read_config(path)
    assert cfg.tie_word_embeddings and cfg.model_type == "llama"
    assert cfg.architectures == ("LlamaForCausalLM",)
    weights = ModelWeights(path)
    assert "lm_head.weight" not in weights and "model.embed_tokens.weight" in weights
    from deltazip.runtime.model import load_llama

    ours = load_llama(path)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_sharded_weights_read_through_the_index(tmp_path):
    model, path = hf_llama(), tmp_path / "sharded"
    model.save_pretrained(path, max_shard_size="20KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    weights = ModelWeights(path)
    state = model.state_dict()
    assert weights.files == shards and weights.names() == sorted(state)
    for name, want in state.items():
        assert weights.shape(name) == tuple(want.shape) and weights.dtype(name) == want.dtype
        assert torch.equal(weights.get(name), want), name
    assert {k: v.shape for k, v in weights.load().items()} == {k: v.shape for k, v in state.items()}
    assert read_config(path).num_layers == 2


def test_sharded_model_runs_in_the_runtime_like_one_file(tmp_path):
    from deltazip.runtime.model import Segment, load_llama

    model, path = hf_llama(), tmp_path / "sharded"
    model.save_pretrained(path, max_shard_size="20KB")
    model.save_pretrained(tmp_path / "single")
    tokens = torch.arange(1, 9)

    def logits(model_dir):
        ours = load_llama(model_dir)
        return ours(tokens, [Segment(ours.new_cache(8), 0, 8)], all_logits=True)

    torch.testing.assert_close(logits(path), logits(tmp_path / "single"), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(logits(path), model(tokens[None]).logits[0], rtol=1e-4, atol=1e-4)


def test_index_naming_a_missing_shard_is_a_clear_error(tmp_path):
    model, path = hf_llama(), tmp_path / "sharded"
    model.save_pretrained(path, max_shard_size="20KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    missing = sorted(set(index["weight_map"].values()))[-1]
    (path / missing).unlink()
    with pytest.raises(DeltazipError, match=f"names shard {missing}, which is not in"):
        ModelWeights(path)


def test_index_pointing_at_the_wrong_shard_is_a_clear_error(tmp_path):
    model, path = hf_llama(), tmp_path / "sharded"
    model.save_pretrained(path, max_shard_size="20KB")
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == shards[0])
    index["weight_map"][name] = shards[1]
    index_path.write_text(json.dumps(index))
    with pytest.raises(DeltazipError, match=f"tensor {name} is not in its shard {shards[1]}"):
        ModelWeights(path)
