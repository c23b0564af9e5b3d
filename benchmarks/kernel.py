"""Delta GEMM benchmark: the torch path's cost next to the base GEMM (CPU), and the AOT resource figures.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kernel.py [--repeats 30]

Section 1 (CPU): 16 rows spread over 1/4/8/16 distinct 2-bit 2:4 deltas, add_delta_matmul(impl="torch")
vs the dense fp32 base GEMM of the same rows, side by side in one run (family layer shapes).
Section 2: registers / spills / shared memory / tensor-core opcodes of the shipped tile (AOT, no GPU).
Section 3 (GPU only — not verified on this machine): Triton kernel vs torch path vs fp16 base GEMM on CUDA.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks._results import command_line, markdown_table, write_section  # noqa: E402

# (preset, layer, N, K): the tiny and small family presets' MLP shapes
SHAPES = [("tiny", "up_proj", 384, 128), ("tiny", "down_proj", 128, 384),
          ("small", "up_proj", 1536, 512), ("small", "down_proj", 512, 1536)]
ROWS = 16
DISTINCT_DELTAS = (1, 4, 8, 16)


def best_ms(fn, repeats: int, sync=lambda: None) -> float:
    """Best-of-`repeats` wall time of fn() in milliseconds (after one warm-up call)."""
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def filled_slots(n: int, k: int, num_slots: int, device: str = "cpu"):
    import torch

    from deltazip.kernels import DeltaSlots
    from deltazip.kernels.synthetic import random_packed

    gen = torch.Generator().manual_seed(0)
    slots = DeltaSlots(num_slots, n, k, 2, 64, True, device=device)
    for slot in range(num_slots):
        slots.set(slot, random_packed(n, k, 2, 64, True, gen).to(device))
    return slots


def cpu_torch_path(repeats: int) -> list[list[object]]:
    import torch

    from deltazip.kernels import add_delta_matmul

    rows = []
    for preset, layer, n, k in SHAPES:
        slots = filled_slots(n, k, max(DISTINCT_DELTAS))
        weight = torch.randn(n, k)
        x = torch.randn(ROWS, k)
        out = torch.zeros(ROWS, n)
        base_ms = best_ms(lambda: x @ weight.t(), repeats)  # noqa: B023
        for distinct in DISTINCT_DELTAS:
            row_slot = (torch.arange(ROWS) % distinct).to(torch.int32)
            delta_ms = best_ms(lambda: add_delta_matmul(out, x, slots, row_slot, impl="torch"), repeats)  # noqa: B023
            rows.append([preset, f"{layer} [{n}x{k}]", distinct, base_ms, delta_ms, delta_ms / base_ms])
    return rows


def aot_resources() -> list[list[object]]:
    from deltazip.kernels.aot import compile_in_subprocess

    rows = []
    for bits in (2, 4):
        args = ["--cc", "80", "--cc", "90", "--bits", str(bits), "--group-size", "128"]
        for kernel in compile_in_subprocess(args):
            tile = f"{kernel.block_m}x{kernel.block_n}x{kernel.block_k}/{kernel.num_warps}w"
            rows.append([kernel.target, bits, tile, kernel.registers, kernel.spill_bytes, kernel.shared_bytes,
                         ", ".join(kernel.mma_instructions) or "none"])
    return rows


def gpu_timings(repeats: int) -> list[list[object]]:
    """GPU only — not verified on this machine."""
    import torch

    from deltazip.kernels import add_delta_matmul

    rows = []
    for preset, layer, n, k in SHAPES:
        slots = filled_slots(n, k, max(DISTINCT_DELTAS), device="cuda")
        weight = torch.randn(n, k, device="cuda", dtype=torch.float16)
        x = torch.randn(ROWS, k, device="cuda", dtype=torch.float16)
        out = torch.zeros(ROWS, n, device="cuda", dtype=torch.float16)
        base_ms = best_ms(lambda: x @ weight.t(), repeats, torch.cuda.synchronize)  # noqa: B023
        for distinct in DISTINCT_DELTAS:
            row_slot = (torch.arange(ROWS, device="cuda") % distinct).to(torch.int32)
            got, expect = out.clone(), out.clone()
            add_delta_matmul(got, x, slots, row_slot, impl="triton")
            add_delta_matmul(expect, x, slots, row_slot, impl="torch")
            torch.testing.assert_close(got, expect, rtol=2e-2, atol=2e-2)  # fp16 tensor-core dot vs fp32
            times = {impl: best_ms(lambda: add_delta_matmul(out, x, slots, row_slot, impl=impl),  # noqa: B023
                                   repeats, torch.cuda.synchronize) for impl in ("triton", "torch")}
            rows.append([preset, f"{layer} [{n}x{k}]", distinct, base_ms, times["triton"], times["torch"],
                         times["triton"] / base_ms])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    import torch

    command = command_line()
    torch.set_num_threads(1)
    rows = cpu_torch_path(args.repeats)
    table = markdown_table(["preset", "layer [N x K]", "distinct deltas", "base GEMM ms", "delta (torch) ms",
                            "delta / base"], rows)
    write_section("Delta GEMM: torch path vs base GEMM (CPU, 16 rows)", command, table,
                  "2-bit 2:4 deltas, group 64; fp32; 1 thread; best of the repeats. The torch path "
                  "dequantizes each distinct slot once per call: its cost grows with the distinct deltas.")
    print(table)
    table = markdown_table(["target", "bits", "tile MxNxK/warps", "registers", "spill bytes", "shared bytes",
                            "tensor-core opcodes"], aot_resources())
    write_section("Delta GEMM: AOT resources of the shipped tile (no GPU)", command, table,
                  "fp16 activations, 2:4, group 128; `triton.compile` for GPUTarget cuda 80/90, ptxas -v of "
                  "Triton's bundled ptxas. Compiled only: GPU only — not verified on this machine.")
    print(table)
    if torch.cuda.is_available():
        columns = ["preset", "layer [N x K]", "distinct deltas", "base fp16 GEMM ms", "triton ms", "torch ms",
                   "triton / base"]
        table = markdown_table(columns, gpu_timings(args.repeats))
        write_section("Delta GEMM on GPU (16 rows)", command, table, "Measured on CUDA.")
        print(table)
    else:
        print("no CUDA device: GPU timings skipped (GPU only — not verified on this machine)")


if __name__ == "__main__":
    main()
