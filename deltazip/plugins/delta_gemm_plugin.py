"""DeltaGemm TensorRT plugin, the parts that need no TensorRT: I/O layout, shape/dtype rules, launch ABI, PTX.

The plugin computes y = base_out + x·Δ_sᵀ per row (s = the row's delta slot, none: y = base_out) with the
runtime's own Triton kernel (`deltazip.kernels.delta_gemm.delta_gemm_kernel`), compiled ahead of time by
`deltazip.kernels.aot.compile_delta_gemm` to PTX for sm_80 / sm_90a. `qdp.py` wires these rules into
TensorRT's Python plugin API (`tensorrt.plugin`, TensorRT >= 10.9, AOT implementation); `registration.py`
runs it where tensorrt imports.

Launch ABI. TensorRT's AOT launch passes the kernel (input pointers..., extra int32 scalars..., output
pointers...) — the order NVIDIA's own AOT sample writes its Triton kernel for (TensorRT v10.15,
samples/python/quickly_deployable_plugins/oait_kernels.py: "extra scalar args in between input and output
tensors ... compatible with AOT plugin impl"). Triton (3.3+) appends two pointers to every kernel's
parameter list: global scratch and profile scratch. So:

    PTX entry:  x, out,      qweight, ..., seg_slot, M, N, K, strides..., global_scratch, profile_scratch
    TRT launch: x, base_out, qweight, ..., seg_slot, M, N, K, strides..., y,              abi_pad

`out` is the base_out buffer (output 0 `y` aliases it: the kernel adds in place), and the two outputs land
in the two scratch slots, which the kernel never reads when its scratch sizes are 0. Output 1 `abi_pad`
([1] int32, never written) exists only so the launch passes as many pointers as the PTX declares.
`check_aot_kernel` reads the `.entry` parameter list from the PTX text and checks it against this launch,
type by type, and that the scratch parameters are never loaded. GPU only — not verified on this machine: no
TensorRT engine has run this plugin; CPU tests check the layout, the rules, the PTX, and run the kernel in the
Triton interpreter with exactly these arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltazip.errors import DeltazipError
from deltazip.packed import codes_per_word

PLUGIN_ID = "deltazip::delta_gemm"
INPUT_NAMES = ("x", "base_out", "qweight", "meta", "scales", "zeros", "sorted_rows", "seg_start", "seg_slot")
OUTPUT_NAMES = ("y", "abi_pad")  # y aliases base_out; abi_pad fills Triton's second scratch slot (never used)
EXTRA_ARG_NAMES = ("M", "N", "K", "stride_xm", "stride_om", "stride_qs", "stride_qn", "stride_ms",
                   "stride_mn",
                   "stride_ss", "stride_sn")
# kernel parameter → plugin input it is bound to (the only renamed one: out is the aliased base_out)
KERNEL_PARAM_OF_INPUT = {"base_out": "out_ptr"}
ACTIVATION_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# PTX types of one launch argument: device pointers are 64-bit, TensorRT's extra args are SymInt32.
POINTER, INT32 = "u64", "u32"


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


def extra_args(shape: DeltaGemmShape, m):
    """The scalar kernel arguments after the pointers, in kernel order (EXTRA_ARG_NAMES): M, the rows of x
    (a run-time size: an int here, TensorRT's symbolic x.shape_expr[0] in the plugin), then build-time
    constants, since every tensor is contiguous."""
    n, k = shape.out_features, shape.in_features
    w, g = shape.words_per_row, shape.groups_per_row
    meta_words = k // 32 if shape.sparse24 else 0  # dense: meta is never read
    return [m, n, k, k, n, n * w, w, n * meta_words, meta_words, n * g, g]


def launch_args() -> list[tuple[str, str]]:
    """What TensorRT's AOT launch passes, in order: [(name, PTX type)] — inputs, extra args, outputs."""
    return ([(name, POINTER) for name in INPUT_NAMES] + [(name, INT32) for name in EXTRA_ARG_NAMES]
            + [(name, POINTER) for name in OUTPUT_NAMES])


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


def token_row_slots(request_slots: torch.Tensor, tokens_per_request: torch.Tensor) -> torch.Tensor:
    """Per-token slots of a packed (remove_input_padding) batch: request r's slot repeated for its tokens
    (context: its prompt length, generation: 1). These drive every linear except lm_head."""
    return torch.repeat_interleave(request_slots.to(torch.int32), tokens_per_request.to(torch.long))


def engine_segments(request_slots: torch.Tensor, tokens_per_request: torch.Tensor,
                    num_slots: int) -> dict[str, torch.Tensor]:
    """All per-batch delta inputs of a delta engine (names: `trtllm_layers`), from each request's slot
    (-1: base) and its token count in this step.

    Token rows (qkv, dense, fc, gate, proj) get segments over the packed tokens. `lm_head` gets its own:
    TensorRT-LLM gathers the last token of each sequence before lm_head (gather_context_logits off), so
    its x has one row per request and its segments index requests, not tokens. Rows of both are bounded
    in the kernel by M (x's rows), so a wrong segment can never read or write outside x/out.
    `delta_token_slot` (norm and embedding deltas) is each token's slot, `num_slots` (the zero row) for none.
    """
    token_slots = token_row_slots(request_slots, tokens_per_request)
    tokens = batch_segments(token_slots)
    last = batch_segments(request_slots.to(torch.int32))
    table_row = torch.where(token_slots < 0, torch.full_like(token_slots, num_slots), token_slots)
    return {**{f"delta_{k}": v for k, v in tokens.items()}, **{f"delta_lm_{k}": v for k, v in last.items()},
            "delta_token_slot": table_row}


def m_splits_for(max_num_tokens: int, block_m: int, max_m_splits: int) -> int:
    """Programs per segment along M, fixed at engine build (extra programs exit at once)."""
    return max(1, min(-(-max_num_tokens // block_m), max_m_splits))


def launch_grid(num_segments: int, out_features: int, block_n: int, m_splits: int) -> tuple[int, int, int]:
    """(segments, N blocks, M splits): the same grid the runtime's launcher uses."""
    return (num_segments, -(-out_features // block_n), m_splits)


def check_aot_kernel(kernel) -> None:
    """The compiled kernel must match the plugin's calling convention (see the module docstring): the PTX
    `.entry` parameter list, read from the PTX text, has exactly the launch's arguments with the same PTX
    types; the kernel's own names line up with the plugin's inputs and extra args; and the trailing
    parameters the outputs fill (Triton's scratch pointers) are never loaded."""
    from deltazip.kernels.aot import ptx_entry_params, ptx_params_read

    try:
        entry = ptx_entry_params(kernel.ptx, kernel.name)
    except ValueError as err:
        raise PluginError(f"kernel {kernel.name}: {err}") from None
    launch = launch_args()
    if len(entry) != len(launch):
        raise PluginError(f"kernel {kernel.name}: the PTX entry takes {len(entry)} parameters, "
                          "TensorRT's AOT "
                          f"launch passes {len(launch)} ({len(INPUT_NAMES)} inputs + {len(EXTRA_ARG_NAMES)} "
                          f"extra args + {len(OUTPUT_NAMES)} outputs)")
    pairs = enumerate(zip(launch, entry, strict=True))
    wrong = [(i, name, want, got) for i, ((name, want), (got, _)) in pairs
             if want != got]
    if wrong:
        raise PluginError(f"kernel {kernel.name}: PTX parameter types differ from the launch at "
                          + ", ".join(f"#{i} {name} (launch .{want}, PTX .{got})"
                                      for i, name, want, got in wrong))
    params = [name for name, _ in kernel.signature]
    want = [KERNEL_PARAM_OF_INPUT.get(name, f"{name}_ptr") for name in INPUT_NAMES] + list(EXTRA_ARG_NAMES)
    if params != want:
        raise PluginError(f"kernel {kernel.name} parameters {params} do not match the plugin order {want}")
    if kernel.global_scratch_bytes or kernel.profile_scratch_bytes:
        raise PluginError(f"kernel {kernel.name} needs scratch memory ({kernel.global_scratch_bytes} B "
                          f"global, {kernel.profile_scratch_bytes} B profile); a TensorRT AOT launch "
                          "cannot pass it")
    read = ptx_params_read(kernel.ptx, kernel.name)
    filled_by_outputs = [param for _, param in entry[len(launch) - len(OUTPUT_NAMES):]]
    if read & set(filled_by_outputs):
        raise PluginError(f"kernel {kernel.name} reads {sorted(read & set(filled_by_outputs))}, the slots "
                          "TensorRT fills with the output pointers")


def plugin_kernels(bits: int, group_size: int, sparse24: bool, dtype: str = "fp16") -> dict[str, object]:
    """AOT kernels for every shipped PTX target ('sm_80', 'sm_90a'), each checked against the plugin ABI.
    Which one a device runs: `deltazip.kernels.aot.ptx_target(major, minor)`."""
    import os

    from deltazip.kernels.aot import SHIPPED_CCS, compile_delta_gemm, compile_in_subprocess

    if os.environ.get("TRITON_INTERPRET", "0") == "1":  # one subprocess (interpreter off) for every arch
        args = [a for cc in SHIPPED_CCS for a in ("--cc", str(cc))]
        args += ["--bits", str(bits), "--group-size", str(group_size), "--dtype", dtype]
        compiled = compile_in_subprocess(args + ([] if sparse24 else ["--dense"]))
    else:
        compiled = [compile_delta_gemm(cc, bits, group_size, sparse24, dtype) for cc in SHIPPED_CCS]
    for kernel in compiled:
        check_aot_kernel(kernel)
    return {kernel.target: kernel for kernel in compiled}
