"""A random tiny Llama base, a fine-tune (base + small perturbation) and calibration lines (shared helper)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _char_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{chr(c): c - 29 for c in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_synthetic(root: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    tokenizer = _char_tokenizer()
    model = LlamaForCausalLM(config)
    for name in ("base", "ft"):
        if name == "ft":
            with torch.no_grad():
                for p in model.parameters():
                    p.add_((0.01 if p.dim() == 1 else 0.02 * p.abs().mean()) * torch.randn_like(p))
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    lines = [json.dumps({"text": f"the quick brown fox {i} jumps over {i * 7} dogs"}) for i in range(100)]
    (root / "calib.jsonl").write_text("\n".join(lines))
    return root
