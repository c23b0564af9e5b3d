"""The OpenAI front's added latency: the same non-streamed request, direct over gRPC vs through the front.

Both clients are what a user would keep open: a persistent tritonclient gRPC stream (requests one after
another on it) and a keep-alive HTTP connection to /v1/completions. The two alternate request by request
(so drift hits both alike); the table reports medians and p90 of each and the median of the per-pair
difference. Target: the front adds ≤ 2 ms median.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/openai_front.py [BUILD_DIR] [--requests 200]
        [--model upper] [--max-tokens 8] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import command_line, markdown_table, write_section  # noqa: E402

TITLE = "OpenAI front: added latency over direct gRPC (tiny, non-streamed)"


class GrpcStream:
    """One persistent gRPC stream; send() waits for the request's final response."""

    def __init__(self, url: str) -> None:
        import tritonclient.grpc as grpcclient

        self.client = grpcclient.InferenceServerClient(url)
        self.responses: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result=None, error=None: self.responses.put((result, error)))

    def send(self, inputs) -> str:
        from deltazip.serving.protocol import MODEL_NAME

        self.client.async_stream_infer(MODEL_NAME, inputs, request_id=uuid.uuid4().hex)
        while True:
            result, error = self.responses.get(timeout=60)
            if error is not None:
                raise RuntimeError(str(error))
            reason = result.as_numpy("finish_reason").reshape(-1)[0]
            if reason:
                return result.as_numpy("text_output").reshape(-1)[0].decode()

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


CHILD = """
import json, sys
from deltazip.serving.openai_api import FrontSettings, OpenAIFront
from deltazip.serving.server import TritonServer
with TritonServer(sys.argv[1]) as triton:
    settings = FrontSettings.from_build(sys.argv[1], triton.grpc_url)
    with OpenAIFront(settings) as front:
        print(json.dumps([triton.grpc_url, front.url, settings.base_id]), flush=True)
        sys.stdin.read()  # until the parent closes our stdin
"""


@contextmanager
def serve_in_child(build: Path):
    """(grpc_url, front_url, base_id) of tritonserver + the front started in a child Python process."""
    import json
    import subprocess

    child = subprocess.Popen([sys.executable, "-c", CHILD, str(build)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        if not line:
            sys.exit("error: the server process exited before it was ready")
        yield tuple(json.loads(line))
    finally:
        child.stdin.close()
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("build_dir", nargs="?", default=None,
                        help="a `deltazip build` (default: [build].out)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--model", default="upper", help="variant name ('' = the base)")
    parser.add_argument("--prompt", default="upper hello=")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()

    import httpx

    from deltazip.config import load_config
    from deltazip.serving.client import grpc_inputs

    config = load_config(None)
    build = Path(args.build_dir) if args.build_dir else config.path(config.build.out)
    # tritonserver + the front run in a child process, as under `deltazip serve`: the front must not share
    # this client's interpreter (its GIL) or the comparison measures the benchmark, not the front
    with serve_in_child(build) as (grpc_url, front_url, base_id):
        stream = GrpcStream(grpc_url)
        http = httpx.Client(base_url=front_url, timeout=60)
        model = args.model or base_id
        inputs = grpc_inputs(args.prompt, args.model, False, {"max_tokens": args.max_tokens})
        body = {"model": model, "prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 0}

        def via_front() -> str:
            response = http.post("/v1/completions", json=body)
            response.raise_for_status()
            return response.json()["choices"][0]["text"]

        def direct() -> str:
            return stream.send(inputs)

        assert direct() == via_front(), "the front and direct gRPC disagree"
        direct_ms, front_ms = [], []
        for i in range(args.warmup + args.requests):
            for fn in ((direct, via_front) if i % 2 else (via_front, direct)):
                started = time.perf_counter()
                fn()
                ms = (time.perf_counter() - started) * 1e3
                if i >= args.warmup:
                    (direct_ms if fn is direct else front_ms).append(ms)
        stream.close()
        http.close()
    diffs = [f - d for f, d in zip(front_ms, direct_ms, strict=True)]
    rows = [["direct gRPC (persistent stream)", statistics.median(direct_ms), pct(direct_ms, 0.9), "-"],
            ["OpenAI front (keep-alive HTTP)", statistics.median(front_ms), pct(front_ms, 0.9),
             statistics.median(diffs)]]
    table = markdown_table(["path", "median ms", "p90 ms", "median added ms (paired)"], rows)
    print(table)
    verdict = "met" if statistics.median(diffs) <= 2.0 else "NOT met"
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    notes = (f"{args.requests} requests each, alternating, after {args.warmup} warm-up pairs; model "
             f"'{model}', prompt {args.prompt!r}, max_tokens {args.max_tokens}, greedy. Target ≤ 2 ms median "
             f"added: {verdict}. Load average during the run (1/5/15 min): {load} — a shared machine: "
             f"every process hop waits for a core, so the figure is an upper bound of the front's cost.")
    print(notes)
    if not args.no_write:
        write_section(TITLE, command_line(), table, notes)


if __name__ == "__main__":
    main()
