"""The DeltaGemm definitions for TensorRT's Python plugin API (QDP), built by a factory that takes the module.

Deliberately **no** ``from __future__ import annotations`` in this module: ``tensorrt.plugin`` validates the
decorated functions with ``inspect.signature`` and ``issubclass(param.annotation, TensorDesc)`` (TensorRT
v10.14 / v10.15, python/packaging/bindings_wheel/tensorrt/plugin/_validate.py: ``_parse_register_inputs``,
``_parse_register_return``, ``_validate_aot_impl``), so every annotation must be a real class when the
decorator runs, never a string. The factory takes the ``tensorrt.plugin`` module (and ``tensorrt``) as
arguments, so the annotations are built from whatever module it is given: ``registration.py`` passes the
real one; CPU tests pass a stand-in module only to check the annotations with ``inspect``.

What upstream requires, read from the sources above (TensorRT v10.14, the line TensorRT-LLM 1.2.x pins):
- register: tensor args first (annotated ``TensorDesc``), then attributes of a serializable builtin type
  (int here), no defaults; return ``TensorDesc`` or ``tuple[TensorDesc, ...]``.
- aot_impl: parameters ``(inputs..., attributes..., outputs, tactic)``; a return annotation is mandatory
  ("No return annotation found for aot_impl function") and must be ``tuple[str | bytes, str | bytes,
  KernelLaunchParams, SymExprs]``; TensorRT calls it with every attribute value in registration order
  (_plugin_class.py, ``_TemplateAOTPlugin.get_launch_params``) and checks each extra arg is a ``SymInt32``.
- an aliased output (``TensorDesc.aliased()``) is honoured only with
  ``trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03`` on the builder config (python/docstrings/infer/
  pyPluginDoc.h): ``registration.enable_aliased_io``.
"""

from collections.abc import Callable
from dataclasses import dataclass

from deltazip.plugins.delta_gemm_plugin import PLUGIN_ID, DeltaGemmShape, extra_args


@dataclass(frozen=True)
class DeltaGemmDefinitions:
    """The functions handed to ``trtp.register`` / ``trtp.aot_impl`` (decorated when registered)."""

    desc: Callable
    aot_impl: Callable


def define_delta_gemm(trtp, trt, kernel_for: Callable, register: bool = True) -> DeltaGemmDefinitions:
    """Define (and, with `register`, register) the DeltaGemm plugin against the given `tensorrt.plugin`.

    `kernel_for(bits, group_size, sparse24, dtype)` returns the AotKernel for the building device
    (`registration.py`: `plugin_kernels(...)[ptx_target(device cc)]`).
    """
    dtype_names = {trt.float16: "fp16", trt.bfloat16: "bf16", trt.float32: "fp32"}
    TensorDesc = trtp.TensorDesc  # noqa: N806 - the class the annotations must be

    def delta_gemm_desc(x: TensorDesc, base_out: TensorDesc, qweight: TensorDesc, meta: TensorDesc,
                        scales: TensorDesc, zeros: TensorDesc, sorted_rows: TensorDesc, seg_start: TensorDesc,
                        seg_slot: TensorDesc, out_features: int, in_features: int, bits: int, group_size: int,
                        sparse24: int, num_slots: int, m_splits: int) -> tuple[TensorDesc, TensorDesc]:
        """y: base_out's shape and dtype, aliased to it (the kernel adds the deltas in place); abi_pad: [1]
        int32, never written (it fills the kernel's second scratch slot, see delta_gemm_plugin)."""
        # TensorDesc.aliased(), trtp.from_shape_expr: TensorRT v10.14 tensorrt/plugin/_tensor.py,
        # _top_level.py
        return base_out.aliased(), trtp.from_shape_expr((1,), dtype=trt.int32)

    def delta_gemm_aot(x: TensorDesc, base_out: TensorDesc, qweight: TensorDesc, meta: TensorDesc,
                       scales: TensorDesc, zeros: TensorDesc, sorted_rows: TensorDesc, seg_start: TensorDesc,
                       seg_slot: TensorDesc, out_features: int, in_features: int, bits: int, group_size: int,
                       sparse24: int, num_slots: int, m_splits: int, outputs: tuple[TensorDesc, TensorDesc],
                       tactic: int,
                       ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]:
        """(kernel name, PTX, launch params, extra scalar args) of the AOT-compiled delta GEMM."""
        shape = DeltaGemmShape(out_features, in_features, bits, group_size, bool(sparse24), num_slots)
        kernel = kernel_for(bits, group_size, bool(sparse24), dtype_names[x.dtype])
        # KernelLaunchParams fields, SymInt32, SymIntExprs: TensorRT v10.14 tensorrt/plugin/_tensor.py
        launch = trtp.KernelLaunchParams()
        launch.grid_x = seg_slot.shape_expr[0]  # one program row per segment
        launch.grid_y = -(-out_features // kernel.block_n)
        launch.grid_z = m_splits
        launch.block_x = kernel.threads_per_block
        launch.shared_mem = kernel.shared_bytes
        # M = rows of x: symbolic, resolved by TensorRT per batch; the rest are build-time constants
        scalars = extra_args(shape, x.shape_expr[0])
        args = trtp.SymIntExprs(len(scalars))
        for i, value in enumerate(scalars):
            args[i] = trtp.SymInt32(value)
        return kernel.name, kernel.ptx, launch, args

    if register:
        delta_gemm_desc = trtp.register(PLUGIN_ID)(delta_gemm_desc)
        delta_gemm_aot = trtp.aot_impl(PLUGIN_ID)(delta_gemm_aot)
    return DeltaGemmDefinitions(delta_gemm_desc, delta_gemm_aot)
