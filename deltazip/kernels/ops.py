"""The delta-GEMM operator: one torch custom op, ``deltazip::add_delta_matmul``, several implementations.

    torch.ops.deltazip.add_delta_matmul(out, x, qweight, meta, scales, zeros,
                                        seg_rows, seg_start, seg_slot, bits, group_size) -> ()

SGMV semantics, in place: for each segment i, the batch rows ``seg_rows[seg_start[i]:seg_start[i+1]]``
get ``out[r] += x[r] · Δᵀ`` with Δ the packed delta in slot ``seg_slot[i]`` of the stacked tensors
(``deltazip.packed`` layout: qweight [S,N,W] int32, meta [S,N,K/32] int32 or None (dense), scales/zeros
[S,N,G] fp16); slot -1 means no delta. Rows in no segment (or on slot -1) are never written. fp32 math,
one rounding into out's dtype. seg_start[0] = 0, seg_start[-1] = len(seg_rows), non-decreasing; rows
in [0, M) and each at most once: anything else is an error, never a wrong answer.

Implementations: CPU = native C++ (deltazip.kernels.native; the torch path with one warning line where it
cannot build); CUDA = the OpenAI Triton kernel (GPU only — not verified on this machine); Meta/fake =
shape checks only. The torch path (deltazip.kernels.torch_path) is the oracle.

`add_delta_matmul(out, x, slots, row_slot, impl)` is what the delta layers call: it turns row_slot
(-1 = no delta) into segments (cached while the same row_slot tensor is reused, e.g. across a step's layers).
"""

from __future__ import annotations

import logging

import torch

from deltazip.kernels import native
from deltazip.kernels.slots import DeltaSlots
from deltazip.kernels.torch_path import torch_add_delta_matmul

IMPLS = ("auto", "torch", "native", "triton")
SCHEMA = ("add_delta_matmul(Tensor(a!) out, Tensor x, Tensor qweight, Tensor? meta, Tensor scales, "
          "Tensor zeros, Tensor seg_rows, Tensor seg_start, Tensor seg_slot, int bits, int group_size) -> ()")
LOG = logging.getLogger("deltazip.kernels")

_lib = torch.library.Library("deltazip", "DEF")  # noqa: TOR901 - kept alive for the process
_lib.define(SCHEMA)
_fallback_warned = False


def check_op_inputs(out: torch.Tensor, x: torch.Tensor, slots: DeltaSlots, seg_rows: torch.Tensor,
                    seg_start: torch.Tensor, seg_slot: torch.Tensor) -> None:
    """The op's contract in Python (the native kernel checks the same in C++): ValueError/IndexError."""
    if x.dim() != 2 or out.dim() != 2:
        raise ValueError(f"x and out must be 2-D, got {list(x.shape)} and {list(out.shape)}")
    floats = (torch.float32, torch.float16, torch.bfloat16)
    if x.dtype not in floats or out.dtype not in floats:
        raise ValueError(f"x and out must be float32, float16 or bfloat16, got {x.dtype} and {out.dtype}")
    m, k = x.shape
    if k != slots.in_features or tuple(out.shape) != (m, slots.out_features):
        raise ValueError(f"shapes out {list(out.shape)}, x {list(x.shape)} do not match slots "
                         f"[N, K] = [{slots.out_features}, {slots.in_features}]")
    for name, t in (("seg_rows", seg_rows), ("seg_start", seg_start), ("seg_slot", seg_slot)):
        if t.dtype != torch.int32 or t.dim() != 1:
            raise ValueError(f"{name} must be a 1-D int32 tensor, got {t.dtype} {list(t.shape)}")
    if seg_start.numel() != seg_slot.numel() + 1:
        raise ValueError(f"seg_start must have len(seg_slot) + 1 = {seg_slot.numel() + 1} entries, "
                         f"got {seg_start.numel()}")
    bounds = seg_start.tolist()
    rising = all(a <= b for a, b in zip(bounds, bounds[1:], strict=False))
    if bounds[0] != 0 or bounds[-1] != seg_rows.numel() or not rising:
        raise ValueError(f"segments must cover seg_rows exactly: seg_start {bounds[:8]}... must rise from 0 "
                         f"to len(seg_rows) = {seg_rows.numel()}")
    if seg_slot.numel() and not bool(((seg_slot >= -1) & (seg_slot < slots.num_slots)).all()):
        raise IndexError(f"seg_slot values must lie in [-1, {slots.num_slots}), got {seg_slot.tolist()}")
    if seg_rows.numel():
        if not bool(((seg_rows >= 0) & (seg_rows < m)).all()):
            raise IndexError(f"seg_rows must be rows of the batch [0, {m}), got {seg_rows.tolist()}")
        if torch.unique(seg_rows).numel() != seg_rows.numel():
            raise ValueError("a row appears in more than one segment position")


def _slots_of(qweight, meta, scales, zeros, bits, group_size) -> DeltaSlots:
    return DeltaSlots.view(qweight, meta, scales, zeros, bits, group_size)


def _torch_impl(out, x, qweight, meta, scales, zeros, seg_rows, seg_start, seg_slot, bits,
                group_size) -> None:
    slots = _slots_of(qweight, meta, scales, zeros, bits, group_size)
    check_op_inputs(out, x, slots, seg_rows, seg_start, seg_slot)
    torch_add_delta_matmul(out, x, slots, seg_rows, seg_start, seg_slot)


