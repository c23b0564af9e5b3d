"""Checkpoints as published: Llama-2/3/3.1 rope (transformers 4 and 5 spellings), sharded safetensors,
bf16/fp16/fp32, tied embeddings, no pad token, generation_config.json; Mistral and Qwen2 (q/k/v biases).

Each case is a small synthetic model built with transformers' own classes: a base, and a fine-tune = base
+ a small perturbation. Each goes through compression → apply_delta (NLL within 1% of the fine-tune on
sequences the fine-tune generates), the executor (logits vs transformers) and the runtime delta layers.
Bad input (missing or overlapping shards, mismatched architectures or dtypes, --device cuda without CUDA,
--resume with other settings) fails in one line with nothing written; --resume after a kill gives the
artifact of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
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

from deltazip.config import CompressConfig
from deltazip.errors import DeltazipError

FAST = CompressConfig(n_samples=8, seq_len=32, tune_steps=10)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
# name → (config class, model class, config overrides, save dtype, shard, rope spelling "v4"/"v5")
CASES = {
    "llama2-fp16-sharded": ("LlamaConfig", "LlamaForCausalLM", {}, torch.float16, True, "v4"),
    "llama3-bf16-v4-rope": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": LLAMA3_ROPE},
                            torch.bfloat16, False, "v4"),
    "llama31-fp32-v5-rope-sharded": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": LLAMA3_ROPE},
                                     torch.float32, True, "v5"),
    "llama32-tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}, torch.float32, False,
                     "v5"),
    "mistral-bf16": ("MistralConfig", "MistralForCausalLM", {}, torch.bfloat16, False, "v4"),
    "qwen2-bias-sharded": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}, torch.float32,
                           True, "v5"),
}


def char_tokenizer(pad: bool = False):
    """factories.char_tokenizer's alphabet, but no pad token unless asked (as many published tokenizers)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{chr(c): c - 29 for c in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    extra = {"pad_token": "<unk>"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", **extra)


def v4_rope(config_path: Path) -> None:
    """Rewrite config.json's rope fields in transformers 4 spelling (top-level rope_theta + rope_scaling)."""
    cfg = json.loads(config_path.read_text())
    rope = dict(cfg.pop("rope_parameters", None) or {})
    cfg["rope_theta"] = rope.pop("rope_theta", 10000.0)
    rope_type = rope.pop("rope_type", "default")
    cfg["rope_scaling"] = None if rope_type == "default" else {"rope_type": rope_type, **rope}
    config_path.write_text(json.dumps(cfg, indent=2))


def save(model, path: Path, dtype: torch.dtype, shard: bool, rope: str) -> Path:
    model.to(dtype).save_pretrained(path, max_shard_size="40KB" if shard else "10GB")
    char_tokenizer().save_pretrained(path)
    if rope == "v4":
        v4_rope(path / "config.json")
    model.float()
    return path


def build_case(root: Path, name: str) -> tuple[Path, Path]:
    """base/ and ft/ of one case (the fine-tune: base + 3% relative noise on every tensor)."""
    import transformers

    config_cls, model_cls, overrides, dtype, shard, rope = CASES[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**COMMON, **overrides})
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0: randomise so they are exercised
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    base = save(model, root / name / "base", dtype, shard, rope)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.03 * p.abs().mean() * torch.randn_like(p))
    ft = save(model, root / name / "ft", dtype, shard, rope)
    return base, ft


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    return factories.write_calib(tmp_path_factory.mktemp("calib") / "calib.jsonl", count=64)


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("real")
    return {name: build_case(root, name) for name in CASES}


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_config_reader_reads_both_rope_spellings(cases):
    from deltazip.hf import read_config

    v4 = read_config(cases["llama3-bf16-v4-rope"][0])
    v5 = read_config(cases["llama31-fp32-v5-rope-sharded"][0])
    assert v4.rope_theta == v5.rope_theta == 500000.0
    assert v4.rope_scaling == v5.rope_scaling and v4.rope_type == "llama3"
    assert read_config(cases["qwen2-bias-sharded"][0]).qkv_bias
    assert not read_config(cases["mistral-bf16"][0]).qkv_bias
    assert (cases["llama2-fp16-sharded"][0] / "model.safetensors.index.json").is_file()
    assert (cases["llama2-fp16-sharded"][0] / "generation_config.json").is_file()


