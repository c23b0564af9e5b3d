"""Registers the DeltaGemm plugin with TensorRT's Python plugin API (``tensorrt.plugin``, TensorRT >= 10.9).

GPU only — not verified on this machine: TensorRT cannot be installed here. Import this module only where
``tensorrt`` imports; elsewhere the import fails at once with one DeltazipError line saying so. The
definitions are in ``qdp.py`` (annotations checked on CPU); the rules they wire in (I/O order, aliasing,
shapes, launch ABI, PTX) in ``delta_gemm_plugin`` (tested on CPU).
"""

from __future__ import annotations

from functools import cache

from deltazip.errors import DeltazipError
from deltazip.plugins.delta_gemm_plugin import INPUT_NAMES, PLUGIN_ID, DeltaGemmShape, plugin_kernels
from deltazip.plugins.qdp import define_delta_gemm

MIN_TENSORRT = (10, 9)
NOT_AVAILABLE = ("the DeltaGemm TensorRT plugin needs TensorRT >= 10.9 with tensorrt.plugin, which is not "
                 "available here (GPU only; install TensorRT 10.x on a CUDA machine)")

try:
    import tensorrt as trt
    import tensorrt.plugin as trtp
except (ImportError, OSError) as err:  # a missing libnvinfer / libcuda surfaces as either
    raise DeltazipError(f"{NOT_AVAILABLE}: {err}") from None

if tuple(int(p) for p in trt.__version__.split(".")[:2]) < MIN_TENSORRT:
    raise DeltazipError(f"{NOT_AVAILABLE}: found TensorRT {trt.__version__}")
if not hasattr(trtp, "KernelLaunchParams"):  # exported only where IS_AOT_ENABLED (tensorrt/plugin/_export.py)
    raise DeltazipError(f"{NOT_AVAILABLE}: this TensorRT has no AOT plugin support "
                        "(tensorrt.plugin.KernelLaunchParams)")


def device_target() -> str:
    """The PTX target of the current CUDA device (architecture table: deltazip.kernels.aot.PTX_TARGETS)."""
    import torch

    from deltazip.kernels.aot import ptx_target

    return ptx_target(*torch.cuda.get_device_capability())[1]


@cache
def _kernel_for(bits: int, group_size: int, sparse24: bool, dtype: str):
    return plugin_kernels(bits, group_size, sparse24, dtype)[device_target()]


DEFINITIONS = define_delta_gemm(trtp, trt, _kernel_for, register=True)


def enable_aliased_io(builder_config) -> None:
    """Turn on the preview feature without which TensorRT ignores the plugin's aliased output (y would
    never be written). TensorRT v10.14: ``IBuilderConfig.set_preview_feature`` (include/NvInfer.h
    setPreviewFeature) with ``PreviewFeature.ALIASED_PLUGIN_IO_10_03`` (python/src/infer/pyCore.cpp)."""
    builder_config.set_preview_feature(trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03, True)


def add_delta_gemm(network, x, base_out, weights: dict, segments: dict, shape: DeltaGemmShape, m_splits: int):
    """Insert one DeltaGemm after a base GEMM; returns the layer (output 0: y = base_out + x·Δᵀ, aliased to
    base_out; output 1: the unused ABI pad). `weights`: qweight/meta/scales/zeros, `segments`:
    sorted_rows/seg_start/seg_slot (trt.ITensor each). TensorRT v10.14 python/src/infer/pyGraph.cpp
    ``add_plugin(func, aot)``; call form as in samples/python/quickly_deployable_plugins/qdp_runner.py."""
    tensors = {"x": x, "base_out": base_out, **weights, **segments}
    op = trtp.op.deltazip.delta_gemm(
        *(tensors[name] for name in INPUT_NAMES),
        out_features=shape.out_features, in_features=shape.in_features, bits=shape.bits,
        group_size=shape.group_size, sparse24=int(shape.sparse24), num_slots=shape.num_slots,
        m_splits=m_splits)
    return network.add_plugin(op, aot=True)


__all__ = ["DEFINITIONS", "PLUGIN_ID", "add_delta_gemm", "device_target", "enable_aliased_io"]
