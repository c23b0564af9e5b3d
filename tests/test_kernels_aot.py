"""AOT compile of the shipped delta GEMM for sm_80 and sm_90a without a GPU (subprocess, interpreter off)."""

from __future__ import annotations

import os

import pytest

from deltazip.kernels.aot import compile_in_subprocess
from deltazip.kernels.configs import SHIPPED
from deltazip.kernels.delta_gemm import delta_gemm_kernel

TENSOR_CORE_FP16 = "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"


@pytest.fixture(scope="module")
def kernels(tmp_path_factory) -> dict:
    """{(bits, target): AotKernel} for the shipped tile, 2- and 4-bit 2:4, fp16 activations."""
    cache = tmp_path_factory.mktemp("triton-cache")
    old = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = str(cache)
    try:
        out = {}
        for bits in (2, 4):
            for kernel in compile_in_subprocess(["--cc", "80", "--cc", "90", "--bits", str(bits),
                                                 "--group-size", "128"]):
                out[(bits, kernel.target)] = kernel
        return out
    finally:
        if old is None:
            del os.environ["TRITON_CACHE_DIR"]
        else:
            os.environ["TRITON_CACHE_DIR"] = old


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("target", ["sm_80", "sm_90a"])
def test_shipped_config_compiles_spill_free_with_tensor_cores(kernels, bits, target):
    kernel = kernels[(bits, target)]
    assert f".target {target}" in kernel.ptx
    assert kernel.cubin[:4] == b"\x7fELF"
    assert kernel.spill_bytes == 0 and kernel.stack_bytes == 0, kernel.ptxas_log
    assert 0 < kernel.registers <= 255
    assert TENSOR_CORE_FP16 in kernel.mma_instructions
    assert (kernel.block_m, kernel.block_n, kernel.block_k, kernel.num_warps) == (
        SHIPPED.block_m, SHIPPED.block_n, SHIPPED.block_k, SHIPPED.num_warps)
    assert kernel.constexprs["BITS"] == bits and kernel.constexprs["SPARSE24"] == 1


def test_launch_description_matches_the_kernel(kernels):
    kernel = kernels[(4, "sm_90a")]
    assert kernel.name == "delta_gemm_kernel"
    runtime_args = [name for name in delta_gemm_kernel.arg_names if name not in kernel.constexprs]
    assert [name for name, _ in kernel.signature] == runtime_args
    assert dict(kernel.signature)["x_ptr"] == "*fp16" and dict(kernel.signature)["N"] == "i32"
    assert kernel.threads_per_block == 128
    assert kernel.grid(num_segments=3, n=100) == (3, 4, 1)
    assert kernel.grid(num_segments=1, n=64, m_splits=8) == (1, 2, 8)


def test_ptx_target_table():
    """Which PTX each device runs: sm_90a only on cc 9.0 (arch-specific), forward-compatible sm_80 PTX on
    Ampere/Ada and on Blackwell (which cannot load sm_90a); below 8.0 a clear error."""
    from deltazip.kernels.aot import SHIPPED_CCS, ptx_target

    assert SHIPPED_CCS == (80, 90)
    table = {(8, 0): "sm_80", (8, 6): "sm_80", (8, 9): "sm_80", (9, 0): "sm_90a", (10, 0): "sm_80",
             (10, 3): "sm_80", (12, 0): "sm_80", (12, 1): "sm_80"}
    for cc, target in table.items():
        compile_cc, got = ptx_target(*cc)
        assert got == target, cc
        assert compile_cc == (90 if target == "sm_90a" else 80)
    for cc in ((7, 5), (7, 0)):
        with pytest.raises(ValueError, match="not supported"):
            ptx_target(*cc)
