"""Converters: per-rank delta layouts against modelopt's exporter (the oracle), per-rank math, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import factories
import pytest
import torch
from click.testing import CliRunner
from factories import random_delta

from deltazip.converters.delta import RankDelta, shard_delta, write_delta_layout
from deltazip.converters.names import trt_target
from deltazip.converters.readers import read_delta_layout, read_trtllm_checkpoint
from deltazip.converters.split import ModelShape, check_tp, qkv_rows, row_cols, slice_cols_packed
from deltazip.errors import DeltazipError
from deltazip.kernels.synthetic import random_packed


def converter_llama(hidden: int = 128, intermediate: int = 384, vocab: int = 301, tied=False):
    """The converter tests' Llama: one layer, 8 heads and 2 KV heads (so that tp=8 cuts heads)."""
    return factories.tiny_llama(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=2,
                                max_position_embeddings=64, tie_word_embeddings=tied)


def merged(model, linears, exact):
    """A copy of `model` with the dequantized delta added to every weight (fp32)."""
    import copy

    out = copy.deepcopy(model)
    params = dict(out.named_parameters())
    with torch.no_grad():
        for module, packed in linears.items():
            params[module + ".weight"] += packed.dequantize()
        for name, tensor in exact.items():
            params[name] += tensor
    return out


def export(model, out: Path, tp: int) -> dict[int, dict[str, torch.Tensor]]:
    from deltazip.converters.base import export_checkpoint

    export_checkpoint(model, out, tp, dtype="float16")  # modelopt exports fp16 at best
    ckpt = read_trtllm_checkpoint(out)
    assert ckpt.tp == tp
    return {r: ckpt.load_rank(r) for r in range(tp)}


def assert_fp16_export_close(base16: torch.Tensor, delta: torch.Tensor, want16: torch.Tensor,
                             what: str) -> None:
    """fp16(W) + Δ_rank vs fp16(W + Δ): each side carries one fp16 rounding (unit roundoff 2^-11)."""
    got, want = base16.float() + delta, want16.float()
    bound = 2.0**-11 * (base16.float().abs() + want.abs()) * 1.001 + 6e-8  # + fp16 subnormal spacing
    excess = ((got - want).abs() - bound).max().item()
    assert excess <= 0, f"{what}: off by {excess:.3g} beyond fp16 rounding"


def dense_of(rank: RankDelta) -> dict[str, torch.Tensor]:
    """The rank-local delta of every TRT-LLM weight, dequantized."""
    out = {f"{m}.weight": p.dequantize() for m, p in rank.packed.items()}
    out.update(rank.dense)
    return out


# (hidden, intermediate, bits, group or None = one group per row, 2:4) per tp; tp 8 with 2:4 needs
# in_features / 8 to be a multiple of 32, so at hidden 128 it runs dense 4-bit deltas with group 16.
ORACLE_CASES = {
    1: (128, 384, 2, None, True),
    2: (128, 384, 2, 32, True),
    4: (128, 384, 3, None, True),
    8: (128, 384, 4, 16, False),
}


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_oracle_export_of_merged_model_equals_base_plus_rank_delta(tp, tmp_path):
    hidden, inter, bits, group, sparse = ORACLE_CASES[tp]
    model = converter_llama(hidden, inter)
    linears, exact = random_delta(model, bits, group, sparse, seed=tp)
    shape = ModelShape.from_hf_config(model.config.to_dict())
    ranks = shard_delta(linears, exact, shape, tp)
    write_delta_layout(ranks, tmp_path / "delta", "t", "fp", shape)
    layout = read_delta_layout(tmp_path / "delta")  # round trip through the files the plugin reads
    base = export(model, tmp_path / "base", tp)
    target = export(merged(model, linears, exact), tmp_path / "merged", tp)
    for r in range(tp):
        delta = dense_of(layout.load_rank(r))
        assert set(delta) <= set(base[r])
        assert len(delta) == len(base[r]), "every exported weight has a delta here"
        for name, want in target[r].items():
            assert base[r][name].shape == want.shape == delta[name].shape, name
            assert_fp16_export_close(base[r][name], delta[name], want, f"rank {r} {name}")


