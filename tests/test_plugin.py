"""DeltaGemm plugin, CPU-verifiable parts: I/O rules, launch ABI in the interpreter, PTX, import guards."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import types
import typing

import pytest
import torch

from deltazip.errors import DeltazipError
from deltazip.kernels import DeltaSlots, add_delta_matmul
from deltazip.kernels.synthetic import random_packed
from deltazip.plugins import delta_gemm_plugin
from deltazip.plugins.delta_gemm_plugin import (
    EXTRA_ARG_NAMES,
    INPUT_NAMES,
    OUTPUT_NAMES,
    DeltaGemmShape,
    PluginError,
    batch_segments,
    check_aot_kernel,
    check_inputs,
    engine_segments,
    extra_args,
    launch_grid,
    m_splits_for,
    plugin_kernels,
    plugin_weights,
    weight_shapes,
)


def filled_slots(shape: DeltaGemmShape, seed: int = 0) -> DeltaSlots:
    gen = torch.Generator().manual_seed(seed)
    slots = DeltaSlots(shape.num_slots, shape.out_features, shape.in_features, shape.bits, shape.group_size,
                       shape.sparse24)
    for slot in range(shape.num_slots):
        slots.set(slot, random_packed(shape.out_features, shape.in_features, shape.bits, shape.group_size,
                                      shape.sparse24, gen))
    return slots


def plugin_call(x: torch.Tensor, base_out: torch.Tensor, slots: DeltaSlots, row_slot: torch.Tensor,
                shape: DeltaGemmShape) -> torch.Tensor:
    """Launch the runtime's kernel exactly as the AOT plugin does: plugin input order, extra args, grid."""
    from deltazip.kernels.configs import INTERPRETER
    from deltazip.kernels.delta_gemm import delta_gemm_kernel

    inputs = {"x": x, "base_out": base_out, **plugin_weights(slots), **batch_segments(row_slot)}
    shapes = {name: tuple(t.shape) for name, t in inputs.items()}
    out_shape, out_dtype = check_inputs(shape, shapes, {name: t.dtype for name, t in inputs.items()})
    assert out_shape == tuple(base_out.shape) and out_dtype == base_out.dtype
    m_splits = m_splits_for(x.shape[0], INTERPRETER.block_m, 4)
    grid = launch_grid(len(inputs["seg_slot"]), shape.out_features, INTERPRETER.block_n, m_splits)
    delta_gemm_kernel[grid](
        *(inputs[name] for name in INPUT_NAMES), *extra_args(shape, x.shape[0]),
        BITS=shape.bits, GROUP=shape.group_size, SPARSE24=shape.sparse24, DOT_MODE=0,
        BLOCK_M=INTERPRETER.block_m, BLOCK_N=INTERPRETER.block_n, BLOCK_K=INTERPRETER.block_k)
    return base_out  # the output aliases base_out


@pytest.mark.parametrize(("bits", "group", "sparse"), [(2, 128, True), (4, 32, False)])
def test_plugin_launch_abi_matches_reference_in_interpreter(bits, group, sparse):
    shape = DeltaGemmShape(out_features=96, in_features=128, bits=bits, group_size=group, sparse24=sparse,
                           num_slots=3)
    slots = filled_slots(shape)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 128, generator=gen)
    base = torch.randn(7, 96, generator=gen)
    row_slot = torch.tensor([2, -1, 0, 2, 1, -1, 0], dtype=torch.int32)
    want = add_delta_matmul(base.clone(), x, slots, row_slot, impl="torch")
    got = plugin_call(x, base.clone(), slots, row_slot, shape)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[[1, 5]], base[[1, 5]]), "rows without a delta keep base_out exactly"
    assert not torch.allclose(got, base), "the delta term is not empty"
    # a batch with no deltas: one empty segment, output untouched
    empty = plugin_call(x, base.clone(), slots, torch.full((7,), -1, dtype=torch.int32), shape)
    assert torch.equal(empty, base)


def test_plugin_consumes_a_row_parallel_rank_layout():
    """Rank shards from the converter, run through the plugin ABI, sum to the unsharded delta output."""
    from deltazip.converters.delta import shard_module
    from deltazip.converters.split import ModelShape, row_cols

    gen = torch.Generator().manual_seed(3)
    full = random_packed(64, 256, 2, 256, True, gen)  # one scale group per row, spanning both ranks
    model = ModelShape(64, 256, 1, 4, 2, 16, 100)
    x = torch.randn(5, 256, generator=gen)
    row_slot = torch.zeros(5, dtype=torch.int32)
    total = torch.zeros(5, 64)
    for rank in range(2):
        part = shard_module(full, "row", model, 2, rank, 100, "proj")
        shape = DeltaGemmShape(64, part.in_features, 2, part.group_size, True, 1)
        slots = DeltaSlots(1, 64, part.in_features, 2, part.group_size, True)
        slots.set(0, part)
        total += plugin_call(x[:, slice(*row_cols(256, 2, rank))].contiguous(), torch.zeros(5, 64), slots,
                             row_slot, shape)
    torch.testing.assert_close(total, x @ full.dequantize().T, rtol=1e-5, atol=1e-5)


