"""DeltaGemm TensorRT plugin, the parts that need no TensorRT: I/O layout, shape/dtype rules, launch, PTX.

The plugin computes y = base_out + x·Δ_sᵀ per row (s = the row's delta slot, none: y = base_out) with the
runtime's own Triton kernel (`deltazip.kernels.delta_gemm.delta_gemm_kernel`), compiled ahead of time by
`deltazip.kernels.aot.compile_delta_gemm` to PTX for sm_80 / sm_90a. `registration.py` wires these rules
into TensorRT's Python plugin API (`tensorrt.plugin`, TensorRT >= 10.9, AOT implementation).

Launch ABI. A QDP AOT kernel receives (input pointers..., extra scalars..., output pointers...). The plugin's
output is *aliased* to its input `base_out` (in-place, like the runtime), and the inputs are ordered so
that this calling convention lines up with the kernel's own parameter list:

    kernel:  x, out,      qweight, meta, scales, zeros, sorted_rows, seg_start, seg_slot, N, K, ..., scratch
    plugin:  x, base_out, qweight, meta, scales, zeros, sorted_rows, seg_start, seg_slot, N, K, ..., y

so `out` is the base_out buffer and TensorRT's trailing output pointer lands in Triton's global-scratch slot,
which the kernel never reads when its scratch sizes are 0 (checked here). GPU only — not verified on this
machine: no TensorRT engine has run this plugin; CPU tests check the layout, the rules, the PTX, and run the
kernel in the Triton interpreter with exactly these arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltazip.errors import DeltazipError
from deltazip.packed import codes_per_word

PLUGIN_ID = "deltazip::delta_gemm"
INPUT_NAMES = ("x", "base_out", "qweight", "meta", "scales", "zeros", "sorted_rows", "seg_start", "seg_slot")
EXTRA_ARG_NAMES = ("N", "K", "stride_xm", "stride_om", "stride_qs", "stride_qn", "stride_ms", "stride_mn",
                   "stride_ss", "stride_sn")
# kernel parameter → plugin input it is bound to (the only renamed one: out is the aliased base_out)
KERNEL_PARAM_OF_INPUT = {"base_out": "out_ptr"}
ACTIVATION_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
TARGET_CCS = (80, 90)  # sm_80 (A100) and sm_90a (H100)


class PluginError(DeltazipError):
    """Inputs that break the DeltaGemm plugin's shape or dtype rules."""


