"""The Triton delta GEMM against the torch path: in the interpreter (TRITON_INTERPRET=1, set by conftest)
on CPU tensors, or compiled on a CUDA device when the interpreter is off (TRITON_INTERPRET=0). With the
interpreter off and no CUDA device nothing can run the kernel: the module then fails at collection instead
of skipping silently.

Exact mode (integer activations, integer zeros, power-of-two scales) must be bit-equal for both the
fp32 ieee dot and the fp16 tensor-core dot; random data within 1e-5 (fp32) / 2e-2 (fp16).
"""

from __future__ import annotations

import os

import pytest
import torch
import triton

from deltazip.kernels import DeltaSlots, add_delta_matmul
from deltazip.kernels.configs import SHIPPED, TileConfig
from deltazip.kernels.delta_gemm import DOT_FP16, DOT_FP32, segments, triton_add_delta_matmul
from deltazip.kernels.synthetic import random_packed

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.fail("tests/test_kernels_triton.py: TRITON_INTERPRET is not 1 and there is no CUDA device, so the "
                "Triton kernel cannot run here; unset TRITON_INTERPRET (tests/conftest.py sets it to 1)",
                pytrace=False)
DEVICE = "cpu" if INTERPRETED else "cuda"

SENTINEL = 12345.0  # rows without a delta must keep this value exactly
# unsorted; -1 rows; slot 2 has a single row; slot 3 is unused
MIXED_ROWS = [1, -1, 0, 1, 2, -1, 0, 0, 1, 1]


def make_case(n, k, bits, group_size, sparse24, exact, num_slots=4, row_slot=MIXED_ROWS, seed=0,
              slot_bits=None):
    gen = torch.Generator().manual_seed(seed)
    slots = DeltaSlots(num_slots, n, k, slot_bits or bits, group_size, sparse24, device=DEVICE)
    for slot in range(num_slots):
        slots.set(slot, random_packed(n, k, bits, group_size, sparse24, gen, exact=exact).to(DEVICE))
    row_slot = torch.tensor(row_slot, dtype=torch.int32, device=DEVICE)
    m = len(row_slot)
    if exact:
        x = torch.randint(-3, 4, (m, k), generator=gen).float()
        out = torch.randint(-3, 4, (m, n), generator=gen).float()
    else:
        x = torch.randn(m, k, generator=gen)
        out = torch.randn(m, n, generator=gen)
    out[row_slot.cpu() < 0] = SENTINEL
    return slots, x.to(DEVICE), out.to(DEVICE), row_slot


def run_both(slots, x, out, row_slot, **launch):
    expect = out.clone()
    add_delta_matmul(expect, x, slots, row_slot, impl="torch")
    got = out.clone()
    triton_add_delta_matmul(got, x, slots, row_slot, **launch)
    assert torch.all(got[row_slot < 0] == SENTINEL)
    return got, expect


@pytest.mark.parametrize("dot_mode", [DOT_FP32, DOT_FP16])
@pytest.mark.parametrize("bits,sparse24",
                         [(2, True), (4, True), (3, True), (8, True), (2, False), (4, False)])
def test_exact_mixed_batch_is_bit_equal(bits, sparse24, dot_mode):
    # N = 96 and K = 160 are ragged against the 128x128 interpreter tile
    slots, x, out, row_slot = make_case(96, 160, bits, 32, sparse24, exact=True)
    got, expect = run_both(slots, x, out, row_slot, dot_mode=dot_mode)
    assert torch.equal(got, expect)


@pytest.mark.parametrize("dot_mode,tol", [(DOT_FP32, 1e-5), (DOT_FP16, 2e-2)])
@pytest.mark.parametrize("bits,group_size", [(2, 64), (4, 256)])
def test_random_data_within_tolerance(bits, group_size, dot_mode, tol):
    slots, x, out, row_slot = make_case(128, 256, bits, group_size, True, exact=False, seed=1)
    got, expect = run_both(slots, x, out, row_slot, dot_mode=dot_mode)
    torch.testing.assert_close(got, expect, rtol=tol, atol=tol)


def test_widened_2bit_delta_in_4bit_slots():
    gen = torch.Generator().manual_seed(2)
    delta_2bit = random_packed(64, 128, 2, 32, True, gen, exact=True)
    slots = DeltaSlots(2, 64, 128, 4, 32, True, device=DEVICE)
    slots.set(1, delta_2bit.to(DEVICE))
    row_slot = torch.tensor([1, -1, 1], dtype=torch.int32, device=DEVICE)
    x = torch.randint(-3, 4, (3, 128), generator=gen).float()
    out = torch.zeros(3, 64, device=DEVICE)
    triton_add_delta_matmul(out, x.to(DEVICE), slots, row_slot, dot_mode=DOT_FP16)
    expect = torch.zeros(3, 64)
    expect[[0, 2]] = x[[0, 2]] @ delta_2bit.dequantize().t()
    assert torch.equal(out.cpu(), expect)


def test_long_segments_split_along_m():
    # 50 rows on slot 0 -> 4 blocks of 16 rows shared by 2 programs; 2 rows elsewhere
    row_slot = [0] * 30 + [1, -1] + [0] * 20 + [-1]
    slots, x, out, row_slot = make_case(64, 64, 4, 32, True, exact=True, num_slots=2, row_slot=row_slot,
                                        seed=3)
    config = TileConfig(block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=1, max_m_splits=2)
    got, expect = run_both(slots, x, out, row_slot, config=config, dot_mode=DOT_FP32)
    assert torch.equal(got, expect)


