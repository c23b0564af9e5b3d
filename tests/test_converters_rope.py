"""The base checkpoint keeps the base's RoPE: rotary_base / rotary_scaling from transformers 5
`rope_parameters` and transformers 4 top-level `rope_theta` / `rope_scaling` (modelopt 0.47 alone finds
neither in a v5 config)."""

from __future__ import annotations

import json
import warnings

import factories
import pytest

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def rope_llama(**rope):
    """One layer, 16384 positions; `rope` in the transformers 5 spelling (its warnings silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return factories.tiny_llama(vocab_size=64, num_hidden_layers=1, max_position_embeddings=16384, **rope)


@pytest.mark.parametrize("tp", [1, 2])
def test_llama3_rope_reaches_the_checkpoint(tmp_path, tp):
    from deltazip.converters.base import export_checkpoint

    model = rope_llama(rope_parameters={"rope_theta": 500000.0, **LLAMA3_ROPE})
    assert "rope_theta" not in model.config.to_dict()  # transformers 5 spelling only
    export_checkpoint(model, tmp_path / "ckpt", tp)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["rotary_base"] == 500000.0
    assert config["rotary_scaling"] == LLAMA3_ROPE
    assert config["mapping"]["tp_size"] == tp


def test_llama2_rope_is_plain(tmp_path):
    from deltazip.converters.base import export_checkpoint

    model = rope_llama(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    export_checkpoint(model, tmp_path / "ckpt", 1)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["rotary_base"] == 10000.0
    assert config.get("rotary_scaling") is None


def test_transformers4_spelling():
    from deltazip.converters.base import rope_checkpoint_fields

    v4 = {"rope_theta": 500000.0, "rope_scaling": dict(LLAMA3_ROPE)}
    assert rope_checkpoint_fields(v4) == {"rotary_base": 500000.0, "rotary_scaling": LLAMA3_ROPE}
    assert rope_checkpoint_fields({"rope_theta": 10000}) == {"rotary_base": 10000.0, "rotary_scaling": None}
