"""The Llama executor against transformers' LlamaForCausalLM, and DeltaLinear against a dense reference."""

from __future__ import annotations

import pytest
import torch
from factories import random_delta, tiny_llama
from transformers import LlamaForCausalLM

from deltazip.runtime.model import Segment, load_llama

CONFIGS = {
    "mha-default-rope": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa-llama3-rope": dict(num_attention_heads=4, num_key_value_heads=2, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "mqa-tied-bias": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
                          attention_bias=True, head_dim=24),
}


def make_hf_model(tmp_path, name: str, seed: int = 0) -> tuple[LlamaForCausalLM, object]:
    """CONFIGS[name] on a 2-layer, hidden-64 Llama with random norms and biases, saved to tmp_path/name."""
    model = tiny_llama(seed, tmp_path / name, norm_noise=0.1, vocab_size=97, intermediate_size=96,
                       rms_norm_eps=1e-5, **CONFIGS[name])
    return model, tmp_path / name


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(tmp_path, name):
    hf, path = make_hf_model(tmp_path, name)
    ours = load_llama(path, "float32")
    tokens = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits  # [2, 20, V]
        # prefill both sequences in one flattened batch, different lengths
        caches = [ours.new_cache(32), ours.new_cache(32)]
        got = ours(torch.cat([tokens[0, :12], tokens[1, :7]]),
                   [Segment(caches[0], 0, 12), Segment(caches[1], 0, 7)], all_logits=True)
        torch.testing.assert_close(got[:12], ref[0, :12], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got[12:], ref[1, :7], atol=1e-4, rtol=1e-4)
        # batched decode of the two sequences at different positions; then a chunked prefill of 3 tokens
        for step in range(5):
            p0, p1 = 12 + step, 7 + step
            got = ours(torch.stack([tokens[0, p0], tokens[1, p1]]),
                       [Segment(caches[0], p0, 1), Segment(caches[1], p1, 1)])
            torch.testing.assert_close(got[0], ref[0, p0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(got[1], ref[1, p1], atol=1e-4, rtol=1e-4)
        got = ours(tokens[1, 12:15], [Segment(caches[1], 12, 3)], all_logits=True)
        torch.testing.assert_close(got, ref[1, 12:15], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_close_to_fp32(tmp_path, dtype):
    hf, path = make_hf_model(tmp_path, "gqa-llama3-rope")
    ours = load_llama(path, dtype)
    assert ours.lm_head.weight.dtype == getattr(torch, dtype)
    tokens = torch.randint(0, 97, (10,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(tokens[None]).logits[0]
        got = ours(tokens, [Segment(ours.new_cache(10), 0, 10)], all_logits=True).float()
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


def test_load_rejects_non_model_dir(tmp_path):
    from deltazip.errors import DeltazipError

    with pytest.raises(DeltazipError, match="config.json"):
        load_llama(tmp_path)


# ---- delta layers -------------------------------------------------------------------------------------

def _delta_params(model) -> list[tuple[str, torch.Size]]:
    """A runtime Llama's delta targets in draw order: every linear + the embedding, then the norms."""
    linears = [(f"{name}.weight", module.weight.shape) for name, module in model.named_modules()
               if isinstance(module, (torch.nn.Linear, torch.nn.Embedding))]
    return linears + [(name, p.shape) for name, p in model.named_parameters() if "norm" in name]


def _merged_state(model, linears, exact) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name, packed in linears.items():
        state[f"{name}.weight"] += packed.dequantize()
    for name, delta in exact.items():
        state[name] += delta
    return state


def test_delta_linear_matches_dense_reference():
    from deltazip.kernels.synthetic import random_packed
    from deltazip.runtime.delta_linear import DeltaLinear
    from deltazip.runtime.model import BatchMapping

    gen = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(64, 48, bias=True)
    mapping = BatchMapping()
    layer = DeltaLinear(base, num_slots=4, mapping=mapping, kernel="torch")
    deltas = {0: random_packed(48, 64, 2, 32, True, generator=gen),
              1: random_packed(48, 64, 4, 64, True, generator=gen),  # 4 bits: too wide for slot 0's store
              3: random_packed(48, 64, 4, 16, False, generator=gen)}  # dense format: its own store
    for slot, packed in deltas.items():
        layer.set_delta(slot, packed=packed, bias=torch.full((48,), float(slot)) if slot == 3 else None)
    layer.set_delta(2, dense=torch.randn(48, 64, generator=gen) * 0.01)
    dense = {s: p.dequantize() for s, p in deltas.items()} | {2: layer.dense_by_slot[2]}
    assert len(layer.packed_stores) == 3
    x = torch.randn(9, 64, generator=gen)
    row_slot = torch.tensor([0, -1, 1, 3, 2, 0, -1, 3, 1], dtype=torch.int32)
    mapping.row_slot = row_slot
    got = layer(x)
    for i, slot in enumerate(row_slot.tolist()):
        weight = base.weight + (dense[slot] if slot >= 0 else 0)
        want = x[i] @ weight.t() + base.bias + (3.0 if slot == 3 else 0.0)
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)
    layer.clear(0)
    torch.testing.assert_close(layer(x)[0], base(x[0]), atol=1e-6, rtol=1e-6)


def test_mixed_delta_batch_matches_merged_models(tmp_path):
    from deltazip.runtime.delta_linear import enable_deltas, resident_delta_bytes, set_model_delta

    hf, path = make_hf_model(tmp_path, "gqa-llama3-rope")
    ours = load_llama(path)
    deltas = [random_delta(_delta_params(ours), b, 32, True, seed=s, exact_scale=0.1)
              for s, b in ((1, 2), (2, 4))]
    merged = []
    for linears, exact in deltas:
        m = LlamaForCausalLM(hf.config).eval()
        m.load_state_dict(_merged_state(hf, linears, exact))
        merged.append(m)
    enable_deltas(ours, num_slots=3, kernel="torch")
    set_model_delta(ours, 2, *deltas[0])
    set_model_delta(ours, 0, *deltas[1])
    assert resident_delta_bytes(ours) > 0
    tokens = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(3))
    caches = [ours.new_cache(9) for _ in range(3)]
    row_slot = torch.tensor([2] * 9 + [-1] * 9 + [0] * 9, dtype=torch.int32)
    with torch.no_grad():
        got = ours(tokens.flatten(), [Segment(c, 0, 9) for c in caches], row_slot, all_logits=True)
        want = [merged[0](tokens[:1]).logits[0], hf(tokens[1:2]).logits[0], merged[1](tokens[2:]).logits[0]]
    for i in range(3):
        torch.testing.assert_close(got[9 * i: 9 * i + 9], want[i], atol=2e-4, rtol=2e-4)


def test_tied_embedding_and_bias_deltas_match_merged(tmp_path):
    """A tied model: the embedding delta also moves lm_head; exact bias deltas are added per row."""
    from deltazip.kernels.synthetic import random_packed
    from deltazip.runtime.delta_linear import enable_deltas, set_model_delta

    hf, path = make_hf_model(tmp_path, "mqa-tied-bias")
    ours = load_llama(path)
    gen = torch.Generator().manual_seed(5)
    linears = {"model.embed_tokens": random_packed(97, 64, 4, 32, True, generator=gen)}
    exact = {"model.layers.1.self_attn.v_proj.bias": torch.randn(24, generator=gen) * 0.1}
    merged = LlamaForCausalLM(hf.config).eval()
    state = _merged_state(hf, linears, exact)
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied: one tensor in the merged model
    merged.load_state_dict(state)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    enable_deltas(ours, num_slots=1, kernel="torch")
    set_model_delta(ours, 0, linears, exact)
    tokens = torch.randint(0, 97, (2, 8), generator=gen)
    row_slot = torch.tensor([0] * 8 + [-1] * 8, dtype=torch.int32)
    with torch.no_grad():
        got = ours(tokens.flatten(), [Segment(ours.new_cache(8), 0, 8) for _ in range(2)], row_slot,
                   all_logits=True)
        torch.testing.assert_close(got[:8], merged(tokens[:1]).logits[0], atol=2e-4, rtol=2e-4)
        torch.testing.assert_close(got[8:], hf(tokens[1:]).logits[0], atol=2e-4, rtol=2e-4)