def test_oracle_tp8_sparse_hidden_256(tmp_path):
    """2:4 deltas at tp 8 (kv heads duplicated 4x) on a model wide enough for whole metadata words."""
    model = converter_llama(256, 768, vocab=257)
    linears, exact = random_delta(model, 2, None, True, seed=8)
    shape = ModelShape.from_hf_config(model.config.to_dict())
    ranks = shard_delta(linears, exact, shape, 8)
    base = export(model, tmp_path / "base", 8)
    target = export(merged(model, linears, exact), tmp_path / "merged", 8)
    for r in range(8):
        delta = dense_of(ranks[r])
        for name, want in target[r].items():
            assert_fp16_export_close(base[r][name], delta[name], want, f"rank {r} {name}")


def test_oracle_tied_embeddings_tp2(tmp_path):
    """Tied embeddings: the exporter writes lm_head = embedding, so the lm_head delta is the embedding's."""
    model = converter_llama(tied=True)
    linears, exact = random_delta(model, 2, None, True, seed=3)
    assert "lm_head" not in linears
    shape = ModelShape.from_hf_config(model.config.to_dict())
    ranks = shard_delta(linears, exact, shape, 2)
    base = export(model, tmp_path / "base", 2)
    target = export(merged(model, linears, exact), tmp_path / "merged", 2)
    for r in range(2):
        delta = dense_of(ranks[r])
        assert set(delta) == set(base[r])
        for name, want in target[r].items():
            assert_fp16_export_close(base[r][name], delta[name], want, f"rank {r} {name}")