def test_shipped_tile_in_interpreter():
    slots, x, out, row_slot = make_case(64, 64, 2, 32, True, exact=True, num_slots=3,
                                        row_slot=[2, 0, -1, 0, 2], seed=4)
    got, expect = run_both(slots, x, out, row_slot, config=SHIPPED, dot_mode=DOT_FP16)
    assert torch.equal(got, expect)


def test_fp16_activations_and_output_through_auto_path():
    slots, x, out, row_slot = make_case(64, 128, 4, 64, True, exact=True, seed=5)
    x16, out16 = x.half(), out.half()
    expect = out16.clone()
    add_delta_matmul(expect, x16, slots, row_slot, impl="torch")
    add_delta_matmul(out16, x16, slots, row_slot, impl="triton")  # fp16 x -> fp16 tensor-core dot
    assert out16.dtype == torch.float16 and torch.equal(out16, expect)


def test_no_delta_rows_launch_nothing():
    slots, x, out, row_slot = make_case(32, 64, 2, 32, True, exact=True, num_slots=1, row_slot=[-1, -1])
    got = out.clone()
    triton_add_delta_matmul(got, x, slots, row_slot)
    assert torch.equal(got, out)


def test_segments_of_an_unsorted_batch():
    row_slot = torch.tensor([3, -1, 0, 3, 3, -1, 0], dtype=torch.int32)
    sorted_rows, seg_start, seg_slot, max_rows = segments(row_slot)
    assert sorted_rows.tolist() == [2, 6, 0, 3, 4]
    assert seg_start.tolist() == [0, 2, 5] and seg_slot.tolist() == [0, 3] and max_rows == 3


def test_out_must_be_row_contiguous():
    slots, x, out, row_slot = make_case(32, 64, 2, 32, True, exact=True, num_slots=1, row_slot=[0, 0])
    with pytest.raises(ValueError, match="contiguous rows"):
        triton_add_delta_matmul(out.t().contiguous().t(), x, slots, row_slot)


def nan_padded(t: torch.Tensor, pad: int) -> torch.Tensor:
    """A view of `t` inside a buffer whose rows continue with `pad` NaNs (unmasked reads turn into NaN)."""
    buf = torch.full((*t.shape[:-1], t.shape[-1] + pad), float("nan"), dtype=t.dtype, device=t.device)
    buf[..., : t.shape[-1]] = t
    return buf[..., : t.shape[-1]]


@pytest.mark.parametrize("sparse24", [True, False])
def test_strided_inputs_with_nan_guards(sparse24):
    # K = 160 against BLOCK_K = 128: the second K tile is ragged and every unmasked read would hit NaN
    slots, x, out, row_slot = make_case(96, 160, 2, 32, sparse24, exact=True, seed=6)
    expect = out.clone()
    add_delta_matmul(expect, x, slots, row_slot, impl="torch")
    slots.scales, slots.zeros = nan_padded(slots.scales, 8), nan_padded(slots.zeros, 8)
    x, out = nan_padded(x, 64), nan_padded(out, 64)
    triton_add_delta_matmul(out, x, slots, row_slot, dot_mode=DOT_FP32)
    assert torch.equal(out, expect)
    assert torch.isnan(out.as_strided((out.shape[0], 64), (out.stride(0), 1), out.shape[1])).all()


def test_rows_outside_m_are_never_touched():
    """The kernel's M bound: a sorted_rows entry >= M (as when token segments reach a last-token lm_head
    input) is skipped, never read or written. `out` holds guard rows past M that must keep the sentinel."""
    from deltazip.kernels.configs import INTERPRETER
    from deltazip.kernels.delta_gemm import delta_gemm_kernel

    slots, x, out, _ = make_case(64, 64, 2, 32, True, exact=True, num_slots=2, row_slot=[0, 1, 0, 0, 0],
                                 seed=7)
    m = 2  # x/out have 5 rows, the launch says only 2 are real; rows 2..4 are guards
    out[m:] = SENTINEL
    row_slot = torch.tensor([0, 1], dtype=torch.int32, device=DEVICE)
    expect = out[:m].clone()
    add_delta_matmul(expect, x[:m], slots, row_slot, impl="torch")
    sorted_rows = torch.tensor([0, 3, 4, 1, 2], dtype=torch.int32, device=DEVICE)  # 3, 4, 2 are >= M
    seg_start = torch.tensor([0, 3, 5], dtype=torch.int32, device=DEVICE)
    seg_slot = torch.tensor([0, 1], dtype=torch.int32, device=DEVICE)
    config = INTERPRETER if INTERPRETED else SHIPPED
    delta_gemm_kernel[(2, triton.cdiv(64, config.block_n), 1)](
        x, out, slots.qweight, slots.meta, slots.scales, slots.zeros, sorted_rows, seg_start, seg_slot,
        m, 64, 64, x.stride(0), out.stride(0), slots.qweight.stride(0), slots.qweight.stride(1),
        slots.meta.stride(0), slots.meta.stride(1), slots.scales.stride(0), slots.scales.stride(1),
        BITS=2, GROUP=32, SPARSE24=True, DOT_MODE=DOT_FP32,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k)
    assert torch.all(out[m:] == SENTINEL), "a row at or past M was written"
    assert torch.equal(out[:m], expect)
