"""SGMV delta GEMM in OpenAI Triton: out[m] += x[m] · dequant(Δ_{slot(m)})ᵀ for a mixed-delta batch.

Rows of the batch are sorted by slot into segments (rows with slot -1 are dropped, never computed or
touched). M bounds the rows: a `sorted_rows` entry outside [0, M) is skipped, never read or written (the
TensorRT plugin's lm_head sees fewer rows than tokens; a wrong segment list must not reach past x/out).
One program owns (segment, block of N columns, split along M) and loops over its rows in
BLOCK_M steps through the indirection `sorted_rows`:

    for each BLOCK_M rows r of the segment:
        acc = 0                                      # fp32 [BLOCK_M, BLOCK_N]
        for k0 in 0..K step BLOCK_K:
            W = dequant(slot, n-block, k-block)      # [BLOCK_N, BLOCK_K], (q - z) * s, fused in registers:
                                                     # loads only the BLOCK_K/2 kept codes + positions
                                                     # per row, then expands each group of 4
            acc += x[r, k-block] · Wᵀ                # tl.dot: fp16 x fp16 -> fp32 (tensor cores) or fp32 ieee
        out[r, n-block] += acc                       # read-modify-write in fp32, one rounding

The base GEMM is not in here: the runtime does it once for the whole batch and this kernel adds the
deltas to its output. Storage is deltazip.packed (codes LSB-first, 32 // BITS per int32 word; 2:4
positions 16 per word); 2-, 3-, 4- and 8-bit, 2:4 and dense deltas. The dequantized tile is dense:
no sparse tensor cores (mma.sp would need the Sparse-Marlin metadata order).

Tested on CPU in the Triton interpreter; on GPU only AOT-compiled here ("GPU only — not verified on
this machine": no CUDA run has checked results or timings).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from deltazip.kernels.configs import INTERPRETER, SHIPPED, TileConfig
from deltazip.kernels.slots import DeltaSlots

# DOT_MODE constexpr: how the tile product runs.
DOT_FP32, DOT_FP16, DOT_BF16 = 0, 1, 2


@triton.jit
def _dequant_tile(q_base, meta_base, s_base, z_base, offs_n, mask_n, k0, K,
                  stride_qn, stride_mn, stride_sn,
                  BITS: tl.constexpr, GROUP: tl.constexpr, SPARSE24: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dense fp32 delta tile W[BLOCK_N, BLOCK_K] for output rows offs_n, dense columns k0 + [0, BLOCK_K)."""
    VPW: tl.constexpr = 32 // BITS
    QMASK: tl.constexpr = (1 << BITS) - 1
    row_q = offs_n[:, None] * stride_qn
    row_s = offs_n[:, None] * stride_sn
    if SPARSE24:
        # Load only the kept values j of this tile (2 per group of 4 dense columns) and their positions,
        # dequantize them, then expand each group: dense[4g + r] = v(2g) if pos(2g) == r, v(2g+1) if ...
        HALF: tl.constexpr = BLOCK_K // 2
        offs_j = k0 // 2 + tl.arange(0, HALF)
        mask_j = mask_n[:, None] & (offs_j < K // 2)[None, :]
        word = tl.load(q_base + row_q + (offs_j // VPW)[None, :], mask=mask_j, other=0)
        q = (word >> ((offs_j % VPW) * BITS)[None, :]) & QMASK  # arithmetic shift, then mask: logical
        row_m = offs_n[:, None] * stride_mn
        pos_word = tl.load(meta_base + row_m + (offs_j // 16)[None, :], mask=mask_j, other=0)
        pos = (pos_word >> ((offs_j % 16) * 2)[None, :]) & 3
        group = ((offs_j // 2) * 4)[None, :] + pos
        group = group // GROUP
        s = tl.load(s_base + row_s + group, mask=mask_j, other=0.0).to(tl.float32)
        z = tl.load(z_base + row_s + group, mask=mask_j, other=0.0).to(tl.float32)
        v0, v1 = tl.split(tl.reshape((q.to(tl.float32) - z) * s, (q.shape[0], HALF // 2, 2)))
        p0, p1 = tl.split(tl.reshape(pos, (q.shape[0], HALF // 2, 2)))
        d0 = tl.where(p0 == 0, v0, 0.0) + tl.where(p1 == 0, v1, 0.0)
        d1 = tl.where(p0 == 1, v0, 0.0) + tl.where(p1 == 1, v1, 0.0)
        d2 = tl.where(p0 == 2, v0, 0.0) + tl.where(p1 == 2, v1, 0.0)
        d3 = tl.where(p0 == 3, v0, 0.0) + tl.where(p1 == 3, v1, 0.0)
        w = tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), (q.shape[0], BLOCK_K))
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_nk = mask_n[:, None] & (offs_k < K)[None, :]
        group = (offs_k // GROUP)[None, :]
        s = tl.load(s_base + row_s + group, mask=mask_nk, other=0.0).to(tl.float32)
        z = tl.load(z_base + row_s + group, mask=mask_nk, other=0.0).to(tl.float32)
        word = tl.load(q_base + row_q + (offs_k // VPW)[None, :], mask=mask_nk, other=0)
        q = (word >> ((offs_k % VPW) * BITS)[None, :]) & QMASK
        w = (q.to(tl.float32) - z) * s
    return w


@triton.jit
def delta_gemm_kernel(
    # pointers
    x_ptr,            # [M, K] activations (fp16/bf16/fp32), row stride stride_xm
    out_ptr,          # [M, N] base output, updated in place
    qweight_ptr,      # [S, N, W] int32 codes
    meta_ptr,         # [S, N, K/32] int32 2:4 positions (any int32 pointer when dense)
    scales_ptr,       # [S, N, G] fp16
    zeros_ptr,        # [S, N, G] fp16
    sorted_rows_ptr,  # [R] int32 batch rows with a delta, sorted by slot
    seg_start_ptr,    # [num_segments + 1] int32 offsets into sorted_rows
    seg_slot_ptr,     # [num_segments] int32 slot of each segment
    # sizes: M bounds the rows of x/out (sorted_rows entries >= M are skipped: never read or written)
    M, N, K,
    # strides (elements)
    stride_xm, stride_om,
    stride_qs, stride_qn, stride_ms, stride_mn, stride_ss, stride_sn,
    # meta-parameters
    BITS: tl.constexpr, GROUP: tl.constexpr, SPARSE24: tl.constexpr, DOT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    seg = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_m = tl.program_id(2)
    m_splits = tl.num_programs(2)
    row_start = tl.load(seg_start_ptr + seg)
    row_end = tl.load(seg_start_ptr + seg + 1)
    slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
    q_base = qweight_ptr + slot * stride_qs
    meta_base = meta_ptr + slot * stride_ms
    s_base = scales_ptr + slot * stride_ss
    z_base = zeros_ptr + slot * stride_ss
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    for m0 in range(row_start + pid_m * BLOCK_M, row_end, m_splits * BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row_end
        rows = tl.load(sorted_rows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
        mask_m = mask_m & (rows >= 0) & (rows < M)  # a row index outside x/out is never touched
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = _dequant_tile(q_base, meta_base, s_base, z_base, offs_n, mask_n, k0, K,
                              stride_qn, stride_mn, stride_sn, BITS, GROUP, SPARSE24, BLOCK_K)
            if DOT_MODE == 1:
                acc += tl.dot(x.to(tl.float16), tl.trans(w.to(tl.float16)))
            elif DOT_MODE == 2:
                acc += tl.dot(x.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)))
            else:
                acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
        out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :]
        mask_mn = mask_m[:, None] & mask_n[None, :]
        total = tl.load(out_ptrs, mask=mask_mn, other=0.0).to(tl.float32) + acc
        tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=mask_mn)


def segments(row_slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """row_slot [M] → (sorted_rows [R] int32, seg_start [S+1] int32, seg_slot [S] int32, max rows/segment)."""
    order = torch.argsort(row_slot, stable=True)
    sorted_slot = row_slot[order]
    num_without = int((row_slot < 0).sum())  # -1 rows sort first and are dropped
    sorted_rows, sorted_slot = order[num_without:], sorted_slot[num_without:]
    seg_slot, rows_per_seg = torch.unique_consecutive(sorted_slot, return_counts=True)
    seg_start = torch.zeros(len(seg_slot) + 1, dtype=torch.int32, device=row_slot.device)
    seg_start[1:] = rows_per_seg.cumsum(0)
    max_rows = int(rows_per_seg.max()) if len(seg_slot) else 0
    return sorted_rows.to(torch.int32), seg_start, seg_slot.to(torch.int32), max_rows


def default_dot_mode(dtype: torch.dtype) -> int:
    """fp16/bf16 activations use the matching tensor-core dot; fp32 the exact ieee dot."""
    return {torch.float16: DOT_FP16, torch.bfloat16: DOT_BF16}.get(dtype, DOT_FP32)


def triton_add_delta_matmul(out: torch.Tensor, x: torch.Tensor, slots: DeltaSlots, row_slot: torch.Tensor,
                            config: TileConfig | None = None, dot_mode: int | None = None) -> None:
    """Launch the kernel: out += x · Δᵀ per row (inputs already checked by ops.add_delta_matmul)."""
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if x.is_cuda == interpreted:
        where = "CPU tensors under TRITON_INTERPRET=1" if interpreted else "CUDA tensors"
        raise ValueError(f"the Triton delta GEMM needs {where} (x is on {x.device})")
    if out.stride(1) != 1:
        raise ValueError("out must have contiguous rows (stride 1 along N) to be updated in place")
    if x.device != out.device or x.device != slots.qweight.device:
        raise ValueError(f"x ({x.device}), out ({out.device}) and slots ({slots.qweight.device}) "
                         "must be on one device")
    config = config or (INTERPRETER if interpreted else SHIPPED)
    dot_mode = default_dot_mode(x.dtype) if dot_mode is None else dot_mode
    x = x if x.stride(1) == 1 else x.contiguous()
    sorted_rows, seg_start, seg_slot, max_rows = segments(row_slot)
    if max_rows == 0:
        return
    meta = slots.meta if slots.sparse24 else slots.qweight
    grid = (len(seg_slot), triton.cdiv(slots.out_features, config.block_n),
            min(triton.cdiv(max_rows, config.block_m), config.max_m_splits))
    delta_gemm_kernel[grid](
        x, out, slots.qweight, meta, slots.scales, slots.zeros, sorted_rows, seg_start, seg_slot,
        x.shape[0], slots.out_features, slots.in_features,
        x.stride(0), out.stride(0),
        slots.qweight.stride(0), slots.qweight.stride(1), meta.stride(0), meta.stride(1),
        slots.scales.stride(0), slots.scales.stride(1),
        BITS=slots.bits, GROUP=slots.group_size, SPARSE24=slots.sparse24, DOT_MODE=dot_mode,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
