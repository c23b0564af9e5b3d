"""Synthetic models and deltas for the tests: one of each factory, as plain functions (fixtures live in
conftest.py or beside their tests). Every factory is deterministic in its seed."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from deltazip.format.codec import PATTERNS_24
from deltazip.kernels.synthetic import random_packed
from deltazip.packed import PackedLinear

# The shape most tests use; each test overrides what it needs (head count for tp splits, RoPE, tying, ...).
TINY_LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=False)


# ---- tokenizers -------------------------------------------------------------------------------------------
def char_tokenizer():
    """One token per printable ASCII character (ids 3..97), <pad>/<s>/</s> = 0/1/2 (not the family's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{chr(c): c - 29 for c in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def family_tokenizer():
    """The tiny family's character tokenizer."""
    from deltazip.family.tokenizer import build_tokenizer

    return build_tokenizer()


# ---- models -----------------------------------------------------------------------------------------------
def tiny_llama(seed: int | None = 0, save_dir: Path | None = None, tokenizer=None, norm_noise: float = 0.0,
               **config):
    """A random HF LlamaForCausalLM in eval mode, built from ``TINY_LLAMA | config`` after
    ``torch.manual_seed(seed)`` (seed None: continue the global generator).

    norm_noise > 0 adds N(0, norm_noise²) to every norm weight and bias (HF initialises them to 1 and 0, so
    a test of them needs them random). With save_dir the model (and `tokenizer`, if given) is saved there
    in HF format."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    cfg = LlamaConfig(**(TINY_LLAMA | config))
    cfg.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(cfg).eval()
    if norm_noise:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name or "bias" in name:
                    p.add_(torch.randn_like(p) * norm_noise)
    if save_dir is not None:
        save_model(model, save_dir, tokenizer)
    return model


def save_model(model, out: Path, tokenizer=None) -> Path:
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def perturb_(model, spread: str = "mean_abs") -> None:
    """Make `model` a "full fine-tune" of itself: add N(0, σ²) to every parameter, σ = 0.01 for vectors and
    0.02 × the matrix's mean |w| (spread "mean_abs") or standard deviation (spread "std") for matrices."""
    with torch.no_grad():
        for p in model.parameters():
            size = p.abs().mean() if spread == "mean_abs" else p.std()
            p.add_((0.01 if p.dim() == 1 else 0.02 * size) * torch.randn_like(p))


def finetune_pair(root: Path, tokenizer, spread: str = "mean_abs", seed: int = 0,
                  **config) -> tuple[Path, Path]:
    """root/base (a tiny_llama) and root/ft (the same model after perturb_), both with `tokenizer`."""
    model = tiny_llama(seed, root / "base", tokenizer, **config)
    perturb_(model, spread)
    return root / "base", save_model(model, root / "ft", tokenizer)


def write_calib(path: Path, count: int = 100) -> Path:
    """Calibration lines ({"text": ...} per line) in the char tokenizer's alphabet."""
    lines = [json.dumps({"text": f"the quick brown fox {i} jumps over {i * 7} dogs"}) for i in range(count)]
    path.write_text("\n".join(lines))
    return path


def compress_inputs(root: Path) -> Path:
    """What compress_model needs: root/base, root/ft (char tokenizer, spread "mean_abs"), root/calib.jsonl."""
    finetune_pair(root, char_tokenizer())
    write_calib(root / "calib.jsonl")
    return root


# ---- packed deltas ----------------------------------------------------------------------------------------
def random_codes(n: int, k: int, bits: int, sparse: bool, group: int, gen: torch.Generator,
                 symmetric: bool = False):
    """Raw quantized values of one [n, k] linear: (codes [n, k/2 or k], 2:4 positions [n, k/2] drawn as
    pattern symbols or None, scales [n, k/group] fp32, zeros [n, k/group] fp32: random integer codes, or
    2^(bits-1) everywhere with `symmetric`, the writer's grid)."""
    n_codes = k // 2 if sparse else k
    codes = torch.randint(0, 1 << bits, (n, n_codes), generator=gen)
    positions = None
    if sparse:
        symbols = torch.randint(0, 6, (n * k // 4,), generator=gen)
        positions = torch.tensor(PATTERNS_24)[symbols].reshape(n, k // 2)
    scales = torch.rand(n, k // group, generator=gen) + 0.01
    if symmetric:
        zeros = torch.full((n, k // group), float(1 << (bits - 1)))
    else:
        zeros = torch.randint(0, 1 << bits, (n, k // group), generator=gen).float()
    return codes, positions, scales, zeros


def random_linear(n: int, k: int, bits: int, sparse: bool, group: int, seed: int = 0) -> PackedLinear:
    """A PackedLinear from random_codes(symmetric=True) with its own seed (the artifact tests' draw)."""
    gen = torch.Generator().manual_seed(seed)
    codes, positions, scales, zeros = random_codes(n, k, bits, sparse, group, gen, symmetric=True)
    return PackedLinear.from_codes(codes, scales, zeros, bits, group, positions=positions, in_features=k)


def random_delta(params, bits: int = 2, group_size: int | None = None, sparse24: bool = True, seed: int = 0,
                 exact_scale: float = 0.01) -> tuple[dict[str, PackedLinear], dict[str, torch.Tensor]]:
    """(linears, exact) of a random delta: a packed delta (deltazip.kernels.synthetic.random_packed) for
    every 2-D parameter ``X.weight``, keyed by its module name X, and an exact N(0, exact_scale²) delta for
    every other parameter, keyed by its name. group_size None: one group per row.

    `params` fixes the names, shapes and the order of the draws: an nn.Module (its named_parameters), a saved
    model directory (its model.safetensors, names sorted), a {name: tensor} mapping or (name, shape) pairs."""
    if isinstance(params, torch.nn.Module):
        params = params.named_parameters()
    elif isinstance(params, Path):
        from safetensors.torch import load_file

        params = sorted(load_file(params / "model.safetensors").items())
    elif isinstance(params, Mapping):
        params = params.items()
    gen = torch.Generator().manual_seed(seed)
    linears, exact = {}, {}
    for name, tensor in params:
        shape = tuple(tensor.shape if isinstance(tensor, torch.Tensor) else tensor)
        if len(shape) == 2:
            n, k = shape
            linears[name.removesuffix(".weight")] = random_packed(n, k, bits, group_size or k, sparse24, gen)
        else:
            exact[name] = torch.randn(shape, generator=gen) * exact_scale
    return linears, exact


# ---- a base and a store of deltas -------------------------------------------------------------------------
def synthetic_base(out: Path, seed: int = 0) -> Path:
    """A random tiny Llama (GQA, llama3 RoPE, 256 positions) with the family tokenizer, in HF format."""
    tokenizer = family_tokenizer()
    tiny_llama(seed, out, tokenizer, vocab_size=len(tokenizer), max_position_embeddings=256,
               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 64})
    return out


def store_delta(base: Path, seed: int, bits: int = 2):
    """The store's deltas: 2:4, group 32, every linear + embedding + lm_head packed, norms exact (σ 0.1)."""
    return random_delta(base, bits, 32, True, seed, exact_scale=0.1)


def synthetic_store(root: Path, names: Iterable[str] = ("a", "b", "c")) -> tuple[Path, Path]:
    """root/base (synthetic_base) and root/deltas with one artifact per name (2- and 4-bit alternating),
    plus 'wrongbase' (another base's fingerprint) and 'corrupt' (a flipped payload byte)."""
    from deltazip.format import fingerprint_model, save_delta

    base = synthetic_base(root / "base")
    store = root / "deltas"
    fingerprint = fingerprint_model(base)
    for i, name in enumerate(names):
        bits = 2 + 2 * (i % 2)
        save_delta(store / f"{name}.dz", name, fingerprint, *store_delta(base, seed=i + 1, bits=bits))
    save_delta(store / "wrongbase.dz", "wrongbase", "sha256:" + "0" * 64, *store_delta(base, seed=9))
    save_delta(store / "corrupt.dz", "corrupt", fingerprint, *store_delta(base, seed=10))
    payload = store / "corrupt.dz" / "delta.safetensors"
    data = bytearray(payload.read_bytes())
    data[-100] ^= 0xFF
    payload.write_bytes(bytes(data))
    return base, store
