"""Baselines the compressed delta is compared against, each returning its weights and stored size.

Every baseline is `fn(base_dir, finetune_dir, calib_ids, budget_bytes) -> BaselineResult`; `weights` is either
a full state dict (absolute weights, HF parameter names) or a ready nn.Module (e.g. fake-quantized), so the
evaluation path (deltazip.compress.evaluate.candidate_model) is shared by all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class BaselineResult:
    """A baseline's weights (state dict or module) and the bytes it would take to store them."""

    method: str
    weights: dict[str, torch.Tensor] | nn.Module
    size_bytes: int
    note: str = ""
    details: dict = field(default_factory=dict)


def is_block_linear(name: str, param: torch.Tensor) -> bool:
    """A linear weight inside a transformer block (what BitDelta, SparseGPT and AWQ compress)."""
    return name.startswith("model.layers.") and name.endswith(".weight") and param.dim() == 2


def unique_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters by name, tied ones once (the first name wins, as in named_parameters)."""
    return dict(model.named_parameters())


def calib_ids(tokenizer, texts: list[str], n_samples: int, seq_len: int):
    """Calibration token ids [n, seq_len]: each text tokenized (BOS first), concatenated, cut in windows."""
    import torch

    ids = [i for text in texts for i in tokenizer(text)["input_ids"]]
    n = min(n_samples, len(ids) // seq_len)
    if n == 0:
        from deltazip.errors import DeltazipError

        raise DeltazipError(f"calibration text has {len(ids)} tokens, fewer than one window of {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).reshape(n, seq_len)


def read_calib_texts(path: str | Path) -> list[str]:
    """The "text" field of each line of a calib.jsonl file."""
    import json

    return [json.loads(line)["text"] for line in Path(path).read_text().splitlines() if line.strip()]


def _registry() -> dict[str, Callable[..., BaselineResult]]:
    from deltazip.compress.baselines.awq import awq_int4
    from deltazip.compress.baselines.bitdelta import bitdelta
    from deltazip.compress.baselines.sparsegpt import sparsegpt_full
    from deltazip.compress.baselines.svd import svd_delta

    return {"sparsegpt": sparsegpt_full, "awq": awq_int4, "bitdelta": bitdelta, "svd": svd_delta}


BASELINE_NAMES = ("sparsegpt", "awq", "bitdelta", "svd")


def run_baseline(name: str, base_dir: Path, finetune_dir: Path, calib_ids,
                 budget_bytes: int) -> BaselineResult:
    """Run one baseline by name (see BASELINE_NAMES)."""
    return _registry()[name](base_dir, finetune_dir, calib_ids, budget_bytes)
