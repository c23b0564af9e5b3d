"""Score one model on a task: exact-match accuracy, answer perplexity, optional lm-eval-harness scores.

Every candidate goes through one path: the base model is loaded with transformers, then the candidate's
weights (a full state dict, a dense delta, or a ready nn.Module such as a fake-quantized one) are applied.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from deltazip.errors import DeltazipError
from deltazip.hf import add_delta, load_model, replace_weights

if TYPE_CHECKING:
    from torch import nn


def heldout_texts(examples: list[dict]) -> list[str]:
    """The held-out texts perplexity is measured on: each example's prompt followed by its answer."""
    return [ex["prompt"] + ex["answer"] for ex in examples]


def perplexity(model: nn.Module, tokenizer, texts: list[str], context_lens: list[int] | None = None,
               batch_size: int = 16, max_len: int = 256) -> float:
    """exp(mean next-token NLL) over `texts` + EOS, right-padded batches, padding ignored.

    The first context_lens[i] tokens of text i are context only (not scored).
    """
    import torch
    import torch.nn.functional as F

    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(texts), batch_size):
        ids = [(tokenizer(t)["input_ids"] + eos)[:max_len] for t in texts[start:start + batch_size]]
        width = max(len(x) for x in ids)
        input_ids = torch.zeros(len(ids), width, dtype=torch.long)
        scored = torch.zeros(len(ids), width, dtype=torch.bool)  # tokens whose NLL counts
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
            first = max(1, context_lens[start + row]) if context_lens else 1
            scored[row, first:len(seq)] = True
        device = next(model.parameters()).device
        input_ids, scored, mask = input_ids.to(device), scored.to(device), mask.to(device)
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
        labels = input_ids[:, 1:].masked_fill(~scored[:, 1:], -100)
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                              ignore_index=-100, reduction="sum")
        total_nll += nll.item()
        total_tokens += int((labels != -100).sum())
    if total_tokens == 0:
        raise DeltazipError("perplexity needs at least one scored token")
    return math.exp(total_nll / total_tokens)


def answer_perplexity(model: nn.Module, tokenizer, examples: list[dict]) -> float:
    """Perplexity of each answer + EOS given its prompt (the prompt tokens are context, not scored)."""
    context_lens = [len(tokenizer(ex["prompt"])["input_ids"]) for ex in examples]
    return perplexity(model, tokenizer, heldout_texts(examples), context_lens)


def score(model: nn.Module, tokenizer, examples: list[dict], max_new_tokens: int = 16) -> tuple[float, float]:
    """(exact-match accuracy, answer perplexity) of `model` on one task's held-out examples."""
    from deltazip.family import exact_match

    accuracy = exact_match(model, tokenizer, examples, max_new_tokens=max_new_tokens)
    return float(accuracy), answer_perplexity(model, tokenizer, examples)


def candidate_model(base_dir: Path, weights: dict | nn.Module | None = None,
                    delta: dict | None = None) -> nn.Module:
    """The model to score: a ready module as is, else the base with `weights` set and/or `delta` added."""
    from torch import nn

    if isinstance(weights, nn.Module):
        return weights.eval()
    model, _ = load_model(base_dir)
    if weights:
        replace_weights(model, weights)
    if delta:
        add_delta(model, delta)
    return model


def lm_eval_scores(model: nn.Module | None, tokenizer, task_files: list[Path], batch_size: int = 8) -> dict:
    """lm-eval-harness scores on local task YAML files only (no hub); lm-eval is not in the dev venv."""
    try:
        import lm_eval
    except ImportError:
        raise DeltazipError(
            "lm-eval is not installed: install deltazip[eval] to use --lm-eval-tasks") from None
    try:
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise DeltazipError(f"lm-eval's HF backend cannot load ({e}): install deltazip[eval]") from None
    if model is None:
        return {}
    names = []
    for path in task_files:
        path = Path(path)
        if not path.is_file():
            raise DeltazipError(f"lm-eval task file not found: {path}")
        name = next((line.split(":", 1)[1].strip() for line in path.read_text().splitlines()
                     if line.startswith("task:")), None)
        if not name:
            raise DeltazipError(f"lm-eval task file has no 'task:' line: {path}")
        names.append(name)
    manager = TaskManager(include_path=sorted({str(Path(p).resolve().parent) for p in task_files}),
                          include_defaults=False)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager)
    return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            for task, metrics in results["results"].items()}