def test_shape_and_dtype_rules_reject_bad_inputs():
    shape = DeltaGemmShape(96, 128, 4, 32, True, 2)
    good_shapes = {"x": (5, 128), "base_out": (5, 96), **weight_shapes(shape), "sorted_rows": (4,),
                   "seg_start": (3,), "seg_slot": (2,)}
    good_dtypes = {"x": torch.float16, "base_out": torch.float16, "qweight": torch.int32, "meta": torch.int32,
                   "scales": torch.float16, "zeros": torch.float16, "sorted_rows": torch.int32,
                   "seg_start": torch.int32, "seg_slot": torch.int32}
    assert check_inputs(shape, good_shapes, good_dtypes) == ((5, 96), torch.float16)
    assert weight_shapes(shape) == {"qweight": (2, 96, 8), "meta": (2, 96, 4), "scales": (2, 96, 4),
                                    "zeros": (2, 96, 4)}
    bad = [({"x": (5, 64)}, {}, "x must be"), ({"base_out": (5, 95)}, {}, "base_out must be"),
           ({}, {"base_out": torch.float32}, "share one dtype"), ({"meta": (2, 96, 8)}, {}, "meta must be"),
           ({}, {"scales": torch.float32}, "scales must be"), ({"seg_start": (2,)}, {}, "seg_start"),
           ({}, {"x": torch.int8, "base_out": torch.int8}, "share one dtype")]
    for shapes, dtypes, message in bad:
        with pytest.raises(PluginError, match=message):
            check_inputs(shape, good_shapes | shapes, good_dtypes | dtypes)


def test_launch_grid_and_segments():
    assert launch_grid(3, 96, 32, 4) == (3, 3, 4)
    assert m_splits_for(1, 16, 64) == 1 and m_splits_for(2048, 16, 64) == 64 and m_splits_for(40, 16, 64) == 3
    seg = batch_segments(torch.tensor([1, -1, 0, 1], dtype=torch.int32))
    assert seg["sorted_rows"].tolist() == [2, 0, 3]
    assert seg["seg_start"].tolist() == [0, 1, 3] and seg["seg_slot"].tolist() == [0, 1]
    assert all(t.dtype == torch.int32 for t in seg.values())


@pytest.fixture(scope="module")
def aot_kernels():
    return plugin_kernels(bits=2, group_size=128, sparse24=True, dtype="fp16")


def test_aot_ptx_for_sm80_and_sm90a_matches_the_plugin_abi(aot_kernels):
    """The PTX `.entry` parameter list, parsed from the PTX text, equals TensorRT's AOT launch (inputs,
    extra args, outputs) in count and PTX type; the two output slots are Triton's scratch pointers, unread."""
    from deltazip.kernels.aot import ptx_entry_params, ptx_params_read

    assert set(aot_kernels) == {"sm_80", "sm_90a"}
    for target, kernel in aot_kernels.items():
        assert f".target {target}" in kernel.ptx
        assert kernel.mma_instructions, f"{target}: no tensor-core mma in the PTX"
        assert kernel.spill_bytes == 0
        check_aot_kernel(kernel)
        entry = ptx_entry_params(kernel.ptx, kernel.name)
        launch = delta_gemm_plugin.launch_args()
        assert len(launch) == len(INPUT_NAMES) + len(EXTRA_ARG_NAMES) + len(OUTPUT_NAMES) == 22
        assert [t for t, _ in entry] == [t for _, t in launch]
        assert not ptx_params_read(kernel.ptx, kernel.name) & {p for _, p in entry[-2:]}