def converter_model(family: str):
    """A one-layer Mistral or Qwen2 (transformers' own classes) shaped like converter_llama; Qwen2 has q/k/v
    biases, Mistral a sliding window."""
    import transformers

    torch.manual_seed(0)
    kw = dict(vocab_size=301, hidden_size=128, intermediate_size=384, num_hidden_layers=1,
              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64)
    if family == "mistral":
        config = transformers.MistralConfig(**kw, sliding_window=32, architectures=["MistralForCausalLM"])
        return transformers.MistralForCausalLM(config).eval()
    config = transformers.Qwen2Config(**kw, architectures=["Qwen2ForCausalLM"])
    return transformers.Qwen2ForCausalLM(config).eval()


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
@pytest.mark.parametrize("tp", [1, 2])
def test_oracle_mistral_and_qwen2_export_equals_base_plus_rank_delta(family, tp, tmp_path):
    """modelopt's export of (base + Δ) = exported base + our rank-local Δ, Qwen2's fused qkv bias included
    (its q/k/v bias deltas are exact, fused and split like the qkv weight's rows)."""
    model = converter_model(family)
    linears, exact = random_delta(model, 2, 32 if tp == 2 else None, True, seed=tp)
    biases = {n for n in exact if n.endswith("_proj.bias")}
    assert len(biases) == (3 if family == "qwen2" else 0)
    shape = ModelShape.from_hf_config(model.config.to_dict())
    ranks = shard_delta(linears, exact, shape, tp)
    write_delta_layout(ranks, tmp_path / "delta", "t", "fp", shape)
    layout = read_delta_layout(tmp_path / "delta")
    base = export(model, tmp_path / "base", tp)
    target = export(merged(model, linears, exact), tmp_path / "merged", tp)
    for r in range(tp):
        delta = dense_of(layout.load_rank(r))
        assert set(delta) == set(base[r]), "every exported tensor has a delta here"
        assert ("transformer.layers.0.attention.qkv.bias" in delta) == (family == "qwen2")
        for name, want in target[r].items():
            assert base[r][name].shape == want.shape == delta[name].shape, name
            assert_fp16_export_close(base[r][name], delta[name], want, f"{family} rank {r} {name}")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert config["architecture"] == {"mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[family]
    if family == "qwen2":
        assert (config["qwen_type"], config["attn_bias"]) == ("qwen2", True)


def test_awq_vocab_padding_matches_exporter():
    """The delta layout pads vocab like the exporter pads an AWQ base: to 64, then to tp."""
    from deltazip.converters.split import padded_vocab

    assert padded_vocab(301, 4) == 304
    assert padded_vocab(301, 4, 64) == 320
    assert padded_vocab(320, 8, 64) == 320


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_rank_partial_outputs_rebuild_unsharded_output(tp):
    """Row-parallel partial outputs sum, column-parallel ones concatenate, to x·Δᵀ of the unsharded delta."""
    model = converter_llama(256, 768, vocab=257)
    linears, _ = random_delta(model, 4, 32, True, seed=tp)
    shape = ModelShape.from_hf_config(model.config.to_dict())
    ranks = shard_delta(linears, {}, shape, tp)
    unsharded: dict[str, dict[str, torch.Tensor]] = {}  # TRT module → {q/k/v or "": dense delta}
    for hf_module, packed in linears.items():
        target = trt_target(hf_module)
        unsharded.setdefault(target.module, {})[target.part or ""] = packed.dequantize()
    gen = torch.Generator().manual_seed(0)
    for module, parts in unsharded.items():
        full = torch.cat([parts[p] for p in "qkv"]) if "q" in parts else parts[""]
        parallel = ranks[0].parallel[module]
        x = torch.randn(5, full.shape[1], generator=gen)
        y_full = x @ full.T  # the unsharded DeltaLinear's delta term (fused q, k, v without duplication)
        if parallel == "row":
            y_sum = sum(x[:, slice(*row_cols(full.shape[1], tp, r))] @ ranks[r].packed[module].dequantize().T
                        for r in range(tp))
            torch.testing.assert_close(y_sum, y_full, rtol=1e-5, atol=1e-5)
            continue
        y_cat = torch.cat([x @ ranks[r].packed[module].dequantize().T for r in range(tp)], dim=1)
        if parallel == "qkv":  # ranks hold [q_r; k_r; v_r] with kv heads duplicated
            want = torch.cat([y_full[:, qkv_rows(shape, tp, r)] for r in range(tp)], dim=1)
            torch.testing.assert_close(y_cat, want, rtol=1e-5, atol=1e-5)
        else:  # column / vocab: shards concatenate; vocab padding rows give zeros
            torch.testing.assert_close(y_cat[:, : full.shape[0]], y_full, rtol=1e-5, atol=1e-5)
            assert torch.count_nonzero(y_cat[:, full.shape[0]:]) == 0
    assert {k.parallel[m] for k in ranks for m in k.parallel} == {"qkv", "row", "column", "vocab"}


def test_row_split_keeps_groups_or_fails_clearly():
    gen = torch.Generator().manual_seed(0)
    sparse = random_packed(8, 128, 2, 128, True, gen)
    with pytest.raises(DeltazipError, match="2:4 metadata words"):
        slice_cols_packed(sparse, 0, 16, "x")  # tp 8 of 128 columns: half a metadata word
    dense = random_packed(8, 96, 4, 32, False, gen)
    with pytest.raises(DeltazipError, match="scale groups of 32"):
        slice_cols_packed(dense, 0, 48, "x")  # 48 columns cut a group of 32
    # 3-bit codes (10 per word) cut off word boundaries are repacked; result dequantizes to the slice
    odd = random_packed(8, 128, 3, 64, True, gen)
    part = slice_cols_packed(odd, 64, 128, "x")
    torch.testing.assert_close(part.dequantize(), odd.dequantize()[:, 64:128], rtol=0, atol=0)


@pytest.mark.parametrize(("kw", "message"), [
    ({"num_attention_heads": 6, "num_key_value_heads": 6, "hidden_size": 96},
     "does not divide num_attention_heads"),
    ({"num_attention_heads": 8, "num_key_value_heads": 3}, "neither divides nor is divisible"),
    ({"intermediate_size": 102}, "does not divide intermediate_size"),
    ({"hidden_size": 130}, "does not divide hidden_size"),
])
def test_bad_tp_is_a_clear_error(kw, message):
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
           "intermediate_size": 384, "num_hidden_layers": 1, "num_attention_heads": 8,
           "num_key_value_heads": 2, "vocab_size": 300} | kw
    with pytest.raises(DeltazipError, match=message):
        check_tp(ModelShape.from_hf_config(cfg), 4)
    with pytest.raises(DeltazipError, match="tp must be one of"):
        check_tp(ModelShape.from_hf_config(cfg), 3)