@pytest.mark.parametrize("name", sorted(CASES))
def test_executor_logits_match_transformers(cases, name):
    from deltazip.runtime.model import Segment, load_llama

    path = cases[name][1]
    ref_model, ours = hf_model(path), load_llama(path, "float32")
    tokens = torch.randint(3, 128, (24,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = ref_model(tokens[None]).logits[0]
        got = ours(tokens, [Segment(ours.new_cache(32), 0, 24)], all_logits=True)
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=2e-4)


def sample_sequences(model, n: int = 8, length: int = 24) -> torch.Tensor:
    """The fine-tune's own "task": sequences it generates (sampled, seeded) from BOS."""
    torch.manual_seed(5)
    start = torch.ones(n, 1, dtype=torch.long)
    with torch.no_grad():
        return model.generate(start, do_sample=True, max_new_tokens=length, min_new_tokens=length,
                              pad_token_id=0, top_k=0)


def nll(model, seqs: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(seqs).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 seqs[:, 1:].reshape(-1)).item()


@pytest.mark.parametrize("name", sorted(CASES))
def test_compress_round_trip_and_runtime_deltas(cases, calib, tmp_path, name):
    from deltazip.compress import compress_model
    from deltazip.format import apply_delta, decompress, load_delta
    from deltazip.runtime.delta_linear import enable_deltas, set_model_delta
    from deltazip.runtime.model import Segment, load_llama

    base, ft = cases[name]
    settings = dataclasses.replace(FAST, bits=4)
    artifact = compress_model(base, ft, tmp_path / "d.dz", settings, calib=calib)
    merged_dir = apply_delta(base, artifact, tmp_path / "merged")
    assert sorted(p.name for p in merged_dir.iterdir()) == sorted(p.name for p in base.iterdir())
    finetune, merged, base_model = hf_model(ft), hf_model(merged_dir), hf_model(base)
    seqs = sample_sequences(finetune)
    nll_ft, nll_merged, nll_base = nll(finetune, seqs), nll(merged, seqs), nll(base_model, seqs)
    assert abs(nll_merged - nll_ft) <= 0.01 * nll_ft, (nll_base, nll_ft, nll_merged)
    assert abs(nll_merged - nll_ft) < abs(nll_base - nll_ft)
    # the executor with the delta in a slot == transformers on the merged model (fp32)
    delta = load_delta(artifact)
    assert set(decompress(delta)) <= {n for n, _ in finetune.named_parameters()} | {"lm_head.weight"}
    ours = load_llama(base, "float32")
    enable_deltas(ours, num_slots=1, kernel="torch")
    set_model_delta(ours, 0, delta.linears, delta.exact)
    tokens = seqs[0]
    with torch.no_grad():
        want = merged(tokens[None]).logits[0]
        got = ours(tokens, [Segment(ours.new_cache(32), 0, len(tokens))],
                   torch.zeros(len(tokens), dtype=torch.int32), all_logits=True)
    # the merged checkpoint is rounded to the checkpoint dtype; the slot adds Δ̂ in fp32
    tol = {torch.float32: 1e-3, torch.float16: 3e-3, torch.bfloat16: 2e-2}[CASES[name][3]]
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


# ---- bad input ------------------------------------------------------------------------------------------

def _compress_error(base: Path, ft: Path, out: Path, calib: Path, **kw) -> str:
    from deltazip.compress import compress_model

    with pytest.raises(DeltazipError) as info:
        compress_model(base, ft, out, dataclasses.replace(FAST, **kw), calib=calib)
    assert not out.exists() and not (out.parent / f".{out.name}.partial").exists()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_index_naming_a_missing_shard(cases, calib, tmp_path):
    import shutil

    base, ft = cases["llama2-fp16-sharded"]
    broken = tmp_path / "broken"
    shutil.copytree(ft, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (broken / shard).unlink()
    assert f"names shard {shard}" in _compress_error(base, broken, tmp_path / "x.dz", calib)


def test_shards_with_overlapping_tensors(cases, calib, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    base, ft = cases["qwen2-bias-sharded"]
    broken = tmp_path / "overlap"
    shutil.copytree(ft, broken)
    (broken / "model.safetensors.index.json").unlink()  # a directory of shards without an index
    shards = sorted(broken.glob("*.safetensors"))
    first = load_file(shards[0])
    extra = load_file(shards[1])
    save_file({**extra, next(iter(first)): next(iter(first.values()))}, str(shards[1]))
    assert "is in two shards" in _compress_error(base, broken, tmp_path / "x.dz", calib)


def test_mismatched_architecture_and_dtype(cases, calib, tmp_path):
    llama_base = cases["llama3-bf16-v4-rope"][0]
    mistral_ft = cases["mistral-bf16"][1]
    message = _compress_error(llama_base, mistral_ft, tmp_path / "a.dz", calib)
    assert "differ in config 'model_type'" in message
    fp32_ft = tmp_path / "fp32"
    hf_model(cases["mistral-bf16"][1]).save_pretrained(fp32_ft)
    char_tokenizer().save_pretrained(fp32_ft)
    message = _compress_error(cases["mistral-bf16"][0], fp32_ft, tmp_path / "b.dz", calib)
    assert "differ in dtype" in message and "bfloat16 in the base but float32 in the target" in message


def run_cli(*args: str):
    from deltazip.cli import cli

    return CliRunner().invoke(cli, list(args))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_device_cuda_without_cuda_is_one_line(cases, calib, tmp_path):
    base, ft = cases["llama32-tied"]
    result = run_cli("compress", "--base", str(base), "--target", str(ft), "--out", str(tmp_path / "x.dz"),
                     "--calib", str(calib), "--device", "cuda")
    assert result.exit_code == 2
    assert "--device cuda: CUDA is not available" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "x.dz").exists()
    result = run_cli("compress", "--base", str(base), "--target", str(ft), "--out", str(tmp_path / "x.dz"),
                     "--calib", str(calib), "--device", "tpu")
    assert result.exit_code == 2 and "--device must be" in result.output


# ---- resume ---------------------------------------------------------------------------------------------

KILLER = textwrap.dedent("""
    import os, signal, sys
    from deltazip.compress import resume
    from deltazip.compress import compress_model
    from deltazip.config import CompressConfig

    save = resume.Checkpoints.save
    def save_then_die(self, index, *args, **kwargs):
        save(self, index, *args, **kwargs)
        if index == int(os.environ["KILL_AFTER_BLOCK"]):
            os.kill(os.getpid(), signal.SIGKILL)  # a kill: no cleanup, no atexit
    resume.Checkpoints.save = save_then_die
    base, ft, out, calib = sys.argv[1:5]
    compress_model(base, ft, out, CompressConfig(n_samples=8, seq_len=32, tune_steps=10), calib=calib,
                   name="d", resume=sys.argv[5] == "resume")
""")


def _artifact_files(path: Path) -> dict[str, object]:
    """Each file's content: safetensors as (metadata, {name: bytes}) — the header's metadata order is a
    hash-map order that varies between processes — and the manifest without its wall time."""
    from safetensors import safe_open

    files: dict[str, object] = {}
    for p in sorted(path.iterdir()):
        if p.suffix == ".safetensors":
            with safe_open(str(p), framework="np") as f:
                files[p.name] = (f.metadata(), {k: f.get_tensor(k).tobytes() for k in sorted(f.keys())})
        elif p.name != "manifest.json":
            files[p.name] = p.read_bytes()
    manifest = json.loads((path / "manifest.json").read_text())
    for key in ("compress_seconds", "artifact_bytes", "bits_per_weight", "ratio"):
        manifest["stats"].pop(key, None)  # the wall time, and sizes that count its digits in the manifest
    for entry in manifest.get("files", {}).values():  # file hashes follow the header's metadata order
        for key in ("blake3", "sha256"):
            entry.pop(key, None)
    files["manifest.json"] = json.dumps(manifest, sort_keys=True)
    return files


def test_resume_after_a_kill_gives_the_uninterrupted_artifact(calib, tmp_path):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**COMMON, "num_hidden_layers": 4})
    model = transformers.LlamaForCausalLM(config)
    base = save(model, tmp_path / "base", torch.float32, False, "v5")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.03 * p.abs().mean() * torch.randn_like(p))
    ft = save(model, tmp_path / "ft", torch.float32, False, "v5")
    # as the CLI sets it (deltazip.threads.early_env): MKL results that do not depend on buffer alignment
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KILL_AFTER_BLOCK": "1", "MKL_CBWR": "AUTO,STRICT"}
    script = tmp_path / "killer.py"
    script.write_text(KILLER)

    def run(out: Path, mode: str, kill_after: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), str(base), str(ft), str(out), str(calib), mode],
                              env={**env, "KILL_AFTER_BLOCK": str(kill_after)}, capture_output=True,
                              text=True, timeout=600)

    whole = tmp_path / "whole.dz"
    assert run(whole, "fresh", -1).returncode == 0
    out = tmp_path / "resumed.dz"
    killed = run(out, "fresh", 1)
    assert killed.returncode == -9, killed.stderr
    partial = tmp_path / ".resumed.dz.partial"
    assert not out.exists()
    assert sorted(p.name for p in partial.glob("block-*")) == ["block-00000.safetensors",
                                                                "block-00001.safetensors"]
    resumed = run(out, "resume", -1)
    assert resumed.returncode == 0, resumed.stderr
    assert not partial.exists()
    got, want = _artifact_files(out), _artifact_files(whole)
    assert got.keys() == want.keys()
    differing = [file for file in want if got[file] != want[file]]  # tensors bit for bit, manifest w/o time
    assert not differing, f"resumed artifact differs from the uninterrupted one in {differing}"

    # --resume with other settings, or with nothing to resume: one clear line, nothing written
    killed = run(tmp_path / "again.dz", "fresh", 0)
    assert killed.returncode == -9
    from deltazip.compress import compress_model

    changed = r"different settings \(settings\.bits: 2 then, 4 now\); pass the same"
    with pytest.raises(DeltazipError, match=changed) as info:
        compress_model(base, ft, tmp_path / "again.dz", dataclasses.replace(FAST, bits=4), calib=calib,
                       name="d", resume=True)
    assert "\n" not in str(info.value) and not (tmp_path / "again.dz").exists()
    with pytest.raises(DeltazipError, match="no interrupted run to resume"):
        compress_model(base, ft, tmp_path / "never.dz", FAST, calib=calib, resume=True)


