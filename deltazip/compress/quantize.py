"""Symmetric low-bit quantizer with an exact zero code: w ≈ (q − z) · s, z = 2**(bits − 1)."""

from __future__ import annotations

import torch

# Shrink factors tried when fitting a scale (fraction of the largest magnitude mapped to the outer level).
_SHRINK_GRID = torch.linspace(0.25, 1.0, 16)


def zero_code(bits: int) -> int:
    """The code that dequantizes to exactly 0 (2 for 2-bit, 8 for 4-bit)."""
    return 1 << (bits - 1)


def quantize(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Round w / scale to the nearest code in [0, 2**bits) (codes as float); scale broadcasts against w."""
    return torch.clamp(torch.round(w / scale) + zero_code(bits), 0, (1 << bits) - 1)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    return (codes - zero_code(bits)) * scale


def fit_scale(w: torch.Tensor, bits: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row scale [N, 1] for w [N, C] minimizing the (weighted) squared rounding error over a shrink grid.

    `weight` [N, C] (e.g. 0 for values expected to be pruned) selects which values the fit should serve.
    """
    weight = torch.ones_like(w) if weight is None else weight
    amax = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    best_err = torch.full_like(amax, float("inf"))
    best_scale = amax / zero_code(bits)
    for shrink in _SHRINK_GRID.tolist():
        scale = amax * shrink / zero_code(bits)
        codes = quantize(w, scale, bits)
        err = ((dequantize(codes, scale, bits) - w).pow(2) * weight).sum(dim=1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    # fp16 storage: round now so the solver quantizes against the scale that will be stored.
    return best_scale.to(torch.float16).clamp_min(torch.finfo(torch.float16).tiny).float()


def likely_kept(w: torch.Tensor, sparse24: bool, keep_fraction: float) -> torch.Tensor:
    """0/1 weights [N, C] marking the values a magnitude prune would keep (the scale should fit those)."""
    if sparse24 and w.shape[1] % 4 == 0:
        groups = w.abs().reshape(w.shape[0], -1, 4)
        top = groups.topk(2, dim=-1).indices
        return torch.zeros_like(groups).scatter_(-1, top, 1.0).reshape(w.shape)
    if keep_fraction >= 1.0:
        return torch.ones_like(w)
    k = max(1, int(round(w.shape[1] * keep_fraction)))
    top = w.abs().topk(k, dim=1).indices
    return torch.zeros_like(w).scatter_(1, top, 1.0)

