"""Baselines the compressed delta is compared against, each returning its weights and stored size.

Every baseline is `fn(base_dir, finetune_dir, calib_ids, budget_bytes) -> BaselineResult`; `weights` is either
a full state dict (absolute weights, HF parameter names) or a ready nn.Module (e.g. fake-quantized), so the
evaluation path (deltazip.eval.scoring.candidate_model) is shared by all of them. Baselines import only
deltazip.hf, never the evaluator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

BASELINE_NAMES = ("sparsegpt", "awq", "bitdelta", "svd")


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


def _registry() -> dict[str, Callable[..., BaselineResult]]:
    from deltazip.eval.baselines.awq import awq_int4
    from deltazip.eval.baselines.bitdelta import bitdelta
    from deltazip.eval.baselines.sparsegpt import sparsegpt_full
    from deltazip.eval.baselines.svd import svd_delta

    return {"sparsegpt": sparsegpt_full, "awq": awq_int4, "bitdelta": bitdelta, "svd": svd_delta}


def run_baseline(name: str, base_dir: Path, finetune_dir: Path, calib_ids,
                 budget_bytes: int) -> BaselineResult:
    """Run one baseline by name (see BASELINE_NAMES)."""
    return _registry()[name](base_dir, finetune_dir, calib_ids, budget_bytes)