def test_linear_groups_do_not_depend_on_reused_addresses(tmp_path):
    """A freed input's reused address once merged o_proj into [gate, up] (resumed artifacts differed in ~1
    run of 3); allocations between the probes vary the heap."""
    import transformers

    from deltazip.compress.blocks import BlockRunner, sequential_groups
    from deltazip.hf import ModelWeights

    model = save(transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON)), tmp_path / "m",
                 torch.float32, False, "v5")
    runner = BlockRunner(model)
    layer = runner.layer(0, ModelWeights(model))
    want = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
            ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    junk = []
    for i in range(200):
        junk.append(torch.empty(int(torch.randint(1, 4000, (1,)))))
        if i % 3 == 0:
            junk.pop(0)
        assert sequential_groups(runner, layer, torch.randn(2, 32, COMMON["hidden_size"])) == want


# ---- defaults by size, eval --device ----------------------------------------------------------------------

def test_defaults_scale_with_model_size_and_keep_explicit_values():
    from deltazip.compress.defaults import scale_defaults

    tiny = scale_defaults(CompressConfig(), 10_000_000)
    assert (tiny.n_samples, tiny.seq_len, tiny.tune_steps, tiny.tune_seconds) == (256, 32, 100, 0.0)
    seven = scale_defaults(CompressConfig(), 6_700_000_000)
    assert (seven.n_samples, seven.seq_len, seven.tune_steps, seven.tune_seconds) == (128, 2048, 20, 180.0)
    thirteen = scale_defaults(CompressConfig(seq_len=1024), 13_000_000_000)
    assert (thirteen.seq_len, thirteen.tune_steps) == (1024, 10)  # an explicit value stays


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_eval_device_cuda_without_cuda_is_one_line(tmp_path):
    result = run_cli("eval", str(tmp_path), "--device", "cuda:1")
    assert result.exit_code == 2
    assert "--device cuda:1: CUDA is not available" in result.output
    assert len(result.output.strip().splitlines()) == 1
