"""Torch path of the delta GEMM: dequantize one slot (in row chunks) and matmul the rows that use it.

The oracle every other implementation is tested against, and the CPU fallback where the native kernel
cannot build. It never expands more than one slot (one chunk of rows) at a time.
"""

from __future__ import annotations

import torch

from deltazip.kernels.slots import DeltaSlots
from deltazip.packed import unpack_codes

# Dense fp32 elements dequantized at once (bounds the temporary to 16 MiB).
CHUNK_ELEMENTS = 1 << 22


def dequantize_slot(slots: DeltaSlots, slot: int, row_start: int = 0,
                    row_end: int | None = None) -> torch.Tensor:
    """Rows [row_start, row_end) of `slot` as a dense fp32 delta [rows, K] (same math as PackedLinear)."""
    row_end = slots.out_features if row_end is None else row_end
    k, group_size = slots.in_features, slots.group_size
    rows = slice(row_start, row_end)
    codes = unpack_codes(slots.qweight[slot, rows], slots.bits, slots.n_codes, torch.float32)  # [n, C]
    scales = slots.scales[slot, rows].float()  # [n, G]
    zeros = slots.zeros[slot, rows].float()
    n, num_groups = scales.shape
    if not slots.sparse24:
        values = (codes.view(n, num_groups, group_size) - zeros[:, :, None]) * scales[:, :, None]
        return values.view(n, k)
    positions = unpack_codes(slots.meta[slot, rows], 2, k // 2)  # [n, K/2] int64, 0..3 in each group of 4
    if group_size % 4 == 0:  # a group of 4 never straddles two scale groups: broadcast, no gather
        kept_per_group = group_size // 2
        values = (codes.view(n, num_groups, kept_per_group) - zeros[:, :, None]) * scales[:, :, None]
    else:
        groups = (torch.arange(k // 2, device=codes.device) // 2 * 4 + positions) // group_size
        values = (codes - zeros.gather(1, groups)) * scales.gather(1, groups)
    dense = torch.zeros(n, k // 4, 4, dtype=torch.float32, device=codes.device)
    dense.scatter_(2, positions.view(n, k // 4, 2), values.reshape(n, k // 4, 2))
    return dense.view(n, k)


def torch_add_delta_matmul(out: torch.Tensor, x: torch.Tensor, slots: DeltaSlots, seg_rows: torch.Tensor,
                           seg_start: torch.Tensor, seg_slot: torch.Tensor) -> None:
    """out[r] += x[r] · Δ_sᵀ for the rows r of each segment (inputs checked by the caller); fp32 math,
    one rounding; rows in no segment and segments on slot -1 are untouched."""
    n = slots.out_features
    chunk_rows = max(1, min(n, CHUNK_ELEMENTS // max(1, slots.in_features)))
    by_slot: dict[int, list[torch.Tensor]] = {}
    bounds = seg_start.tolist()
    for i, slot in enumerate(seg_slot.tolist()):
        if slot >= 0 and bounds[i + 1] > bounds[i]:
            by_slot.setdefault(slot, []).append(seg_rows[bounds[i]:bounds[i + 1]])
    for slot, parts in by_slot.items():  # each distinct slot is dequantized once
        rows = torch.cat(parts).long()  # [R] row indices of out and x
        x_rows = x.index_select(0, rows).float()  # [R, K]
        if chunk_rows == n:
            delta_out = x_rows @ dequantize_slot(slots, slot).t()
        else:
            delta_out = torch.cat([x_rows @ dequantize_slot(slots, slot, n0, min(n0 + chunk_rows, n)).t()
                                   for n0 in range(0, n, chunk_rows)], dim=1)
        # add in fp32 and round once, like the kernels' epilogue
        out.index_copy_(0, rows, (out.index_select(0, rows).float() + delta_out).to(out.dtype))
