"""GPU only — not verified on this machine: the delta GEMM on CUDA, the DeltaGemm plugin in TensorRT, the
TensorRT-LLM engine. Each test skips on its own missing prerequisite (CUDA; TensorRT; TensorRT-LLM 1.2.x),
so a machine with CUDA but no TensorRT still runs the kernel test. The checks are the acceptance script's
(scripts/gpu_acceptance.py), run in a subprocess because this session imported the kernel under
TRITON_INTERPRET=1 (tests/conftest.py), which would never reach the GPU; each test asserts on the figures.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
needs_tensorrt = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None,
                                    reason="needs TensorRT >= 10.9")
needs_trtllm = pytest.mark.skipif(importlib.util.find_spec("tensorrt_llm") is None,
                                  reason="needs TensorRT-LLM 1.2.x")


def acceptance_check(call: str, timeout: int = 900) -> dict:
    """Run `gpu_acceptance.<call>` in a fresh interpreter (Triton compiled for the GPU); its JSON result."""
    script = ("import json, sys; sys.path.insert(0, 'scripts'); import gpu_acceptance as g; "
              f"print(json.dumps(g.{call}, default=str))")
    env = dict(os.environ, TRITON_INTERPRET="0")
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_kernel_on_device_matches_the_torch_path():
    result = acceptance_check("check_kernel()")
    exact = {k: v for k, v in result.items() if k.startswith("exact")}
    assert exact and all(exact.values()), exact
    assert result["random_float16_ok"] and result["random_bfloat16_ok"], result
    assert result["ok"]


@needs_tensorrt
def test_plugin_in_a_tensorrt_network_matches_torch():
    result = acceptance_check("check_plugin()")
    assert result["executed"] and result["y_written"], result
    assert result["max_rel_err"] <= 3e-2, result
    assert result["ok"]


@needs_trtllm
def test_engine_greedy_tokens_equal_the_torch_runtime(tmp_path):
    call = f"check_engine(__import__('pathlib').Path({str(tmp_path)!r}), {{}})"
    result = acceptance_check(call, timeout=1800)
    assert len(result["rows"]) == 4  # the base and three deltas in one batch
    assert all(row["equal"] for row in result["rows"]), result["rows"]
    build = tmp_path / "build"
    for rel in ("build.json", "triton_repo/deltazip_llm/config.pbtxt", "trtllm/engine/rank0.engine",
                "trtllm/engine/config.json", "trtllm/trtllm_build.json"):
        assert (build / rel).is_file(), rel
    record = json.loads((build / "trtllm" / "trtllm_build.json").read_text())
    assert record["use_fused_mlp"] is False and record["tensorrt_llm"].startswith("1.2.")