def test_check_aot_kernel_reads_the_ptx(aot_kernels, monkeypatch):
    """The check fails for each way the ABI broke before: one output (20 launch args vs 21 PTX params),
    a PTX parameter the launch does not pass, a kernel that loads a slot the outputs fill."""
    kernel = aot_kernels["sm_80"]
    with monkeypatch.context() as patch:  # the old plugin: one output only
        patch.setattr(delta_gemm_plugin, "OUTPUT_NAMES", ("y",))
        with pytest.raises(PluginError, match=r"takes 22 parameters, TensorRT's AOT launch passes 21"):
            check_aot_kernel(kernel)
    last = f"{kernel.name}_param_21"
    extra = types.SimpleNamespace(**{**kernel.__dict__, "ptx": kernel.ptx.replace(
        f"{last}\n)", f"{last},\n\t.param .u64 {kernel.name}_param_22\n)")})
    with pytest.raises(PluginError, match="PTX entry takes 23 parameters"):
        check_aot_kernel(extra)
    typed = types.SimpleNamespace(**{**kernel.__dict__, "ptx": kernel.ptx.replace(
        f".param .u32 {kernel.name}_param_9,", f".param .u64 {kernel.name}_param_9,")})
    with pytest.raises(PluginError, match=r"#9 M \(launch .u32, PTX .u64\)"):
        check_aot_kernel(typed)
    body = kernel.ptx.index("{", kernel.ptx.index(f".entry {kernel.name}("))
    reads = types.SimpleNamespace(**{**kernel.__dict__, "ptx": kernel.ptx[:body + 1]
                                     + f"\n\tld.param.u64 \t%rd999, [{last}];" + kernel.ptx[body + 1:]})
    with pytest.raises(PluginError, match="TensorRT fills with the output pointers"):
        check_aot_kernel(reads)
    broken = types.SimpleNamespace(**{**kernel.__dict__, "signature": list(reversed(kernel.signature))})
    with pytest.raises(PluginError, match="do not match the plugin order"):
        check_aot_kernel(broken)


def stand_in_trtp():
    """STAND-IN for tensorrt.plugin / tensorrt, used ONLY to check the definitions' annotations with
    inspect (TensorRT cannot be installed here). Nothing is registered or run through it."""
    class TensorDesc:
        pass

    class SymExprs:
        pass

    class SymIntExprs(SymExprs):
        pass

    class KernelLaunchParams:
        pass

    trtp = types.SimpleNamespace(TensorDesc=TensorDesc, SymExprs=SymExprs, SymIntExprs=SymIntExprs,
                                 KernelLaunchParams=KernelLaunchParams)
    trt = types.SimpleNamespace(float16="f16", bfloat16="bf16", float32="f32", int32="i32")
    return trtp, trt


def test_qdp_definitions_carry_real_annotation_classes():
    """tensorrt.plugin validates with issubclass(param.annotation, TensorDesc) and needs an aot_impl return
    annotation (TensorRT v10.14 tensorrt/plugin/_validate.py): strings (from __future__ annotations) or a
    missing annotation fail at registration. Checked here on the functions the factory builds."""
    from deltazip.plugins.qdp import define_delta_gemm

    trtp, trt = stand_in_trtp()
    defs = define_delta_gemm(trtp, trt, kernel_for=None, register=False)
    attrs = ["out_features", "in_features", "bits", "group_size", "sparse24", "num_slots", "m_splits"]

    desc = inspect.signature(defs.desc)
    assert list(desc.parameters) == [*INPUT_NAMES, *attrs]
    for name, param in desc.parameters.items():
        assert inspect.isclass(param.annotation), f"{name}: annotation {param.annotation!r} is not a class"
        assert param.default is inspect.Parameter.empty
        want = trtp.TensorDesc if name in INPUT_NAMES else int
        assert issubclass(param.annotation, want) and (name in INPUT_NAMES or param.annotation is int)
    assert typing.get_origin(desc.return_annotation) is tuple
    outs = typing.get_args(desc.return_annotation)
    assert len(outs) == len(OUTPUT_NAMES) and all(issubclass(o, trtp.TensorDesc) for o in outs)

    aot = inspect.signature(defs.aot_impl)
    assert list(aot.parameters) == [*INPUT_NAMES, *attrs, "outputs", "tactic"]
    for name in [*INPUT_NAMES, *attrs]:
        assert aot.parameters[name].annotation is desc.parameters[name].annotation, name
    outputs = aot.parameters["outputs"].annotation
    assert typing.get_origin(outputs) is tuple
    assert all(issubclass(o, trtp.TensorDesc) for o in typing.get_args(outputs))
    assert aot.parameters["tactic"].annotation is int
    ret = aot.return_annotation
    assert ret is not inspect.Signature.empty, "aot_impl needs a return annotation"
    assert typing.get_origin(ret) is tuple
    name_t, code_t, launch_t, args_t = typing.get_args(ret)
    for union in (name_t, code_t):
        assert typing.get_origin(union) in (typing.Union, types.UnionType)
        assert set(typing.get_args(union)) == {str, bytes}
    assert launch_t is trtp.KernelLaunchParams and issubclass(args_t, trtp.SymExprs)


