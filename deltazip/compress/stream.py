"""Bounded memory for compression: weights streamed from disk one linear (or one row chunk) at a time.

A Llama-2-7B block is 0.75 GiB in fp32; holding it (and its base, its dense deltas, the tuning copies) at
once is what made compression need several GiB. Here: a linear's fp32 weight exists only while that linear
runs (`StreamedLinear`), base + Δ̂ is built row chunk by row chunk (`compressed_weight`, the same values as
`base.float() + packed.dequantize()`), and scale tuning keeps int8 code steps and rebuilds each weight
in its backward (`StreamedDelta`) instead of saving it. `LARGE_BYTES` separates the tensors that take the
chunked paths whose float rounding order differs (a GEMM over row chunks); smaller ones keep the exact
whole-tensor arithmetic, so small models compress to the same bytes as before.
"""

from __future__ import annotations

import ctypes
import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from deltazip.packed import PackedLinear

LARGE_BYTES = 8 << 20  # fp32 bytes above which a tensor takes the streamed, row-chunked paths
ROWS = 1024  # rows per chunk when dequantizing or building a weight


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def trim() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise; a no-op elsewhere)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def bound_heap(mmap_threshold: int = 1 << 20) -> None:
    """glibc: serve allocations ≥ `mmap_threshold` with their own mappings (returned to the OS when
    freed) instead of heap space that fragments. By default the threshold grows to 32 MiB as large
    blocks are freed, so the row-chunk temporaries (up to 45 MB) pile up as unreturnable heap. Process
    wide; called when a model has large tensors."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, mmap_threshold)  # M_MMAP_THRESHOLD (fixed: no dynamic growth)
        libc.mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD: give back heap tops above 1 MiB


def is_large(shape: tuple[int, ...] | torch.Size) -> bool:
    n = 4
    for s in shape:
        n *= s
    return n > LARGE_BYTES


def packed_rows(packed: PackedLinear, rows: slice | torch.Tensor) -> PackedLinear:
    """The delta of some output rows (a slice or an index tensor) of `packed`."""
    def take(t):
        return None if t is None else (t[rows] if isinstance(rows, slice) else t.index_select(0, rows))
    qweight = take(packed.qweight)
    return dataclasses.replace(packed, out_features=qweight.shape[0], qweight=qweight, meta=take(packed.meta),
                               scales=take(packed.scales), zeros=take(packed.zeros))


def cat_rows(parts: list[PackedLinear]) -> PackedLinear:
    """Row chunks of one delta (same layout) joined back into one."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    meta = None if first.meta is None else torch.cat([p.meta for p in parts])
    return dataclasses.replace(first, out_features=sum(p.out_features for p in parts),
                               qweight=torch.cat([p.qweight for p in parts]), meta=meta,
                               scales=torch.cat([p.scales for p in parts]),
                               zeros=torch.cat([p.zeros for p in parts]))


def dequantize(packed: PackedLinear, rows: int = ROWS) -> torch.Tensor:
    """packed.dequantize() (fp32) built row chunk by row chunk (its int64 temporaries are 4× the output)."""
    if type(packed) is not PackedLinear or packed.out_features <= rows:
        return packed.dequantize()
    out = torch.empty(packed.out_features, packed.in_features)
    for r in range(0, packed.out_features, rows):
        out[r:r + rows] = packed_rows(packed, slice(r, r + rows)).dequantize()
    return out


def compressed_weight(base: torch.Tensor, packed: PackedLinear, rows: int = ROWS) -> torch.Tensor:
    """base.float() + packed.dequantize() (the same values), with temporaries of one row chunk."""
    if type(packed) is not PackedLinear or packed.out_features <= rows:  # (any-precision: its own dequantize)
        return base.float() + packed.dequantize().to(base.device)
    out = base.float()
    if out.data_ptr() == base.data_ptr():
        out = out.clone()
    for r in range(0, packed.out_features, rows):
        out[r:r + rows] += packed_rows(packed, slice(r, r + rows)).dequantize().to(out.device)
    return out


class StreamedLinear(nn.Linear):
    """An nn.Linear whose weight is produced on demand by `source()` (and dropped after the call).

    `delta`, when set (scale tuning), is a callable x → output that replaces the plain forward.
    """

    def __init__(self, linear: nn.Linear, source: Callable[[], torch.Tensor]) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_parameter("weight", None)
        self.bias = linear.bias
        self.source = source
        self.delta: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.delta is not None:
            return self.delta(x)
        weight = self.weight if self.weight is not None else self.source()  # (functional_call sets it)
        return F.linear(x, weight.to(x.device), self.bias)


class StreamedDelta(torch.autograd.Function):
    """y = x (B + steps ⊙ s)ᵀ with gradients for the scales s [N, G] only; B and steps are re-read in the
    backward instead of being saved, so a weight-sized tensor lives only during one linear's call.

    `build(scales, rows)` returns rows of B + steps ⊙ s (fp32, detached); `steps(rows)` the int8 steps.
    With `chunk` ≥ N the weight is built whole (one F.linear, as nn.Linear computes it).
    """

    @staticmethod
    def forward(ctx, x, scales, build, steps, chunk):
        n = scales.shape[0]
        ctx.save_for_backward(x, scales)
        ctx.build, ctx.steps, ctx.chunk = build, steps, chunk
        if chunk >= n:
            return F.linear(x, build(scales, slice(0, n)))
        return torch.cat([F.linear(x, build(scales, slice(r, r + chunk))) for r in range(0, n, chunk)], -1)

    @staticmethod
    def backward(ctx, grad):
        x, scales = ctx.saved_tensors
        n, groups = scales.shape
        x2 = x.reshape(-1, x.shape[-1])
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x = torch.zeros_like(x2) if ctx.needs_input_grad[0] else None
        grad_s = torch.empty_like(scales)
        for r in range(0, n, ctx.chunk):
            rows = slice(r, min(r + ctx.chunk, n))
            g = g2[:, rows]
            if grad_x is not None:
                grad_x.addmm_(g, ctx.build(scales, rows))
            grad_w = g.T @ x2  # [rows, K]
            grad_w.mul_(ctx.steps(rows))
            grad_s[rows] = grad_w.reshape(grad_w.shape[0], groups, -1).sum(-1)
        return (None if grad_x is None else grad_x.reshape(x.shape)), grad_s, None, None, None


def float_delta(target: torch.Tensor, base: torch.Tensor, rows: int = ROWS) -> torch.Tensor:
    """target.float() − base.float() (the same values), subtracting row chunk by row chunk."""
    out = target.float() if target.dtype != torch.float32 else target.clone()
    for r in range(0, out.shape[0] if out.dim() else 1, rows):
        out[r:r + rows] -= base[r:r + rows].float()
    return out


def delta_norms(base: torch.Tensor, target: torch.Tensor, rows: int = ROWS) -> tuple[float, float]:
    """(‖t − b‖², ‖b‖²) in float64; a large tensor by row chunks (another summation order)."""
    if not is_large(base.shape):
        return (target.double() - base.double()).pow(2).sum().item(), base.double().pow(2).sum().item()
    diff = norm = 0.0
    for r in range(0, base.shape[0], rows):
        b = base[r:r + rows].double()
        diff += (target[r:r + rows].double() - b).pow(2).sum().item()
        norm += b.pow(2).sum().item()
    return diff, norm
