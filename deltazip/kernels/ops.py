"""add_delta_matmul: the one entry point the runtime calls; checks inputs and picks torch or Triton."""

from __future__ import annotations

import os

import torch

from deltazip.kernels.reference import torch_add_delta_matmul
from deltazip.kernels.slots import DeltaSlots

IMPLS = ("auto", "torch", "triton")


def add_delta_matmul(out: torch.Tensor, x: torch.Tensor, slots: DeltaSlots, row_slot: torch.Tensor,
                     impl: str = "auto") -> torch.Tensor:
    """out[m] += x[m] · Δ_{row_slot[m]}ᵀ in place (row_slot -1: no delta); returns out.

    out [M, N], x [M, K], row_slot [M] int32. impl "auto" runs Triton when x is on CUDA (and the Triton
    interpreter is off), torch elsewhere.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, not {impl!r}")
    m, k = x.shape
    if k != slots.in_features or tuple(out.shape) != (m, slots.out_features):
        raise ValueError(f"shapes out {list(out.shape)}, x {list(x.shape)} do not match slots "
                         f"[N, K] = [{slots.out_features}, {slots.in_features}]")
    if tuple(row_slot.shape) != (m,) or row_slot.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"row_slot must be an int32 tensor [{m}], got {row_slot.dtype} "
                         f"{list(row_slot.shape)}")
    if m == 0:
        return out
    lowest, highest = (int(v) for v in torch.aminmax(row_slot))
    if lowest < -1 or highest >= slots.num_slots:
        raise ValueError(f"row_slot values must lie in [-1, {slots.num_slots}), got [{lowest}, {highest}]")
    if impl == "auto":
        impl = "triton" if x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1" else "torch"
    if impl == "torch":
        torch_add_delta_matmul(out, x, slots, row_slot)
    else:
        from deltazip.kernels.delta_gemm import triton_add_delta_matmul

        triton_add_delta_matmul(out, x, slots, row_slot)
    return out
