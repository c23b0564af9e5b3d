"""Registers the DeltaGemm plugin with TensorRT's Python plugin API (``tensorrt.plugin``, TensorRT >= 10.9).

GPU only — not verified on this machine: TensorRT cannot be installed here. Import this module only where
``tensorrt`` imports; elsewhere the import fails at once with a DeltazipError saying so. The rules it wires
in (I/O order, aliasing, shapes, launch grid, PTX) live in ``delta_gemm_plugin`` and are tested on CPU.
"""

from __future__ import annotations

from functools import cache

from deltazip.errors import DeltazipError
from deltazip.plugins.delta_gemm_plugin import (
    PLUGIN_ID,
    DeltaGemmShape,
    extra_args,
    plugin_kernels,
)

MIN_TENSORRT = (10, 9)
NOT_AVAILABLE = ("the DeltaGemm TensorRT plugin needs TensorRT >= 10.9 with tensorrt.plugin, which is not "
                 "available here (GPU only; install TensorRT 10.x on a CUDA machine)")

try:
    import tensorrt as trt
    import tensorrt.plugin as trtp
except ImportError as err:  # also OSError-free: a missing libnvinfer surfaces as ImportError
    raise DeltazipError(f"{NOT_AVAILABLE}: {err}") from None

if tuple(int(p) for p in trt.__version__.split(".")[:2]) < MIN_TENSORRT:
    raise DeltazipError(f"{NOT_AVAILABLE}: found TensorRT {trt.__version__}")

_DTYPE_NAMES = {trt.float16: "fp16", trt.bfloat16: "bf16", trt.float32: "fp32"}


@cache
def _kernels(bits: int, group_size: int, sparse24: bool, dtype: str) -> dict:
    return plugin_kernels(bits, group_size, sparse24, dtype)


def _device_target() -> str:
    import torch

    major, _ = torch.cuda.get_device_capability()
    return "sm_90a" if major >= 9 else "sm_80"


@trtp.register(PLUGIN_ID)
def delta_gemm_desc(x: trtp.TensorDesc, base_out: trtp.TensorDesc, qweight: trtp.TensorDesc,
                    meta: trtp.TensorDesc, scales: trtp.TensorDesc, zeros: trtp.TensorDesc,
                    sorted_rows: trtp.TensorDesc, seg_start: trtp.TensorDesc, seg_slot: trtp.TensorDesc,
                    out_features: int, in_features: int, bits: int, group_size: int, sparse24: int,
                    num_slots: int, m_splits: int) -> trtp.TensorDesc:
    """y has base_out's shape and dtype and aliases it: the kernel adds the deltas in place."""
    return base_out.aliased()


@trtp.aot_impl(PLUGIN_ID)
def delta_gemm_aot(x: trtp.TensorDesc, base_out: trtp.TensorDesc, qweight: trtp.TensorDesc,
                   meta: trtp.TensorDesc, scales: trtp.TensorDesc, zeros: trtp.TensorDesc,
                   sorted_rows: trtp.TensorDesc, seg_start: trtp.TensorDesc, seg_slot: trtp.TensorDesc,
                   out_features: int, in_features: int, bits: int, group_size: int, sparse24: int,
                   num_slots: int, m_splits: int, outputs: tuple[trtp.TensorDesc], tactic: int):
    """(kernel name, PTX, launch params, extra scalar args) of the AOT-compiled delta GEMM."""
    shape = DeltaGemmShape(out_features, in_features, bits, group_size, bool(sparse24), num_slots)
    kernel = _kernels(bits, group_size, bool(sparse24), _DTYPE_NAMES[x.dtype])[_device_target()]
    launch = trtp.KernelLaunchParams()
    launch.grid_x = seg_slot.shape_expr[0]
    launch.grid_y = -(-out_features // kernel.block_n)
    launch.grid_z = m_splits
    launch.block_x = kernel.threads_per_block
    launch.shared_mem = kernel.shared_bytes
    scalars = extra_args(shape)
    exprs = trtp.SymIntExprs(len(scalars))
    for i, value in enumerate(scalars):
        exprs[i] = trtp.SymInt32(value)
    return kernel.name, kernel.ptx, launch, exprs


def add_delta_gemm(network, x, base_out, weights: dict, segments: dict, shape: DeltaGemmShape, m_splits: int):
    """Insert one DeltaGemm after a base GEMM: returns the layer whose output 0 is base_out + x·Δᵀ."""
    op = trtp.op.deltazip.delta_gemm(
        x, base_out, weights["qweight"], weights["meta"], weights["scales"], weights["zeros"],
        segments["sorted_rows"], segments["seg_start"], segments["seg_slot"],
        out_features=shape.out_features, in_features=shape.in_features, bits=shape.bits,
        group_size=shape.group_size, sparse24=int(shape.sparse24), num_slots=shape.num_slots,
        m_splits=m_splits)
    return network.add_plugin(op, aot=True)