def _cpu_fallback(*args) -> None:
    global _fallback_warned
    if not _fallback_warned:
        _fallback_warned = True
        LOG.warning(native.fallback_warning())
    _torch_impl(*args)


def _cuda_impl(out, x, qweight, meta, scales, zeros, seg_rows, seg_start, seg_slot, bits, group_size) -> None:
    """The Triton kernel behind the op (GPU only — not verified on this machine)."""
    from deltazip.kernels.delta_gemm import triton_add_delta_matmul

    slots = _slots_of(qweight, meta, scales, zeros, bits, group_size)
    check_op_inputs(out, x, slots, seg_rows, seg_start, seg_slot)
    counts = (seg_start[1:] - seg_start[:-1]).long()
    row_slot = torch.full((x.shape[0],), -1, dtype=torch.int32, device=x.device)
    row_slot[seg_rows.long()] = torch.repeat_interleave(seg_slot, counts)
    triton_add_delta_matmul(out, x, slots, row_slot)


def _fake_impl(out, x, qweight, meta, scales, zeros, seg_rows, seg_start, seg_slot, bits, group_size) -> None:
    if x.dim() != 2 or out.dim() != 2 or out.shape[0] != x.shape[0] or out.shape[1] != qweight.shape[1]:
        raise ValueError(f"shapes out {list(out.shape)}, x {list(x.shape)}, qweight {list(qweight.shape)} "
                         "do not match")


_lib.impl("add_delta_matmul", _cuda_impl, "CUDA")
_lib.impl("add_delta_matmul", _fake_impl, "Meta")
torch.library.register_fake("deltazip::add_delta_matmul", _fake_impl, lib=_lib)
NATIVE = native.build()  # registers the C++ CPU kernel (built once, cached on disk)
if not NATIVE:
    _lib.impl("add_delta_matmul", _cpu_fallback, "CPU")


def segments(row_slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """row_slot [M] (-1 = none) → (seg_rows [R], seg_start [S+1], seg_slot [S]) int32, rows sorted by slot
    (stable), rows without a delta left out."""
    order = torch.argsort(row_slot, stable=True)
    sorted_slot = row_slot[order]
    first = int((row_slot < 0).sum())
    seg_slot, counts = torch.unique_consecutive(sorted_slot[first:], return_counts=True)
    seg_start = torch.zeros(len(seg_slot) + 1, dtype=torch.int32, device=row_slot.device)
    seg_start[1:] = counts.cumsum(0)
    return order[first:].to(torch.int32), seg_start, seg_slot.to(torch.int32)


_seg_cache: tuple = (None, None)  # (copy of the last row_slot, its plan); replaced whole (threads)


def _cached_segments(row_slot: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], int, int]:
    """(segments(row_slot), lowest, highest slot), reused while the same layout comes back (every delta
    layer of one step sees the same row_slot)."""
    global _seg_cache
    last, plan = _seg_cache
    if (last is not None and last.shape == row_slot.shape and last.device == row_slot.device
            and torch.equal(last, row_slot)):
        return plan
    lowest, highest = (int(v) for v in torch.aminmax(row_slot))
    plan = (segments(row_slot), lowest, highest)
    _seg_cache = (row_slot.clone(), plan)
    return plan


def add_delta_matmul(out: torch.Tensor, x: torch.Tensor, slots: DeltaSlots, row_slot: torch.Tensor,
                     impl: str = "auto") -> torch.Tensor:
    """out[m] += x[m] · Δ_{row_slot[m]}ᵀ in place (row_slot -1: no delta); returns out.

    out [M, N], x [M, K], row_slot [M] int32. impl: "auto" = the op (native on CPU, Triton on CUDA);
    "torch" = the torch path (oracle); "native" = the C++ kernel (error if it did not build); "triton" =
    the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1).
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
    if impl == "triton":
        _check_row_slot(row_slot, slots)
        from deltazip.kernels.delta_gemm import triton_add_delta_matmul

        triton_add_delta_matmul(out, x, slots, row_slot)
        return out
    (seg_rows, seg_start, seg_slot), lowest, highest = _cached_segments(row_slot)
    if lowest < -1 or highest >= slots.num_slots:
        raise ValueError(f"row_slot values must lie in [-1, {slots.num_slots}), got [{lowest}, {highest}]")
    args = (out, x, slots.qweight, slots.meta, slots.scales, slots.zeros, seg_rows, seg_start, seg_slot,
            slots.bits, slots.group_size)
    if impl == "torch":
        _torch_impl(*args)
    elif impl == "native":
        if x.is_cuda or not NATIVE:
            why = native.error() or "CUDA input"
            raise RuntimeError(f"the native CPU kernel is not available here ({why})")
        torch.ops.deltazip.add_delta_matmul(*args)
    else:
        torch.ops.deltazip.add_delta_matmul(*args)
    return out


def _check_row_slot(row_slot: torch.Tensor, slots: DeltaSlots) -> None:
    lowest, highest = (int(v) for v in torch.aminmax(row_slot))
    if lowest < -1 or highest >= slots.num_slots:
        raise ValueError(f"row_slot values must lie in [-1, {slots.num_slots}), got [{lowest}, {highest}]")
