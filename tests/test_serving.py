"""A real tritonserver serving deltazip_llm: answers equal in-process generation, concurrency across deltas,
streaming, per-request errors, restart, clean shutdown. One session server on free loopback ports."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from deltazip.builder.build import build
from deltazip.config import RuntimeConfig
from deltazip.family import load_eval_set
from deltazip.serving.client import ClientError, generate_grpc, generate_http, stream_request
from deltazip.serving.server import ServerError, TritonServer, shm_regions, stub_pids

pytestmark = pytest.mark.slow

MAX_TOKENS = 8
RUNTIME = RuntimeConfig(max_context=128, max_batch_size=16, delta_slots=4)


def _examples(family, task: str, n: int) -> list[str]:
    return [e["prompt"] for e in load_eval_set(family.eval_path(task))[:n]]


@pytest.fixture(scope="session")
def build_dir(tiny_family, tiny_deltas, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serving") / "build"
    build(tiny_family.base_dir, next(iter(tiny_deltas.values())).parent, out, RUNTIME)
    return out


@pytest.fixture(scope="session")
def server(build_dir):
    with TritonServer(build_dir) as srv:
        yield srv


@pytest.fixture(scope="session")
def expected(tiny_family, tiny_deltas):
    """(variant, prompt) → GenerationResult from the runtime in-process, same settings as the server."""
    from deltazip.runtime import Engine, GenerationRequest, SamplingParams

    engine = Engine.from_dirs(tiny_family.base_dir, next(iter(tiny_deltas.values())).parent, RUNTIME)
    answers = {}
    try:
        for variant in ["", *sorted(tiny_deltas)]:
            for prompt in _examples(tiny_family, variant or "reverse", 3):
                request = GenerationRequest(prompt, variant or None, SamplingParams(max_tokens=MAX_TOKENS))
                answers[variant, prompt] = engine.generate(request)
    finally:
        engine.stop()
    return answers


def _check(done, want) -> None:
    assert (done.text, done.finish_reason, done.prompt_tokens, done.completion_tokens) == (
        want.text, want.finish_reason, want.prompt_tokens, want.completion_tokens)


def test_answers_equal_direct_generation(server, expected):
    for (variant, prompt), want in expected.items():
        _check(generate_grpc(server.grpc_url, prompt, variant, stream=True, max_tokens=MAX_TOKENS), want)
        _check(generate_grpc(server.grpc_url, prompt, variant, stream=False, max_tokens=MAX_TOKENS), want)
        _check(generate_http(server.http_url, prompt, variant, stream=False, max_tokens=MAX_TOKENS), want)
        _check(generate_http(server.http_url, prompt, variant, stream=True, max_tokens=MAX_TOKENS), want)


def test_concurrent_requests_over_deltas_and_base(server, expected):
    jobs = list(expected.items()) * 2  # 24 requests: 3 deltas + base, mixed protocols
    assert len(jobs) >= 16 and len({v for (v, _), _ in jobs}) >= 4

    def run(i: int):
        (variant, prompt), _ = jobs[i]
        if i % 2:
            return generate_http(server.http_url, prompt, variant, stream=i % 4 == 1, max_tokens=MAX_TOKENS)
        return generate_grpc(server.grpc_url, prompt, variant, stream=i % 4 == 0, max_tokens=MAX_TOKENS)

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(run, range(len(jobs))))
    for (_, want), done in zip(jobs, results, strict=True):
        _check(done, want)


def test_streaming_arrives_incrementally(server, expected):
    (variant, prompt), want = next((k, v) for k, v in expected.items() if v.completion_tokens >= 3)
    arrivals: list[tuple[float, str]] = []
    done = generate_grpc(server.grpc_url, prompt, variant, stream=True, max_tokens=MAX_TOKENS,
                         on_chunk=lambda text: arrivals.append((time.perf_counter(), text)))
    finished_at = time.perf_counter()
    assert len(done.chunks) >= 3 and "".join(done.chunks) == want.text
    assert [text for _, text in arrivals] == done.chunks  # in order, one callback per response
    assert arrivals[0][0] < arrivals[-1][0] < finished_at

    sse = generate_http(server.http_url, prompt, variant, stream=True, max_tokens=MAX_TOKENS)
    assert len(sse.chunks) >= 3 and sse.text == want.text
    whole = generate_grpc(server.grpc_url, prompt, variant, stream=False, max_tokens=MAX_TOKENS)
    assert whole.chunks == [want.text]  # non-streaming: exactly one response


def test_unknown_delta_fails_alone(server, expected):
    good = list(expected.items())[:8]
    with ThreadPoolExecutor(max_workers=len(good) + 2) as pool:
        bad = [pool.submit(generate_grpc, server.grpc_url, "reverse abc=", "no-such-delta", max_tokens=4),
               pool.submit(generate_http, server.http_url, "reverse abc=", "no-such-delta", max_tokens=4)]
        futures = [pool.submit(generate_grpc, server.grpc_url, p, v, max_tokens=MAX_TOKENS)
                   for (v, p), _ in good]
        for future in bad:
            with pytest.raises(ClientError, match="unknown delta 'no-such-delta'"):
                future.result()
        for future, (_, want) in zip(futures, good, strict=True):
            _check(future.result(), want)


def _raw(server, *named_arrays) -> None:
    inputs = []
    for name, datatype, array in named_arrays:
        t = grpcclient.InferInput(name, list(array.shape), datatype)
        t.set_data_from_numpy(array)
        inputs.append(t)
    stream_request(server.grpc_url, inputs, timeout_s=30)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_tokens": -1}, "max_tokens must be in"),
    ({"max_tokens": 10_000}, "max_tokens must be in"),
    ({"top_p": 0.0}, "top_p must be in"),
    ({"temperature": -1.0}, "temperature must be 0 \\(greedy\\) or in"),
    ({"model": "../reverse"}, "invalid delta name"),
    ({"prompt": "reverse " + "a" * 400 + "="}, "context holds"),
])
def test_bad_parameters_get_request_errors(server, kwargs, message):
    prompt = kwargs.pop("prompt", "reverse abc=")
    kwargs = {"model": "reverse", **kwargs}
    for generate, url in ((generate_grpc, server.grpc_url), (generate_http, server.http_url)):
        with pytest.raises(ClientError, match=message):
            generate(url, prompt, **kwargs)


def test_malformed_requests_get_errors_and_server_keeps_serving(server, expected):
    text = np.array([b"reverse abc="], dtype=np.object_)
    with pytest.raises(ClientError, match="text_input"):
        _raw(server, ("model", "BYTES", np.array([b"reverse"], dtype=np.object_)))
    with pytest.raises(ClientError, match="data-type is 'FP32', but model 'deltazip_llm' expects 'INT32'"):
        _raw(server, ("text_input", "BYTES", text), ("max_tokens", "FP32", np.array([4.0], np.float32)))
    with pytest.raises(ClientError, match="text_input"):
        _raw(server, ("text_input", "BYTES", np.array([b"\xff\xfe"], dtype=np.object_)))
    with pytest.raises(ClientError, match="exactly one value|shape"):
        _raw(server, ("text_input", "BYTES", np.array([b"a", b"b"], dtype=np.object_)))
    with pytest.raises(ClientError, match="exclude_input_in_output=false is not supported"):
        _raw(server, ("text_input", "BYTES", text), ("exclude_input_in_output", "BOOL", np.array([False])))
    (variant, prompt), want = next(iter(expected.items()))
    _check(generate_grpc(server.grpc_url, prompt, variant, max_tokens=MAX_TOKENS), want)


def test_port_in_use_is_a_clear_error(build_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServerError, match=f"port {port} on 127.0.0.1 is not available \\(--grpc-port\\)"):
            TritonServer(build_dir, grpc_port=port).start()


def test_server_exiting_early_reports_its_log(build_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(build_dir, broken)
    config = broken / "triton_repo" / "deltazip_llm" / "config.pbtxt"
    config.write_text(config.read_text().replace('backend: "python"', 'backend: "no_such_backend"'))
    with pytest.raises(ServerError, match="exited with code") as info:
        TritonServer(broken, ready_timeout_s=60).start()
    assert "no_such_backend" in str(info.value)


def test_restart_same_answers_corrupt_delta_and_clean_shutdown(tiny_family, tiny_deltas, expected,
                                                              tmp_path):
    """A second server (own store copy) gives the same answers; a delta corrupted fails alone."""
    store = tmp_path / "deltas"
    shutil.copytree(next(iter(tiny_deltas.values())).parent, store)
    out = tmp_path / "build"
    build(tiny_family.base_dir, store, out, RUNTIME)
    server = TritonServer(out)
    with server:
        payloads = [p for p in (store / "upper.dz").iterdir() if p.name != "manifest.json"]
        for payload in payloads:
            payload.write_bytes(b"\x00" * payload.stat().st_size)  # corrupted after the build checked it
        with ThreadPoolExecutor(max_workers=8) as pool:
            corrupt = pool.submit(generate_grpc, server.grpc_url, "upper abc=", "upper", max_tokens=4)
            good = [(pool.submit(generate_grpc, server.grpc_url, p, v, max_tokens=MAX_TOKENS), want)
                    for (v, p), want in expected.items() if v != "upper"]
            with pytest.raises(ClientError, match="(?i)sha256|checksum|corrupt"):
                corrupt.result()
            for future, want in good:
                _check(future.result(), want)
        prefix = server.shm_prefix
        assert shm_regions(prefix) and stub_pids(prefix)  # the check below is not vacuous
    assert server.process.returncode == 0
    assert shm_regions(prefix) == [] and stub_pids(prefix) == []


def test_serve_command_stops_cleanly_on_sigint_and_sigterm(build_dir):
    """`deltazip serve` prints its endpoints; SIGINT and SIGTERM each stop it: exit 0, no leftovers."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        process = subprocess.Popen(
            [sys.executable, "-m", "deltazip.cli", "serve", str(build_dir), "--http-port", "0",
             "--grpc-port", "0", "--metrics-port", "0", "--openai-port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "200"})
        output = []
        for line in process.stdout:
            output.append(line)
            if "press Ctrl-C to stop" in line:
                break
        assert any("gRPC" in line for line in output), "".join(output)
        prefix = f"deltazip_{process.pid}_"
        assert shm_regions(prefix) and stub_pids(prefix)
        process.send_signal(sig)
        rest, _ = process.communicate(timeout=60)
        assert process.returncode == 0, "".join(output) + rest
        assert "stopped" in rest
        assert shm_regions(prefix) == [] and stub_pids(prefix) == []
