"""The native CPU delta GEMM (deltazip::add_delta_matmul) against the torch path (the oracle).

Integer-valued activations, integer zeros and power-of-two scales make every product and sum exact in fp32,
so the native kernel must equal the oracle bit for bit whatever its summation order.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from deltazip.kernels import DeltaSlots, add_delta_matmul, native, ops
from deltazip.kernels.synthetic import random_packed

pytestmark = pytest.mark.skipif(not native.available() and shutil.which("g++") is None,
                                reason="no C++ compiler: the native kernel cannot build here")

STRATEGIES = ("direct", "lut", "rowvec", "dense", "auto")
ISAS = ("auto", "scalar", "nofast")  # nofast: the AVX2 kernel's general loop instead of the unrolled one


def test_native_kernel_builds_here():
    assert native.available(), native.error()
    assert ops.NATIVE
    info = native.info()
    assert 1 <= info["usable_cpus"] <= len(os.sched_getaffinity(0))


def filled(num_slots, n, k, bits, group_size, sparse24, seed=0, exact=True):
    gen = torch.Generator().manual_seed(seed)
    slots = DeltaSlots(num_slots, n, k, bits, group_size, sparse24)
    for slot in range(num_slots):
        slots.set(slot, random_packed(n, k, bits, group_size, sparse24, gen, exact=exact))
    return slots


def run_both(slots, row_slot, seed=1, dtype=torch.float32, monkeypatch=None, strategy="auto", isa="auto"):
    gen = torch.Generator().manual_seed(seed)
    m, n, k = len(row_slot), slots.out_features, slots.in_features
    x = torch.randint(-3, 4, (m, k), generator=gen).to(dtype)
    out = torch.randint(-3, 4, (m, n), generator=gen).to(dtype)
    row_slot = torch.tensor(row_slot, dtype=torch.int32)
    expect = out.clone()
    add_delta_matmul(expect, x, slots, row_slot, impl="torch")
    got = out.clone()
    monkeypatch.setenv("DELTAZIP_NATIVE_STRATEGY", strategy)
    monkeypatch.setenv("DELTAZIP_NATIVE_ISA", "scalar" if isa == "scalar" else "auto")
    if isa == "nofast":
        monkeypatch.setenv("DELTAZIP_NATIVE_NOFAST", "1")
    else:
        monkeypatch.delenv("DELTAZIP_NATIVE_NOFAST", raising=False)
    add_delta_matmul(got, x, slots, row_slot, impl="native")
    return out, got, expect, row_slot


# unsorted rows, rows on no delta, a slot with one row, a slot with many, an unused slot
MIXED = [1, -1, 0, 1, 2, -1, 0, 0, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 0]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("sparse24", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_every_layout_bit_exact(bits, sparse24, strategy, monkeypatch):
    # group 32 (fast path where it applies), row scales (group = K), and an odd N
    for n, k, group in ((40, 128, 32), (13, 96, 96)):
        slots = filled(4, n, k, bits, group, sparse24, seed=bits)
        for isa in ISAS:
            out, got, expect, row_slot = run_both(slots, MIXED, monkeypatch=monkeypatch, strategy=strategy,
                                                  isa=isa)
            assert torch.equal(got, expect), (n, k, group, isa)
            assert torch.equal(got[row_slot < 0], out[row_slot < 0])


@pytest.mark.parametrize("sparse24", [True, False])
@pytest.mark.parametrize("n, k, group", [(1, 32, 32), (7, 64, 16), (9, 160, 32), (33, 96, 4), (5, 96, 6),
                                         (17, 64, 2)])
def test_odd_shapes_and_groups(n, k, group, sparse24, monkeypatch):
    # group 6 / 2: a 2:4 group of 4 straddles scale groups (the scalar path); N not a multiple of 8
    for bits in (2, 3, 4):
        slots = filled(2, n, k, bits, group, sparse24, seed=n)
        for strategy in ("auto", "dense", "lut", "rowvec"):
            out, got, expect, _ = run_both(slots, [0, 1, -1, 1, 1], monkeypatch=monkeypatch,
                                           strategy=strategy)
            assert torch.equal(got, expect), (bits, strategy)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 16, 17, 64])
def test_several_rows_per_segment(rows, monkeypatch):
    slots = filled(2, 24, 64, 2, 32, True)
    layout = [i % 2 for i in range(rows)] + [-1]
    for strategy in STRATEGIES:
        _, got, expect, _ = run_both(slots, layout, monkeypatch=monkeypatch, strategy=strategy)
        assert torch.equal(got, expect), strategy


@pytest.mark.parametrize("sparse24", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_rowvec_row_blocks_and_k_chunks(bits, sparse24, monkeypatch):
    # rowvec: blocks of 8 / 16 / 32 rows (12, 16, 40 rows on a slot), K walked in several L1 chunks
    # (K = 1024), a scale group wider than a chunk (group 512), row scales (group = K); auto: rowvec, 9+ rows
    for k, group in ((1024, 64), (1024, 512), (1024, 1024)):
        slots = filled(3, 20, k, bits, group, sparse24, seed=k + group)
        layout = [0] * 12 + [1] * 16 + [2] * 40 + [-1, 1]
        for strategy in ("rowvec", "auto"):
            out, got, expect, row_slot = run_both(slots, layout, monkeypatch=monkeypatch, strategy=strategy)
            assert torch.equal(got, expect), (k, group, strategy)
            assert torch.equal(got[row_slot < 0], out[row_slot < 0])


def test_half_precision_and_strided_out(monkeypatch):
    slots = filled(3, 40, 64, 4, 32, True)
    for dtype in (torch.float16, torch.bfloat16):
        out, got, expect, row_slot = run_both(slots, MIXED, dtype=dtype, monkeypatch=monkeypatch)
        assert got.dtype == dtype and torch.equal(got, expect)
        assert torch.equal(got[row_slot < 0], out[row_slot < 0])
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(-3, 4, (4, 64), generator=gen).float()
    big = torch.randint(-3, 4, (4, 80), generator=gen).float()
    row_slot = torch.tensor([0, -1, 2, 2], dtype=torch.int32)
    expect = big.clone()
    add_delta_matmul(expect[:, 20:60], x, slots, row_slot, impl="torch")
    add_delta_matmul(big[:, 20:60], x, slots, row_slot, impl="native")  # a column slice: row stride 80
    assert torch.equal(big, expect)


def test_random_data_close_to_oracle():
    slots = filled(4, 96, 256, 2, 64, True, exact=False)
    gen = torch.Generator().manual_seed(4)
    row_slot = torch.randint(-1, 4, (16,), generator=gen, dtype=torch.int32)
    x, out = torch.randn(16, 256, generator=gen), torch.randn(16, 96, generator=gen)
    expect = out.clone()
    add_delta_matmul(expect, x, slots, row_slot, impl="torch")
    add_delta_matmul(out, x, slots, row_slot)  # auto: the op, native on CPU
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


def test_auto_goes_through_the_op_and_runs_native(monkeypatch):
    slots = filled(2, 16, 64, 2, 32, True)
    calls = []
    real = torch.ops.deltazip.add_delta_matmul
    monkeypatch.setattr(ops.torch.ops, "deltazip", type("NS", (), {
        "add_delta_matmul": staticmethod(lambda *a: (calls.append(a), real(*a))[1])}))
    out = torch.zeros(2, 16)
    add_delta_matmul(out, torch.ones(2, 64), slots, torch.tensor([0, 1], dtype=torch.int32))
    assert len(calls) == 1 and calls[0][9:] == (2, 32)


def test_fake_impl_for_tracing():
    from torch._subclasses.fake_tensor import FakeTensorMode

    slots = filled(2, 16, 64, 2, 32, True)
    with FakeTensorMode() as mode:
        out, x = mode.from_tensor(torch.zeros(3, 16)), mode.from_tensor(torch.zeros(3, 64))
        fake = [mode.from_tensor(t) for t in (slots.qweight, slots.meta, slots.scales, slots.zeros)]
        idx = [mode.from_tensor(torch.tensor(v, dtype=torch.int32)) for v in ([0, 2], [0, 2], [1])]
        torch.ops.deltazip.add_delta_matmul(out, x, *fake, *idx, 2, 32)


def op_args(slots, m=4):
    out, x = torch.full((m, slots.out_features), 7.0), torch.ones(m, slots.in_features)
    seg = [torch.tensor([0, 2, 3], dtype=torch.int32), torch.tensor([0, 1, 3], dtype=torch.int32),
           torch.tensor([1, 0], dtype=torch.int32)]
    return [out, x, slots.qweight, slots.meta, slots.scales, slots.zeros, *seg, slots.bits, slots.group_size]


@pytest.mark.parametrize("case, error, match", [
    ("slot out of range", IndexError, r"slot 2, out of range \[-1, 2\)"),
    ("segments short", ValueError, "segments must cover seg_rows exactly"),
    ("segments long", ValueError, "segments must cover seg_rows exactly"),
    ("segments decreasing", ValueError, "non-decreasing"),
    ("row out of range", IndexError, r"not a row of the batch \[0, 4\)"),
    ("row twice", ValueError, "more than one segment position"),
    ("qweight shape", ValueError, "qweight has shape"),
    ("qweight dtype", ValueError, "qweight must be an int32 tensor"),
    ("meta shape", ValueError, "meta must be int32"),
    ("scales dtype", ValueError, "scales and zeros must be float16"),
    ("bits", ValueError, "bits must be 2, 3, 4 or 8"),
    ("group", ValueError, "does not divide in_features"),
    ("out shape", ValueError, "out must be"),
    ("x dtype", ValueError, "float32, float16 or bfloat16"),
])
@pytest.mark.parametrize("impl", ["native", "torch"])
def test_bad_input_is_a_clear_error(case, error, match, impl, monkeypatch):
    slots = filled(2, 16, 64, 2, 32, True)
    args = op_args(slots)
    if case == "slot out of range":
        args[8] = torch.tensor([1, 2], dtype=torch.int32)
    elif case == "segments short":
        args[7] = torch.tensor([0, 1, 2], dtype=torch.int32)
    elif case == "segments long":
        args[7] = torch.tensor([0, 1, 4], dtype=torch.int32)
    elif case == "segments decreasing":
        args[7] = torch.tensor([0, 2, 1, 3], dtype=torch.int32)
        args[8] = torch.tensor([1, 0, 1], dtype=torch.int32)
    elif case == "row out of range":
        args[6] = torch.tensor([0, 2, 4], dtype=torch.int32)
    elif case == "row twice":
        args[6] = torch.tensor([0, 2, 2], dtype=torch.int32)
    elif case == "qweight shape":
        args[2] = slots.qweight[:, :, :-1]
    elif case == "qweight dtype":
        args[2] = slots.qweight.to(torch.int64)
    elif case == "meta shape":
        args[3] = slots.meta[:, :, :1]
    elif case == "scales dtype":
        args[4] = slots.scales.float()
    elif case == "bits":
        args[9] = 5
    elif case == "group":
        args[10] = 48
    elif case == "out shape":
        args[0] = torch.zeros(4, 15)
    elif case == "x dtype":
        args[1] = torch.ones(4, 64, dtype=torch.int32)
    before = args[0].clone()
    if impl == "native":
        with pytest.raises(error, match=match):
            torch.ops.deltazip.add_delta_matmul(*args)
    else:
        with pytest.raises((ValueError, IndexError, RuntimeError)):
            ops._torch_impl(*args)
    assert torch.equal(args[0], before)  # nothing written


def test_row_slot_errors_from_the_layer_entry():
    slots = filled(2, 16, 64, 2, 32, True)
    out, x = torch.zeros(3, 16), torch.zeros(3, 64)
    for bad in ([0, 2, -1], [0, -2, 1]):
        with pytest.raises(ValueError, match=r"row_slot values must lie in \[-1, 2\)"):
            add_delta_matmul(out, x, slots, torch.tensor(bad, dtype=torch.int32))


FALLBACK = textwrap.dedent("""
    import torch
    from deltazip.kernels import DeltaSlots, add_delta_matmul, ops
    from deltazip.kernels.synthetic import random_packed
    assert not ops.NATIVE
    slots = DeltaSlots(2, 16, 64, 2, 32, True)
    gen = torch.Generator().manual_seed(0)
    for s in range(2):
        slots.set(s, random_packed(16, 64, 2, 32, True, gen, exact=True))
    x = torch.randint(-3, 4, (4, 64), generator=gen).float()
    out = torch.randint(-3, 4, (4, 16), generator=gen).float()
    row_slot = torch.tensor([1, -1, 0, 1], dtype=torch.int32)
    expect = out.clone()
    add_delta_matmul(expect, x, slots, row_slot, impl="torch")
    for _ in range(3):
        got = out.clone()
        add_delta_matmul(got, x, slots, row_slot)
        assert torch.equal(got, expect)
    print("OK")
""")


def test_fallback_to_torch_path_with_one_warning_line():
    env = dict(os.environ, DELTAZIP_NATIVE="0")
    run = subprocess.run([sys.executable, "-c", FALLBACK], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "OK"
    warnings = [line for line in run.stderr.splitlines() if "native CPU delta kernel unavailable" in line]
    assert warnings == ["deltazip: native CPU delta kernel unavailable (DELTAZIP_NATIVE=0); "
                        "using the torch path"]


def test_parallel_threads_give_the_same_answer(monkeypatch):
    # OpenMP work items (segment x block of output rows) write disjoint parts of out
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        slots = filled(4, 200, 128, 2, 32, True)
        for strategy in STRATEGIES:
            _, got, expect, _ = run_both(slots, MIXED, monkeypatch=monkeypatch, strategy=strategy)
            assert torch.equal(got, expect), strategy
    finally:
        torch.set_num_threads(before)
