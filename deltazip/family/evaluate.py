"""Exact-match accuracy of a Hugging Face causal LM on (prompt, answer) examples: batched greedy decoding."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from deltazip.errors import DeltazipError


def load_eval_set(path: str | Path) -> list[dict]:
    """Read an eval jsonl: one {"prompt": str, "answer": str} object per line."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise DeltazipError(f"cannot read eval set {path}: {e.strerror}") from None
    examples = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DeltazipError(f"{path}:{lineno}: not valid JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) \
                or not isinstance(row.get("answer"), str):
            raise DeltazipError(f"{path}:{lineno}: expected {{\"prompt\": str, \"answer\": str}}")
        examples.append(row)
    return examples


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 16,
                    batch_size: int = 256) -> list[str]:
    """Greedy completions of `prompts` (left-padded batches, KV cache), cut at EOS, special tokens dropped."""
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    completions: list[str] = []
    for start in range(0, len(prompts), batch_size):
        encoded = tokenizer(prompts[start:start + batch_size], add_special_tokens=True)["input_ids"]
        longest = max(len(ids) for ids in encoded)
        input_ids = torch.tensor([[pad_id] * (longest - len(ids)) + ids for ids in encoded], device=device)
        attention_mask = torch.tensor([[0] * (longest - len(ids)) + [1] * len(ids) for ids in encoded],
                                      device=device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=True)
        generated = []
        finished = torch.zeros(len(encoded), dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            next_ids = out.logits[:, -1].argmax(-1)
            next_ids = torch.where(finished, torch.full_like(next_ids, pad_id), next_ids)
            generated.append(next_ids)
            finished |= next_ids == eos_id
            if bool(finished.all()):
                break
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=-1)
            position_ids = position_ids[:, -1:] + 1
            out = model(input_ids=next_ids[:, None], attention_mask=attention_mask, position_ids=position_ids,
                        past_key_values=out.past_key_values, use_cache=True)
        token_rows = torch.stack(generated, dim=1).tolist()
        for row in token_rows:
            if eos_id in row:
                row = row[:row.index(eos_id)]
            completions.append(tokenizer.decode(row, skip_special_tokens=True))
    model.train(was_training)
    return completions


def exact_match(model, tokenizer, examples: list[dict], max_new_tokens: int = 16,
                batch_size: int = 256) -> float:
    """Fraction of examples whose greedy completion (up to EOS) equals the expected answer exactly."""
    if not examples:
        raise DeltazipError("exact_match needs at least one example")
    prompts = [e["prompt"] for e in examples]
    completions = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    return sum(c == e["answer"] for c, e in zip(completions, examples, strict=True)) / len(examples)
