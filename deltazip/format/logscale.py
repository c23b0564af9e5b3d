"""Log scales (docs/FORMAT.md, "Log scales (version 5)"): a linear's per-row fp16 scales as one byte each.

Byte-budgeted artifacts (`deltazip compress --target-ratio R`) store a linear whose zeros are the symmetric
grid's 2^(b−1) without a `zeros` stream and with its scales as `scale0` (the largest scale, fp16) and
`lscales` (uint8 u per scale: s = fp16(scale0 · 2^(−u/32)), 2.2% steps over 8 octaves). The writer snaps the
scales to that grid (`log_snapped`) before writing, so the reader rebuilds exactly the fp16 values used.
"""

from __future__ import annotations

import dataclasses

import torch

STEPS = 32  # steps per octave


def zero_grid(packed) -> bool:
    """Whether `packed` (a PackedLinear) has the writer's symmetric zeros 2^(b−1) everywhere."""
    return bool(torch.all(packed.zeros.float() == float(1 << (packed.bits - 1))))


def encode(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 scales [N, G] → (scale0 fp16 [1], lscales uint8 [N, G]) (nearest step, clamped to 8 octaves)."""
    top = scales.float().max().clamp_min(torch.finfo(torch.float16).tiny).to(torch.float16).reshape(1)
    ratio = (top.float() / scales.float().clamp_min(1e-30)).clamp_min(1.0)
    steps = torch.round(torch.log2(ratio) * STEPS).clamp(0, 255).to(torch.uint8)
    return top, steps


def decode(top: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """The fp16 scales from (scale0, lscales): the one formula writer and reader use."""
    scales = top.float().reshape(1, 1) * torch.exp2(-steps.float() / STEPS)
    return scales.to(torch.float16).clamp_min(torch.finfo(torch.float16).tiny)


def log_snapped(packed):
    """`packed` with its scales rounded to what a log-scale stream stores (unchanged when its zeros are not
    the symmetric grid's: those keep fp16 scales and zeros)."""
    if not zero_grid(packed) or packed.scales.numel() == 0:
        return packed
    top, steps = encode(packed.scales)
    return dataclasses.replace(packed, scales=decode(top, steps).reshape(packed.scales.shape).contiguous())