def save_base(tmp_path: Path, vocab: int = 130, name: str = "base") -> Path:
    """A tiny random Llama base with the family tokenizer, saved as an HF directory."""
    return factories.save_model(converter_llama(vocab=vocab), tmp_path / name, factories.family_tokenizer())


def save_artifact(tmp_path: Path, base: Path, fingerprint: str | None = None) -> Path:
    from transformers import AutoModelForCausalLM

    from deltazip.format import fingerprint_model, save_delta

    linears, exact = random_delta(AutoModelForCausalLM.from_pretrained(base), 2, None, True)
    return save_delta(tmp_path / "t.dz", "t", fingerprint or fingerprint_model(base), linears, exact)


def run_cli(*args: str):
    from deltazip.cli import cli

    return CliRunner().invoke(cli, ["-q", "convert", *args])


@pytest.mark.parametrize(("base_quant", "tp", "vocab_per_rank"), [("w4a16_awq", 1, 192), ("w8a16", 2, 65)])
def test_cli_converts_quantized_base_and_delta_with_matching_layouts(tmp_path, base_quant, tp,
                                                                     vocab_per_rank):
    base = save_base(tmp_path)  # vocab 130: AWQ pads it to 192, then to tp
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": f"reverse: abc{i} -> {i}cba"}) + "\n" for i in range(8)))
    ckpt_dir, layout_dir = tmp_path / "ckpt", tmp_path / "layout"
    result = run_cli("base", "--base", str(base), "--out", str(ckpt_dir), "--tp", str(tp), "--base-quant",
                     base_quant, "--calib", str(calib))
    assert result.exit_code == 0, result.output
    artifact = save_artifact(tmp_path, base)
    result = run_cli("delta", str(artifact), "--base", str(base), "--out", str(layout_dir), "--tp", str(tp),
                     "--base-quant", base_quant)
    assert result.exit_code == 0, result.output
    ckpt, layout = read_trtllm_checkpoint(ckpt_dir), read_delta_layout(layout_dir)
    quant_algo = {"w4a16_awq": "W4A16_AWQ", "w8a16": "W8A16"}[base_quant]
    assert ckpt.config["quantization"]["quant_algo"] == quant_algo
    assert layout.tp == ckpt.tp == tp
    for r in range(tp):
        base_tensors, delta = ckpt.load_rank(r), layout.load_rank(r)
        assert set(delta.packed) == {n.removesuffix(".weight") for n in base_tensors
                                     if n.endswith(".weight") and base_tensors[n].dim() == 2}
        assert base_tensors["lm_head.weight"].shape[0] == vocab_per_rank
        assert delta.packed["lm_head"].out_features == vocab_per_rank
        assert delta.packed["transformer.vocab_embedding"].out_features == vocab_per_rank
        for name, tensor in delta.dense.items():  # norms: replicated, same shape as the base weight
            assert tensor.shape == base_tensors[name].shape


def test_awq_base_rejects_tp_that_cuts_quantization_blocks():
    from deltazip.converters.base import check_quant_blocks

    shape = ModelShape(128, 384, 1, 8, 2, 16, 130)
    check_quant_blocks(shape, 1, "w4a16_awq")
    check_quant_blocks(shape, 2, "w8a16")
    with pytest.raises(DeltazipError, match="attention width / tp = 64 at tp 2 is not a multiple of 128"):
        check_quant_blocks(shape, 2, "w4a16_awq")


def test_cli_rejects_a_delta_of_another_base_before_output(tmp_path):
    base = save_base(tmp_path)
    artifact = save_artifact(tmp_path, base, fingerprint="sha256:" + "0" * 64)
    result = run_cli("delta", str(artifact), "--base", str(base), "--out", str(tmp_path / "out"), "--tp", "2")
    assert result.exit_code == 2
    assert "compressed against another base" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("verb", ["base", "delta"])
