"""GPU only — not verified on this machine: the DeltaGemm plugin and the TensorRT-LLM engine on a CUDA device.

Skipped unless CUDA and TensorRT (>= 10.9, tensorrt.plugin) import; the engine test also needs TensorRT-LLM
1.2.x. `scripts/gpu_acceptance.py` runs the same checks end to end on the tiny family, with throughput.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
trt = pytest.importorskip("tensorrt")


def test_runtime_kernel_matches_reference_on_device():
    """The Triton kernel the plugin embeds, on CUDA, vs the torch reference. In a subprocess: this session
    imported the kernel under TRITON_INTERPRET=1 (tests/conftest.py), which would never reach the GPU."""
    script = "import sys; sys.path.insert(0, 'scripts'); import gpu_acceptance as g; print(g.step_kernel())"
    env = dict(os.environ, TRITON_INTERPRET="0")
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "max abs error" in run.stdout


def test_plugin_registers_and_builds_a_network():
    """Registration under real TensorRT; an AOT network with one DeltaGemm builds into an engine."""
    import deltazip.plugins.registration as registration
    from deltazip.plugins.delta_gemm_plugin import DeltaGemmShape, weight_shapes

    shape = DeltaGemmShape(256, 512, 2, 128, True, 4)
    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    network = builder.create_network(0)
    x = network.add_input("x", trt.float16, (-1, 512))
    base = network.add_input("base_out", trt.float16, (-1, 256))
    types = {"qweight": trt.int32, "meta": trt.int32, "scales": trt.float16, "zeros": trt.float16}
    weights = {k: network.add_input(k, types[k], dims) for k, dims in weight_shapes(shape).items()}
    segments = {k: network.add_input(k, trt.int32, (-1,)) for k in ("sorted_rows", "seg_start", "seg_slot")}
    layer = registration.add_delta_gemm(network, x, base, weights, segments, shape, m_splits=4)
    network.mark_output(layer.get_output(0))
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (1, 512), (16, 512), (64, 512))
    profile.set_shape("base_out", (1, 256), (16, 256), (64, 256))
    for name in segments:
        profile.set_shape(name, (1,), (8,), (65,))
    config.add_optimization_profile(profile)
    assert builder.build_serialized_network(network, config) is not None


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_llm") is None, reason="needs TensorRT-LLM 1.2.x")
def test_trtllm_engine_builds_for_the_tiny_family(tiny_family, tiny_deltas, tmp_path):
    from deltazip.builder.trtllm import build_trtllm

    out = build_trtllm(tiny_family.base_dir, list(tiny_deltas.values()), tmp_path / "engine", tp=1)
    assert (out / "engine" / "config.json").is_file()
