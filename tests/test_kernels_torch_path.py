"""DeltaSlots and the torch path of add_delta_matmul (the oracle) against PackedLinear.dequantize."""

from __future__ import annotations

import pytest
import torch

from deltazip.kernels import DeltaSlots, add_delta_matmul
from deltazip.kernels import torch_path as torch_path_module
from deltazip.kernels.synthetic import random_packed
from deltazip.kernels.torch_path import dequantize_slot


def loop_oracle(out: torch.Tensor, x: torch.Tensor, deltas: dict, row_slot: torch.Tensor) -> torch.Tensor:
    """out + x·Δᵀ computed row by row from each PackedLinear's own dequantize()."""
    expect = out.clone().float()
    for m, slot in enumerate(row_slot.tolist()):
        if slot >= 0:
            expect[m] += x[m].float() @ deltas[slot].dequantize().t()
    return expect.to(out.dtype)


def filled_slots(num_slots, n, k, bits, group_size, sparse24, exact, seed=0):
    gen = torch.Generator().manual_seed(seed)
    slots = DeltaSlots(num_slots, n, k, bits, group_size, sparse24)
    deltas = {}
    for slot in range(num_slots):
        deltas[slot] = random_packed(n, k, bits, group_size, sparse24, gen, exact=exact)
        slots.set(slot, deltas[slot])
    return slots, deltas