@dataclass(frozen=True)
class DeltaGemmShape:
    """The sizes one plugin instance is built for (one linear layer of one rank)."""

    out_features: int  # N
    in_features: int  # K
    bits: int
    group_size: int
    sparse24: bool
    num_slots: int  # S

    @property
    def words_per_row(self) -> int:
        codes = self.in_features // 2 if self.sparse24 else self.in_features
        return -(-codes // codes_per_word(self.bits))

    @property
    def groups_per_row(self) -> int:
        return self.in_features // self.group_size


def weight_shapes(shape: DeltaGemmShape) -> dict[str, tuple[int, ...]]:
    """Shapes of the slot tensors (engine weights or inputs); dense deltas get a 1-element meta stand-in."""
    s, n, k = shape.num_slots, shape.out_features, shape.in_features
    return {"qweight": (s, n, shape.words_per_row), "meta": (s, n, k // 32) if shape.sparse24 else (1,),
            "scales": (s, n, shape.groups_per_row), "zeros": (s, n, shape.groups_per_row)}


def check_inputs(shape: DeltaGemmShape, shapes: dict[str, tuple[int, ...]],
                 dtypes: dict[str, torch.dtype]) -> tuple[tuple[int, ...], torch.dtype]:
    """The plugin's shape/dtype function: validate every input, return the output's (shape, dtype)."""
    missing = [name for name in INPUT_NAMES if name not in shapes or name not in dtypes]
    if missing:
        raise PluginError(f"DeltaGemm plugin inputs missing: {missing}")
    x, base = shapes["x"], shapes["base_out"]
    if len(x) != 2 or x[1] != shape.in_features:
        raise PluginError(f"x must be [M, {shape.in_features}], got {list(x)}")
    if tuple(base) != (x[0], shape.out_features):
        raise PluginError(f"base_out must be [M, N] = [{x[0]}, {shape.out_features}], got {list(base)}")
    if dtypes["x"] not in ACTIVATION_DTYPES or dtypes["base_out"] != dtypes["x"]:
        raise PluginError(f"x and base_out must share one dtype of fp16/bf16/fp32, got {dtypes['x']} and "
                          f"{dtypes['base_out']}")
    for name, want in weight_shapes(shape).items():
        if tuple(shapes[name]) != want:
            raise PluginError(f"{name} must be {list(want)}, got {list(shapes[name])}")
    want_dtypes = {"qweight": torch.int32, "meta": torch.int32, "scales": torch.float16,
                   "zeros": torch.float16, "sorted_rows": torch.int32, "seg_start": torch.int32,
                   "seg_slot": torch.int32}
    for name, want in want_dtypes.items():
        if dtypes[name] != want:
            raise PluginError(f"{name} must be {want}, got {dtypes[name]}")
    rows, starts, slots = shapes["sorted_rows"], shapes["seg_start"], shapes["seg_slot"]
    if len(rows) != 1 or len(slots) != 1 or tuple(starts) != (slots[0] + 1,):
        raise PluginError(f"sorted_rows [R], seg_slot [G] and seg_start [G + 1] expected, got {list(rows)}, "
                          f"{list(slots)}, {list(starts)}")
    return tuple(base), dtypes["base_out"]


def extra_args(shape: DeltaGemmShape) -> list[int]:
    """The scalar kernel arguments after the pointers, in kernel order: build-time constants, since every
    tensor is contiguous and only M (rows) varies at run time."""
    n, k = shape.out_features, shape.in_features
    w, g = shape.words_per_row, shape.groups_per_row
    meta_words = k // 32 if shape.sparse24 else 0  # dense: meta is never read
    return [n, k, k, n, n * w, w, n * meta_words, meta_words, n * g, g]


def plugin_weights(slots) -> dict[str, torch.Tensor]:
    """The slot tensors of a `deltazip.kernels.DeltaSlots` as plugin inputs (dense: 1-element meta)."""
    meta = slots.meta if slots.sparse24 else torch.zeros(1, dtype=torch.int32, device=slots.qweight.device)
    return {"qweight": slots.qweight, "meta": meta, "scales": slots.scales, "zeros": slots.zeros}


def batch_segments(row_slot: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-batch plugin inputs from each row's slot (-1: none): sorted_rows, seg_start, seg_slot (int32).

    A batch without deltas still gets one empty segment, so the launch grid never has a zero dimension.
    """
    from deltazip.kernels.delta_gemm import segments

    sorted_rows, seg_start, seg_slot, _ = segments(row_slot)
    if len(seg_slot) == 0:
        seg_start = torch.zeros(2, dtype=torch.int32, device=row_slot.device)
        seg_slot = torch.zeros(1, dtype=torch.int32, device=row_slot.device)
        sorted_rows = torch.zeros(1, dtype=torch.int32, device=row_slot.device)
    return {"sorted_rows": sorted_rows, "seg_start": seg_start, "seg_slot": seg_slot}


def m_splits_for(max_num_tokens: int, block_m: int, max_m_splits: int) -> int:
    """Programs per segment along M, fixed at engine build (extra programs exit at once)."""
    return max(1, min(-(-max_num_tokens // block_m), max_m_splits))


def launch_grid(num_segments: int, out_features: int, block_n: int, m_splits: int) -> tuple[int, int, int]:
    """(segments, N blocks, M splits): the same grid the runtime's launcher uses."""
    return (num_segments, -(-out_features // block_n), m_splits)


def check_aot_kernel(kernel) -> None:
    """The compiled kernel must match the plugin's calling convention (see the module docstring)."""
    params = [name for name, _ in kernel.signature]
    want = [KERNEL_PARAM_OF_INPUT.get(name, f"{name}_ptr") for name in INPUT_NAMES] + list(EXTRA_ARG_NAMES)
    if params != want:
        raise PluginError(f"kernel {kernel.name} parameters {params} do not match the plugin order {want}")
    if kernel.global_scratch_bytes or kernel.profile_scratch_bytes:
        raise PluginError(f"kernel {kernel.name} needs scratch memory ({kernel.global_scratch_bytes} B "
                          f"global, {kernel.profile_scratch_bytes} B profile); a TensorRT AOT launch "
                          "cannot pass it")
    if f".entry {kernel.name}(" not in kernel.ptx:
        raise PluginError(f"PTX has no entry {kernel.name}")


def plugin_kernels(bits: int, group_size: int, sparse24: bool, dtype: str = "fp16") -> dict[str, object]:
    """AOT kernels for every target arch ('sm_80', 'sm_90a'), each checked against the plugin ABI."""
    import os

    from deltazip.kernels.aot import compile_delta_gemm, compile_in_subprocess

    if os.environ.get("TRITON_INTERPRET", "0") == "1":  # one subprocess (interpreter off) for every arch
        args = [a for cc in TARGET_CCS for a in ("--cc", str(cc))]
        args += ["--bits", str(bits), "--group-size", str(group_size), "--dtype", dtype]
        compiled = compile_in_subprocess(args + ([] if sparse24 else ["--dense"]))
    else:
        compiled = [compile_delta_gemm(cc, bits, group_size, sparse24, dtype) for cc in TARGET_CCS]
    for kernel in compiled:
        check_aot_kernel(kernel)
    return {kernel.target: kernel for kernel in compiled}