def test_cli_rejects_unsupported_architecture_and_bad_tp_before_output(tmp_path, verb):
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    gpt2_config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
    (gpt2 / "config.json").write_text(json.dumps(gpt2_config))
    args = [str(tmp_path)] if verb == "delta" else []  # any existing dir as the artifact: checks come first
    result = run_cli(verb, *args, "--base", str(gpt2), "--out", str(tmp_path / "out"), "--tp", "2")
    assert result.exit_code == 2
    assert "unsupported architecture ['GPT2LMHeadModel']" in result.output
    base = save_base(tmp_path, name="llama")
    result = run_cli(verb, *args, "--base", str(base), "--out", str(tmp_path / "out"), "--tp", "16")
    assert result.exit_code == 2
    assert "tp must be one of" in result.output
    assert not (tmp_path / "out").exists()


def test_peak_memory_of_7b_shaped_layers_stays_bounded(tmp_path):
    """Two 7B-shaped layers (hidden 4096, intermediate 11008, 32 heads / 8 kv heads), 2-bit 2:4, tp 4."""
    script = textwrap.dedent(f"""
        import resource, torch
        from deltazip.converters.delta import shard_delta, write_delta_layout
        from deltazip.converters.split import ModelShape
        from deltazip.packed import PackedLinear
        def packed(n, k):  # random words are valid codes; metadata words from valid positions
            words = torch.randint(-2**31, 2**31 - 1, (n, k // 32), dtype=torch.int32)
            meta = torch.full((n, k // 32), 0x44444444, dtype=torch.int32)
            ones = torch.full((n, 1), 1e-3, dtype=torch.float16)
            return PackedLinear(n, k, 2, k, True, words, meta, ones, ones.clone())
        shape = ModelShape(4096, 11008, 2, 32, 8, 128, 32000)
        dims = {{"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (1024, 4096),
                "self_attn.v_proj": (1024, 4096), "self_attn.o_proj": (4096, 4096),
                "mlp.gate_proj": (11008, 4096), "mlp.up_proj": (11008, 4096), "mlp.down_proj": (4096, 11008)}}
        linears = {{f"model.layers.{{i}}.{{n}}": packed(*d) for i in range(2) for n, d in dims.items()}}
        packed_bytes = sum(p.nbytes for p in linears.values())
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        write_delta_layout(shard_delta(linears, {{}}, shape, 4), "{tmp_path}/out", "big", "fp", shape)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        dense_fp16 = sum(d[0] * d[1] * 2 for d in dims.values()) * 2
        print(packed_bytes, peak - before, dense_fp16)
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    packed_bytes, growth, dense_fp16 = map(int, out.stdout.split())
    assert growth < 4 * packed_bytes, (growth, packed_bytes)
    assert growth < dense_fp16 / 4, (growth, dense_fp16)
    assert len(list((tmp_path / "out").glob("rank*.safetensors"))) == 4


def test_real_family_delta_oracle_tp2(tiny_family, tiny_deltas, tmp_path):
    """A real compressed fine-tune (default 2-bit 2:4) through `convert_delta`, against the exporter."""
    from transformers import AutoModelForCausalLM

    from deltazip.converters.delta import convert_delta
    from deltazip.format import decompress, load_delta

    delta = load_delta(tiny_deltas["reverse"])
    layout = read_delta_layout(convert_delta(tiny_deltas["reverse"], tiny_family.base_dir, tmp_path / "d", 2))
    base_model = AutoModelForCausalLM.from_pretrained(str(tiny_family.base_dir)).eval()
    target = AutoModelForCausalLM.from_pretrained(str(tiny_family.base_dir)).eval()
    params = dict(target.named_parameters())
    with torch.no_grad():
        for name, tensor in decompress(delta).items():
            params[name] += tensor.to(params[name].dtype)
    base, want = export(base_model, tmp_path / "base", 2), export(target, tmp_path / "target", 2)
    for r in range(2):
        rank = dense_of(layout.load_rank(r))
        assert set(rank) == set(base[r])
        for name, tensor in want[r].items():
            assert_fp16_export_close(base[r][name], rank[name].float(), tensor, f"rank {r} {name}")