@pytest.mark.parametrize("sparse24", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequantize_slot_matches_packed(bits, sparse24):
    slots, deltas = filled_slots(2, 48, 128, bits, 32, sparse24, exact=False)
    for slot in range(2):
        assert torch.equal(dequantize_slot(slots, slot), deltas[slot].dequantize())
        assert torch.equal(dequantize_slot(slots, slot, 8, 40), deltas[slot].dequantize()[8:40])


@pytest.mark.parametrize("sparse24", [True, False])
def test_dequantize_slot_groups_not_a_multiple_of_4(sparse24):
    # group_size 6: a 2:4 group of 4 straddles two scale groups (the gather path)
    slots, deltas = filled_slots(1, 8, 96, 4, 6, sparse24, exact=False)
    assert torch.equal(dequantize_slot(slots, 0), deltas[0].dequantize())


@pytest.mark.parametrize("sparse24", [True, False])
@pytest.mark.parametrize("bits", [2, 4])
def test_mixed_batch_exact(bits, sparse24):
    gen = torch.Generator().manual_seed(1)
    slots, deltas = filled_slots(4, 40, 96, bits, 32, sparse24, exact=True)
    # unsorted rows, -1 rows, slot 2 has a single row, slot 3 none
    row_slot = torch.tensor([1, -1, 0, 1, 2, -1, 0, 0, 1], dtype=torch.int32)
    x = torch.randint(-3, 4, (9, 96), generator=gen).float()
    out = torch.randint(-3, 4, (9, 40), generator=gen).float()
    expect = loop_oracle(out, x, deltas, row_slot)
    before = out.clone()
    assert add_delta_matmul(out, x, slots, row_slot, impl="torch") is out
    assert torch.equal(out, expect)
    assert torch.equal(out[row_slot < 0], before[row_slot < 0])


def test_random_data_fp16_and_auto():
    gen = torch.Generator().manual_seed(2)
    slots, deltas = filled_slots(3, 64, 128, 4, 64, True, exact=False)
    row_slot = torch.randint(-1, 3, (16,), generator=gen, dtype=torch.int32)
    x = torch.randn(16, 128, generator=gen)
    out = torch.randn(16, 64, generator=gen)
    expect = loop_oracle(out, x, deltas, row_slot)
    add_delta_matmul(out, x, slots, row_slot)  # auto on CPU = native (torch where it cannot build)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    out16 = torch.randn(16, 64, generator=gen).half()
    expect16 = loop_oracle(out16, x.half().float(), deltas, row_slot)
    add_delta_matmul(out16, x.half(), slots, row_slot, impl="torch")
    assert out16.dtype == torch.float16
    torch.testing.assert_close(out16, expect16, rtol=1e-3, atol=1e-3)


def test_chunked_dequantization_gives_same_result(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    slots, deltas = filled_slots(2, 50, 64, 2, 32, True, exact=True)
    row_slot = torch.tensor([0, 1, 1, -1], dtype=torch.int32)
    x = torch.randint(-3, 4, (4, 64), generator=gen).float()
    out = torch.zeros(4, 50)
    monkeypatch.setattr(torch_path_module, "CHUNK_ELEMENTS", 64 * 7)  # 7 rows per chunk, ragged last chunk
    add_delta_matmul(out, x, slots, row_slot, impl="torch")
    assert torch.equal(out, loop_oracle(torch.zeros(4, 50), x, deltas, row_slot))


@pytest.mark.parametrize("low_bits", [2, 3])
def test_widening_is_exact(low_bits):
    gen = torch.Generator().manual_seed(4)
    delta = random_packed(32, 64, low_bits, 32, True, gen)
    slots = DeltaSlots(2, 32, 64, 4, 32, True)
    slots.set(1, delta)
    assert slots.packed(1).bits == 4
    assert torch.equal(slots.packed(1).dequantize(), delta.dequantize())


def test_coarser_groups_are_repeated_exactly():
    gen = torch.Generator().manual_seed(5)
    delta = random_packed(16, 128, 4, 128, False, gen)
    slots = DeltaSlots(1, 16, 128, 4, 32, False)
    slots.set(0, delta)
    assert torch.equal(dequantize_slot(slots, 0), delta.dequantize())


def test_clear_occupied_and_nbytes():
    slots, deltas = filled_slots(2, 32, 64, 4, 32, True, exact=True)
    assert slots.occupied(0) and slots.occupied(1)
    # [S,N,W] int32 with W = 32 codes / 8 per word, meta [S,N,2] int32, scales+zeros [S,N,2] fp16
    assert slots.nbytes == 2 * 32 * (4 * 4 + 2 * 4 + 2 * 2 * 2)
    assert slots.nbytes == 2 * deltas[0].nbytes
    slots.clear(0)
    assert not slots.occupied(0) and slots.occupied(1)
    out = torch.ones(2, 32)
    add_delta_matmul(out, torch.ones(2, 64), slots, torch.tensor([0, -1], dtype=torch.int32))
    assert torch.equal(out, torch.ones(2, 32))


def test_set_rejects_mismatches_with_clear_messages():
    gen = torch.Generator().manual_seed(6)
    slots = DeltaSlots(2, 32, 64, 2, 32, True)
    with pytest.raises(ValueError, match=r"\[N, K\] = \[32, 128\]"):
        slots.set(0, random_packed(32, 128, 2, 32, True, gen))
    with pytest.raises(ValueError, match="dense delta cannot go into 2:4 slots"):
        slots.set(0, random_packed(32, 64, 2, 32, False, gen))
    with pytest.raises(ValueError, match="4-bit delta does not fit 2-bit slots"):
        slots.set(0, random_packed(32, 64, 4, 32, True, gen))
    with pytest.raises(ValueError, match="group_size 16"):
        slots.set(0, random_packed(32, 64, 2, 16, True, gen))
    with pytest.raises(IndexError, match="slot 2 out of range"):
        slots.set(2, random_packed(32, 64, 2, 32, True, gen))
    assert not slots.occupied(0)


def test_add_delta_matmul_rejects_bad_inputs():
    slots = DeltaSlots(2, 32, 64, 2, 32, True)
    x, out = torch.zeros(3, 64), torch.zeros(3, 32)
    with pytest.raises(ValueError, match=r"row_slot values must lie in \[-1, 2\)"):
        add_delta_matmul(out, x, slots, torch.tensor([0, 2, -1], dtype=torch.int32))
    with pytest.raises(ValueError, match="do not match slots"):
        add_delta_matmul(torch.zeros(3, 31), x, slots, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="row_slot must be"):
        add_delta_matmul(out, x, slots, torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="impl must be"):
        add_delta_matmul(out, x, slots, torch.zeros(3, dtype=torch.int32), impl="cuda")
