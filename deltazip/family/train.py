"""Presets and the training loop: pretrain the base on the mixture, then one full fine-tune per task."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from deltazip.family.tasks import Example, Generator, sample_examples
from deltazip.family.tokenizer import BOS, EOS, PAD, VOCAB_SIZE
from deltazip.ui import progress


@dataclass(frozen=True)
class FamilyPreset:
    """Model dims and training schedule of one family preset (all of it goes into the content hash)."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 256
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    batch_size: int = 32
    base_steps: int = 1300
    base_lr: float = 1e-3
    finetune_steps: int = 180
    finetune_lr: float = 5e-4
    warmup_steps: int = 20
    eval_examples: int = 200
    calib_lines: int = 256
    train_threads: int = 1  # fixed per preset: CPU matmul results can depend on the thread count

    def llama_config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=VOCAB_SIZE, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=self.max_position_embeddings,
            rope_parameters=dict(self.rope_parameters), rms_norm_eps=1e-5, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, pad_token_id=0, dtype="float32")

    def scaled(self, steps_scale: float) -> FamilyPreset:
        """The same preset with shortened schedules (tests only)."""
        d = asdict(self)
        for key in ("base_steps", "finetune_steps", "warmup_steps"):
            d[key] = max(1, round(d[key] * steps_scale))
        return FamilyPreset(**d)


PRESETS: dict[str, FamilyPreset] = {
    "tiny": FamilyPreset("tiny", hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2),
    "small": FamilyPreset(
        "small", hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=2, base_lr=4e-4, finetune_lr=4e-4, base_steps=650, finetune_steps=40,
        warmup_steps=10,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
}


def encode_batch(examples: list[Example], vocab: dict[str, int],
                 answer_only: bool) -> tuple[torch.Tensor, ...]:
    """Right-padded input_ids, attention_mask, labels (-100 where no loss) for `<s>prompt answer</s>`."""
    rows, label_rows = [], []
    for prompt, answer in examples:
        prompt_ids = [vocab[BOS]] + [vocab[c] for c in prompt]
        answer_ids = [vocab[c] for c in answer] + [vocab[EOS]]
        rows.append(prompt_ids + answer_ids)
        masked_prompt = [-100] * len(prompt_ids) if answer_only else [-100] + prompt_ids[1:]
        label_rows.append(masked_prompt + answer_ids)
    longest = max(len(r) for r in rows)
    input_ids = torch.tensor([r + [vocab[PAD]] * (longest - len(r)) for r in rows])
    attention_mask = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (longest - len(r)) for r in label_rows])
    return input_ids, attention_mask, labels


def _lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress_frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_frac)))


def train(model: LlamaForCausalLM, generators: dict[str, Generator], held_out: set[str],
          vocab: dict[str, int], steps: int, lr: float, warmup: int, batch_size: int, seed: int,
          answer_only: bool, desc: str) -> float:
    """AdamW on freshly sampled batches with warmup + cosine decay; returns the mean loss of the last 10%."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    model.train()
    tail_losses = []
    for step in progress(range(steps), desc=desc):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, warmup, lr)
        input_ids, attention_mask, labels = encode_batch(
            sample_examples(generators, rng, batch_size, held_out), vocab, answer_only)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step >= steps - max(1, steps // 10):
            tail_losses.append(loss.item())
    model.eval()
    return sum(tail_losses) / len(tail_losses)
