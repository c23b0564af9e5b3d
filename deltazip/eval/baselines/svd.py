"""Low-rank baseline ("extract a LoRA"): truncated SVD of every 2-D delta, one rank sized to a byte budget."""

from __future__ import annotations

from pathlib import Path

from deltazip.eval.baselines import BaselineResult
from deltazip.hf import load_model, unique_parameters


def lowrank_bytes(shapes: list[tuple[int, int]], rank: int) -> int:
    """fp16 bytes of the factors U·S [N, r] and V [r, K] of every matrix (r capped at min(N, K))."""
    return sum(min(rank, n, k) * (n + k) * 2 for n, k in shapes)


def pick_rank(shapes: list[tuple[int, int]], budget_bytes: int) -> int:
    """The largest rank whose factors fit `budget_bytes` (0 when even rank 1 does not fit)."""
    rank, max_rank = 0, max(min(n, k) for n, k in shapes)
    while rank < max_rank and lowrank_bytes(shapes, rank + 1) <= budget_bytes:
        rank += 1
    return rank


def svd_delta(base_dir: Path, finetune_dir: Path, calib_ids=None,
              budget_bytes: int | None = None) -> BaselineResult:
    """Rank-r SVD of each matrix delta (embed and lm_head included) with 1-D deltas kept exact in fp16."""
    import torch

    if budget_bytes is None:
        raise ValueError("the SVD baseline needs a byte budget")
    base, _ = load_model(base_dir)
    target, _ = load_model(finetune_dir)
    base_params, target_params = unique_parameters(base), unique_parameters(target)
    vectors = {n: p for n, p in target_params.items() if p.dim() != 2}
    matrices = {n: p for n, p in target_params.items() if p.dim() == 2}
    exact_bytes = sum(p.numel() * 2 for p in vectors.values())
    shapes = [tuple(p.shape) for p in matrices.values()]
    rank = pick_rank(shapes, budget_bytes - exact_bytes)
    weights = {n: p.detach().clone() for n, p in vectors.items()}
    for name, w_ft in matrices.items():
        delta = (w_ft.detach() - base_params[name].detach()).float()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(rank, s.numel())
        left = (u[:, :r] * s[:r]).to(torch.float16).float()
        right = vh[:r].to(torch.float16).float()
        weights[name] = base_params[name].detach() + left @ right
    size = exact_bytes + lowrank_bytes(shapes, rank)
    return BaselineResult(f"SVD rank {rank}", weights, size, note="equal bytes; 1-D deltas exact",
                          details={"rank": rank})
