"""GPU acceptance for deltazip's TensorRT path: one command, one JSON verdict, non-zero exit on any mismatch.

    python scripts/gpu_acceptance.py [--work DIR] [--json OUT.json]

Needs one CUDA GPU (H100/H200 class) with TensorRT-LLM 1.2.1 (which brings TensorRT 10.x) and tritonserver
— set up by the one command in docs/tensorrt-llm.md ("Acceptance run"). Budget: under 10 minutes.

Checks (each "pass" / "fail" / "skip" with its figures; the verdict is "pass" only if every check passed):
  kernel       the runtime's Triton delta GEMM on the GPU vs the torch path: bit-exact on integer data
               (fp32 and fp16 tensor-core dots), fp16 / bf16 random data within tolerance
  kernel_speed the delta GEMM (decode shape) vs the fp16 base GEMM of the same layer, and the fraction of
               the device's memory bandwidth (measured copy bandwidth) the delta kernel reaches
  plugin       the DeltaGemm plugin in a one-layer TensorRT network (x → base GEMM → DeltaGemm → y) vs torch;
               y is an ordinary network output: nothing is bound by hand to an input's memory
  engine       the tiny family built by `deltazip build --backend trtllm`; greedy tokens of the engine for
               the base and three deltas in one mixed batch equal the torch runtime's
  triton       that build served by tritonserver and queried over HTTP: same texts as the torch runtime

Exit status: 0 all pass; 1 any fail; 3 a check could not run (missing GPU / TensorRT / TensorRT-LLM /
tritonserver): "incomplete". GPU only — written on a CPU-only machine without TensorRT; it has not run yet.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ["TRITON_INTERPRET"] = "0"  # the kernel must compile for the GPU, not run in the interpreter
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

PROMPT_TASKS = 3  # deltas in the mixed batch
MAX_TOKENS = 24


class Skip(Exception):
    """A check that cannot run here (the message says why)."""


def _cuda():
    import torch

    if not torch.cuda.is_available():
        raise Skip("no CUDA device")
    return torch


def _timed(fn, repeats: int = 100) -> float:
    """Mean microseconds per call, CUDA events around `repeats` calls after a warm-up."""
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats * 1e3


def _slots(num_slots: int, n: int, k: int, bits: int, group: int, exact: bool, seed: int = 0):
    import torch

    from deltazip.kernels import DeltaSlots
    from deltazip.kernels.synthetic import random_packed

    gen = torch.Generator().manual_seed(seed)
    slots = DeltaSlots(num_slots, n, k, bits, group, True, device="cuda")
    for slot in range(num_slots):
        slots.set(slot, random_packed(n, k, bits, group, True, gen, exact=exact).to("cuda"))
    return slots


# -- checks -------------------------------------------------------------------------------------------------

def check_kernel() -> dict:
    torch = _cuda()
    from deltazip.kernels import add_delta_matmul
    from deltazip.kernels.delta_gemm import DOT_FP16, DOT_FP32, triton_add_delta_matmul

    out = {}
    gen = torch.Generator().manual_seed(1)
    row_slot = torch.tensor([1, -1, 0, 1, 2, -1, 0, 0, 3, 1] * 4, dtype=torch.int32, device="cuda")
    m = len(row_slot)
    for bits in (2, 4):
        slots = _slots(4, 512, 1024, bits, 128, exact=True, seed=bits)
        x = torch.randint(-3, 4, (m, 1024), generator=gen).float().cuda()
        base = torch.randint(-3, 4, (m, 512), generator=gen).float().cuda()
        want = add_delta_matmul(base.clone(), x, slots, row_slot, impl="torch")
        for mode, name in ((DOT_FP32, "fp32"), (DOT_FP16, "fp16")):
            got = base.clone()
            triton_add_delta_matmul(got, x, slots, row_slot, dot_mode=mode)
            out[f"exact_{bits}bit_{name}_dot"] = bool(torch.equal(got, want))
    slots = _slots(4, 512, 1024, 2, 128, exact=False, seed=5)
    for dtype, tol in ((torch.float16, 2e-2), (torch.bfloat16, 6e-2)):
        x = torch.randn(m, 1024, generator=gen).to("cuda", dtype)
        base = torch.randn(m, 512, generator=gen).to("cuda", dtype)
        want = add_delta_matmul(base.float().clone(), x.float(), slots, row_slot, impl="torch")
        got = add_delta_matmul(base.clone(), x, slots, row_slot, impl="triton")
        err = ((got.float() - want).abs() / (want.abs() + 1)).max().item()
        out[f"random_{str(dtype).removeprefix('torch.')}_max_rel_err"] = err
        out[f"random_{str(dtype).removeprefix('torch.')}_ok"] = err <= tol
    out["ok"] = all(v for k, v in out.items() if k.startswith("exact") or k.endswith("_ok"))
    return out


def check_kernel_speed() -> dict:
    torch = _cuda()
    from deltazip.kernels import add_delta_matmul

    m, n, k = 16, 4096, 4096  # decode: 16 rows over 4 deltas, a 4096 x 4096 layer, 2-bit 2:4, group 128
    slots = _slots(4, n, k, 2, 128, exact=False)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    base = torch.randn(m, n, device="cuda", dtype=torch.float16)
    weight = torch.randn(n, k, device="cuda", dtype=torch.float16)
    row_slot = torch.arange(m, device="cuda", dtype=torch.int32) % 4
    delta_us = _timed(lambda: add_delta_matmul(base, x, slots, row_slot, impl="triton"))
    gemm_us = _timed(lambda: x @ weight.T)
    delta_bytes = slots.nbytes + x.numel() * 2 + 2 * base.numel() * 2  # every slot read once, out r/w
    buf = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    copy_us = _timed(lambda: buf.clone(), repeats=20)
    copy_gbs = 2 * buf.numel() / copy_us / 1e3  # read + write
    delta_gbs = delta_bytes / delta_us / 1e3
    return {"shape": [m, n, k], "delta_us": delta_us, "base_gemm_us": gemm_us, "ratio": delta_us / gemm_us,
            "delta_bytes": delta_bytes, "delta_GBps": delta_gbs, "copy_GBps": copy_gbs,
            "fraction_of_copy_bandwidth": delta_gbs / copy_gbs, "ok": True}


def check_plugin() -> dict:
    torch = _cuda()
    try:
        # TensorRT v10.14 python bindings; registration wires the QDP definitions (deltazip/plugins/qdp.py)
        import tensorrt as trt

        import deltazip.plugins.registration as registration
    except Exception as err:  # noqa: BLE001 - report why and move on
        raise Skip(f"TensorRT plugin not available: {err}") from None
    from deltazip.kernels import add_delta_matmul
    from deltazip.plugins.delta_gemm_plugin import (
        DeltaGemmShape,
        batch_segments,
        plugin_weights,
        weight_shapes,
    )

    n = k = 1024
    shape = DeltaGemmShape(n, k, 2, 128, True, 4)
    slots = _slots(4, n, k, 2, 128, exact=False, seed=7)
    logger = trt.Logger(trt.Logger.WARNING)  # pyCore.cpp: Logger(severity)
    builder = trt.Builder(logger)  # pyCore.cpp: Builder(logger)
    # STRONGLY_TYPED (pyGraph.cpp NetworkDefinitionCreationFlag): fp16 stays fp16, as in TensorRT-LLM's
    # builder.py Builder.create_network
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    # network.add_input(name, dtype, shape): pyGraph.cpp INetworkDefinition.add_input
    x_t = network.add_input("x", trt.float16, (-1, k))
    w_t = network.add_input("w", trt.float16, (n, k))
    types = {"qweight": trt.int32, "meta": trt.int32, "scales": trt.float16, "zeros": trt.float16}
    weights = {key: network.add_input(key, types[key], dims) for key, dims in weight_shapes(shape).items()}
    segments = {key: network.add_input(key, trt.int32, (-1,))
                for key in ("sorted_rows", "seg_start", "seg_slot")}
    # the base GEMM x·wᵀ (add_matrix_multiply as in TensorRT v10.14 samples/python/aliased_io_plugin/
    # aliased_io_plugin.py, whose aliased plugin output also feeds further layers)
    base = network.add_matrix_multiply(x_t, trt.MatrixOperation.NONE, w_t, trt.MatrixOperation.TRANSPOSE)
    layer = registration.add_delta_gemm(network, x_t, base.get_output(0), weights, segments, shape,
                                        m_splits=4)
    layer.get_output(0).name = "y"
    network.mark_output(layer.get_output(0))  # y: a plain network output; abi_pad stays internal
    config = builder.create_builder_config()
    registration.enable_aliased_io(config)  # ALIASED_PLUGIN_IO_10_03: without it y is never written
    profile = builder.create_optimization_profile()  # IOptimizationProfile.set_shape(name, min, opt, max)
    profile.set_shape("x", (1, k), (64, k), (256, k))
    for name in segments:
        profile.set_shape(name, (1,), (8,), (257,))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)  # None on failure (pyCore.cpp)
    if plan is None:
        return {"ok": False, "error": "build_serialized_network returned None"}
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    context = engine.create_execution_context()

    gen = torch.Generator().manual_seed(8)
    m = 64
    x = torch.randn(m, k, generator=gen).half().cuda()
    w = (torch.randn(n, k, generator=gen) * 0.03).half().cuda()
    row_slot = torch.randint(-1, 4, (m,), generator=gen, dtype=torch.int32).cuda()
    y = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")  # must be written by the engine
    feeds = {"x": x, "w": w, **plugin_weights(slots), **batch_segments(row_slot)}
    for name, tensor in feeds.items():  # IExecutionContext.set_input_shape / set_tensor_address (pyCore.cpp)
        context.set_input_shape(name, tuple(tensor.shape))
        context.set_tensor_address(name, tensor.data_ptr())
    context.set_tensor_address("y", y.data_ptr())  # the output's own buffer, not an input's
    stream = torch.cuda.Stream()
    ok = context.execute_async_v3(stream.cuda_stream)  # common_runtime.py: execute_async_v3(stream_handle)
    stream.synchronize()
    want = add_delta_matmul((x.float() @ w.float().T), x.float(), slots, row_slot, impl="torch")
    err = ((y.float() - want).abs() / (want.abs() + 1)).max().item()
    plugin_us = _timed(lambda: context.execute_async_v3(torch.cuda.current_stream().cuda_stream))
    return {"executed": bool(ok), "y_written": not bool(torch.isnan(y).any()), "max_rel_err": err,
            "network_us": plugin_us, "ok": bool(ok) and not bool(torch.isnan(y).any()) and err <= 3e-2}


def _family_and_build(work: Path, state: dict) -> dict:
    """The tiny family, three compressed deltas, the trtllm build (cached in `state` for the later checks)."""
    if "build" in state:
        return state
    from deltazip.builder.build import build
    from deltazip.compress import compress_model
    from deltazip.config import CompressConfig, RuntimeConfig
    from deltazip.family import create_family

    family = create_family(work / "family", preset="tiny", seed=0)
    deltas = work / "deltas"
    tasks = list(family.tasks[:PROMPT_TASKS])
    for task in tasks:
        if not (deltas / f"{task}.dz" / "manifest.json").is_file():
            compress_model(family.base_dir, family.finetune_dirs[task], deltas / f"{task}.dz",
                           CompressConfig(), name=task, calib=family.calib_path)
    runtime = RuntimeConfig(max_context=128, max_batch_size=8, delta_slots=4, device="cuda")
    started = time.perf_counter()
    manifest = build(family.base_dir, deltas, work / "build", runtime, backend="trtllm")
    state.update(family=family, tasks=tasks, deltas=deltas, runtime=runtime, build=work / "build",
                 manifest=manifest, build_s=time.perf_counter() - started)
    return state


def _requests(state: dict):
    from deltazip.runtime import GenerationRequest, SamplingParams

    family = state["family"]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    prompts = [(None, f"{family.tasks[0]} hello=")] + [(t, f"{t} deltazip=") for t in state["tasks"]]
    return [GenerationRequest(p, d, params) for d, p in prompts]


def _torch_texts(state: dict) -> list[str]:
    if "torch_texts" not in state:
        from deltazip.runtime import Engine

        engine = Engine.from_dirs(state["family"].base_dir, state["deltas"], state["runtime"])
        engine.start()
        try:
            handles = [engine.submit(r) for r in _requests(state)]  # one mixed batch
            state["torch_texts"] = [h.result().text for h in handles]
        finally:
            engine.stop()
    return state["torch_texts"]


def check_engine(work: Path, state: dict) -> dict:
    _cuda()
    if importlib.util.find_spec("tensorrt_llm") is None:
        raise Skip("TensorRT-LLM 1.2.x not installed")
    from deltazip.plugins.trtllm_session import TrtllmDeltaEngine

    _family_and_build(work, state)
    engine = TrtllmDeltaEngine(state["build"] / "trtllm", state["family"].base_dir, state["runtime"])
    engine.start()
    try:
        handles = [engine.submit(r) for r in _requests(state)]  # base + 3 deltas: one mixed batch
        texts = [h.result().text for h in handles]
    finally:
        engine.stop()
    want = _torch_texts(state)
    rows = [{"delta": r.delta or "", "engine": t, "torch": w, "equal": t == w}
            for r, t, w in zip(_requests(state), texts, want, strict=True)]
    return {"build_s": state["build_s"], "rows": rows, "ok": all(r["equal"] for r in rows)}


def check_triton(work: Path, state: dict) -> dict:
    _cuda()
    if importlib.util.find_spec("tensorrt_llm") is None:
        raise Skip("TensorRT-LLM 1.2.x not installed")
    from deltazip.serving.client import generate_http
    from deltazip.serving.server import TritonServer

    _family_and_build(work, state)
    want = _torch_texts(state)
    rows = []
    with TritonServer(state["build"], log_path=work / "tritonserver.log") as server:
        for request, text in zip(_requests(state), want, strict=True):
            got = generate_http(server.http_url, request.prompt, model=request.delta or "", stream=False,
                                max_tokens=MAX_TOKENS, temperature=0.0)
            rows.append({"delta": request.delta or "", "triton": got.text, "torch": text,
                         "equal": got.text == text})
    return {"rows": rows, "ok": all(r["equal"] for r in rows)}


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for module in ("torch", "triton", "tensorrt", "tensorrt_llm"):
        try:
            out[module] = importlib.import_module(module).__version__
        except Exception as err:  # noqa: BLE001 - record why
            out[module] = f"unavailable: {str(err).splitlines()[0][:200]}"
    try:
        import torch

        if torch.cuda.is_available():
            out["device"] = torch.cuda.get_device_name(0)
            out["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    except Exception:  # noqa: BLE001
        pass
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="deltazip GPU acceptance (TensorRT-LLM path)")
    parser.add_argument("--work", type=Path, default=None, help="work directory (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the verdict here")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="deltazip-acceptance-"))
    work.mkdir(parents=True, exist_ok=True)
    state: dict = {}
    checks = {"kernel": check_kernel, "kernel_speed": check_kernel_speed, "plugin": check_plugin,
              "engine": lambda: check_engine(work, state), "triton": lambda: check_triton(work, state)}
    report = {"versions": versions(), "work": str(work), "checks": {}}
    started = time.perf_counter()
    for name, fn in checks.items():
        t0 = time.perf_counter()
        try:
            result = fn()
            status = "pass" if result.pop("ok") else "fail"
        except Skip as why:
            result, status = {"reason": str(why)}, "skip"
        except Exception:  # noqa: BLE001 - every failure is reported, the next check still runs
            result, status = {"error": traceback.format_exc()[-4000:]}, "fail"
        report["checks"][name] = {"status": status, "seconds": round(time.perf_counter() - t0, 2), **result}
    statuses = [c["status"] for c in report["checks"].values()]
    report["verdict"] = "fail" if "fail" in statuses else "incomplete" if "skip" in statuses else "pass"
    report["seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(report, indent=1, default=str)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    sys.exit({"pass": 0, "fail": 1, "incomplete": 3}[report["verdict"]])


if __name__ == "__main__":
    main()
