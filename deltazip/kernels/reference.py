"""Torch path of the delta GEMM: dequantize one slot (in row chunks) and matmul the rows that use it.

This is the spec and oracle of the Triton kernel and the CPU production path of the runtime. It never
expands more than one slot (one chunk of rows) at a time.
"""

from __future__ import annotations

import torch

from deltazip.kernels.slots import DeltaSlots

# Dense fp32 elements dequantized at once (bounds the temporary to 16 MiB).
CHUNK_ELEMENTS = 1 << 22


def unpack_words(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """int32 words [n, W] → int32 codes [n, count], LSB first (int32 math: faster than unpack_codes)."""
    shifts = torch.arange(32 // bits, dtype=torch.int32, device=words.device) * bits
    codes = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # arithmetic shift + mask = logical
    return codes.reshape(words.shape[0], -1)[:, :count]


def dequantize_slot(slots: DeltaSlots, slot: int, row_start: int = 0,
                    row_end: int | None = None) -> torch.Tensor:
    """Rows [row_start, row_end) of `slot` as a dense fp32 delta [rows, K] (same math as PackedLinear)."""
    row_end = slots.out_features if row_end is None else row_end
    k, group_size = slots.in_features, slots.group_size
    rows = slice(row_start, row_end)
    codes = unpack_words(slots.qweight[slot, rows], slots.bits, slots.n_codes).float()  # [n, C]
    scales = slots.scales[slot, rows].float()  # [n, G]
    zeros = slots.zeros[slot, rows].float()
    n, num_groups = scales.shape
    if not slots.sparse24:
        values = (codes.view(n, num_groups, group_size) - zeros[:, :, None]) * scales[:, :, None]
        return values.view(n, k)
    positions = unpack_words(slots.meta[slot, rows], 2, k // 2).long()  # [n, K/2], 0..3 in each group of 4
    if group_size % 4 == 0:  # a group of 4 never straddles two scale groups: broadcast, no gather
        kept_per_group = group_size // 2
        values = (codes.view(n, num_groups, kept_per_group) - zeros[:, :, None]) * scales[:, :, None]
    else:
        groups = (torch.arange(k // 2, device=codes.device) // 2 * 4 + positions) // group_size
        values = (codes - zeros.gather(1, groups)) * scales.gather(1, groups)
    dense = torch.zeros(n, k // 4, 4, dtype=torch.float32, device=codes.device)
    dense.scatter_(2, positions.view(n, k // 4, 2), values.view(n, k // 4, 2))
    return dense.view(n, k)


def torch_add_delta_matmul(out: torch.Tensor, x: torch.Tensor, slots: DeltaSlots,
                           row_slot: torch.Tensor) -> None:
    """out[m] += x[m] · Δ_{row_slot[m]}ᵀ in place (fp32 math); rows with row_slot -1 are untouched."""
    n = slots.out_features
    chunk_rows = max(1, min(n, CHUNK_ELEMENTS // slots.in_features))
    for slot in torch.unique(row_slot).tolist():
        if slot < 0:
            continue
        rows = (row_slot == slot).nonzero().squeeze(1)  # [R] row indices of out and x
        x_rows = x.index_select(0, rows).float()  # [R, K]
        if chunk_rows == n:
            delta_out = x_rows @ dequantize_slot(slots, slot).t()
        else:
            delta_out = torch.cat([x_rows @ dequantize_slot(slots, slot, n0, min(n0 + chunk_rows, n)).t()
                                   for n0 in range(0, n, chunk_rows)], dim=1)
        # add in fp32 and round once, like the kernel's epilogue
        out.index_copy_(0, rows, (out.index_select(0, rows).float() + delta_out).to(out.dtype))
