"""BitDelta-style baseline: Δ ≈ α·sign(Δ) per block linear, α = mean|Δ|; embed/lm_head/norms kept fp16."""

from __future__ import annotations

from pathlib import Path

from deltazip.eval.baselines import BaselineResult, is_block_linear
from deltazip.hf import load_model, unique_parameters

SCALE_BYTES = 2  # one fp16 α per matrix


def bitdelta_bytes(numel: int) -> int:
    """Stored bytes of one 1-bit sign matrix plus its fp16 scale."""
    return -(-numel // 8) + SCALE_BYTES


def bitdelta(base_dir: Path, finetune_dir: Path, calib_ids=None,
             budget_bytes: int | None = None) -> BaselineResult:
    """Sign-compress every block linear's delta (no scale distillation); the rest is the fine-tune's."""
    import torch

    base, _ = load_model(base_dir)
    target, _ = load_model(finetune_dir)
    base_params = unique_parameters(base)
    weights, size = {}, 0
    for name, w_ft in unique_parameters(target).items():
        if is_block_linear(name, w_ft):
            delta = w_ft.detach() - base_params[name].detach()
            alpha = delta.abs().mean().to(torch.float16).float()
            signs = torch.where(delta >= 0, 1.0, -1.0)
            weights[name] = base_params[name].detach() + alpha * signs
            size += bitdelta_bytes(delta.numel())
        else:  # embed_tokens, lm_head, norms: kept as full fp16 fine-tuned weights, as BitDelta does
            weights[name] = w_ft.detach().clone()
            size += w_ft.numel() * 2
    return BaselineResult("BitDelta 1-bit", weights, size, note="embed/lm_head/norms full fp16")