def launch_with_segments(x, base_out, slots, shape, seg):
    """The plugin's launch with given segment inputs (as the engine feeds them), in the interpreter."""
    from deltazip.kernels.configs import INTERPRETER
    from deltazip.kernels.delta_gemm import delta_gemm_kernel

    inputs = {"x": x, "base_out": base_out, **plugin_weights(slots), **seg}
    grid = launch_grid(len(seg["seg_slot"]), shape.out_features, INTERPRETER.block_n, 1)
    delta_gemm_kernel[grid](
        *(inputs[name] for name in INPUT_NAMES), *extra_args(shape, x.shape[0]),
        BITS=shape.bits, GROUP=shape.group_size, SPARSE24=shape.sparse24, DOT_MODE=0,
        BLOCK_M=INTERPRETER.block_m, BLOCK_N=INTERPRETER.block_n, BLOCK_K=INTERPRETER.block_k)
    return base_out


def test_engine_segments_drive_token_layers_and_lm_head():
    """One packed batch (3 requests: 3-token context, a generation step, 2-token context): the token
    segments on all 6 token rows and the lm_head segments on the 3 last-token rows each equal the torch path
    with the matching per-row slots; the lm_head launch never touches a row past its 3."""
    shape = DeltaGemmShape(out_features=64, in_features=128, bits=2, group_size=32, sparse24=True,
                           num_slots=2)
    slots = filled_slots(shape, seed=4)
    request_slots = torch.tensor([1, -1, 0], dtype=torch.int32)
    tokens = torch.tensor([3, 1, 2])
    seg = engine_segments(request_slots, tokens, num_slots=2)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 128, generator=gen)
    base = torch.randn(6, 64, generator=gen)
    token_seg = {k.removeprefix("delta_"): v for k, v in seg.items()
                 if not k.startswith(("delta_lm_", "delta_token"))}
    got = launch_with_segments(x, base.clone(), slots, shape, token_seg)
    want = add_delta_matmul(base.clone(), x, slots, torch.tensor([1, 1, 1, -1, 0, 0], dtype=torch.int32),
                            impl="torch")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    last = torch.tensor([2, 3, 5])  # the last token of each request, as gather_last_token_logits picks them
    guard = torch.full((6, 64), 7.0)  # rows 3..5 must stay: lm_head's x has 3 rows
    out = torch.cat([base[last].clone(), guard[3:]])
    lm_seg = {k.removeprefix("delta_lm_"): v for k, v in seg.items() if k.startswith("delta_lm_")}
    got = launch_with_segments(x[last].contiguous(), out[:3], slots, shape, lm_seg)
    want = add_delta_matmul(base[last].clone(), x[last].contiguous(), slots, request_slots, impl="torch")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[3:], guard[3:])


def test_lm_head_gets_last_token_segments():
    """Token linears see every packed token; lm_head sees one row per request (TensorRT-LLM gathers the
    last tokens first), so its segments index requests and never exceed the request count."""
    request_slots = torch.tensor([1, -1, 0], dtype=torch.int32)
    tokens = torch.tensor([3, 1, 2])  # request 0: 3-token context; 1: generation step; 2: 2-token context
    seg = engine_segments(request_slots, tokens, num_slots=4)
    assert seg["delta_sorted_rows"].tolist() == [4, 5, 0, 1, 2]
    assert seg["delta_seg_slot"].tolist() == [0, 1] and seg["delta_seg_start"].tolist() == [0, 2, 5]
    assert seg["delta_lm_sorted_rows"].tolist() == [2, 0]
    assert seg["delta_lm_seg_slot"].tolist() == [0, 1] and seg["delta_lm_seg_start"].tolist() == [0, 1, 2]
    assert int(seg["delta_lm_sorted_rows"].max()) < len(request_slots)
    assert seg["delta_token_slot"].tolist() == [1, 1, 1, 4, 0, 0]


def test_registration_fails_clearly_without_tensorrt():
    try:
        importlib.import_module("tensorrt")
    except ImportError:
        pass
    else:
        pytest.skip("tensorrt is installed: tests/gpu covers registration")
    with pytest.raises(DeltazipError, match=r"needs TensorRT >= 10.9 .* not available here"):
        importlib.import_module("deltazip.plugins.registration")


def test_trtllm_build_stops_at_once_without_tensorrt_llm(tmp_path):
    from deltazip.builder.trtllm import build_trtllm

    if importlib.util.find_spec("tensorrt_llm") is not None:
        pytest.skip("tensorrt_llm is installed: tests/gpu covers the engine build")
    with pytest.raises(DeltazipError, match="needs TensorRT-LLM 1.2.x, which is not available here"):
        build_trtllm(tmp_path / "no-base", [tmp_path / "no.dz"], tmp_path / "out", tp=2)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
