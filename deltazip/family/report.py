"""The family's accuracy table: every model (base + fine-tunes) × every task, exact match on the eval sets."""

from __future__ import annotations

from pathlib import Path

from deltazip.family.create import load_family
from deltazip.family.evaluate import exact_match, load_eval_set
from deltazip.ui import progress


def accuracy_table(root: str | Path, limit: int | None = None) -> dict[str, dict[str, float]]:
    """{model name: {task: exact-match accuracy}} for the base and every fine-tune of the family at `root`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    family = load_family(root)
    eval_sets = {task: load_eval_set(family.eval_path(task))[:limit] for task in family.tasks}
    table: dict[str, dict[str, float]] = {}
    model_dirs = {"base": family.base_dir, **family.finetune_dirs}
    for name, model_dir in progress(model_dirs.items(), desc="evaluate", total=len(model_dirs)):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        table[name] = {task: exact_match(model, tokenizer, examples) for task, examples in eval_sets.items()}
    return table
