"""Helper of perf_analyzer.sh: serve a build (or use --url), run perf_analyzer, parse its CSV → RESULTS.md.

Latency is perf_analyzer's rule for decoupled models: the time to the FIRST response of a request.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import string
import subprocess
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import markdown_table, write_section  # noqa: E402

from deltazip.builder.build import load_build  # noqa: E402
from deltazip.config import load_config  # noqa: E402
from deltazip.serving.server import TritonServer  # noqa: E402

TITLE = "Triton serving: perf_analyzer, gRPC streaming, mixed deltas + base"


def input_data(delta_names: list[str], max_tokens: int, per_variant: int = 4) -> dict:
    """perf_analyzer --input-data: round-robin over every delta and the base, tiny-family style prompts."""
    rows = []
    letters = string.ascii_lowercase
    for i in range(per_variant):
        for variant in ["", *delta_names]:
            task = variant or "reverse"
            word = "".join(letters[(7 * i + 3 * j + len(task)) % 26] for j in range(4 + i % 3))
            rows.append({"text_input": [f"{task} {word}="], "model": [variant], "max_tokens": [max_tokens],
                         "stream": [True]})
    return {"data": rows}


def concurrency_levels(spec: str) -> list[int]:
    """'1:8:3' (start:end:step, like --concurrency-range) or '1,4,8'."""
    if ":" in spec:
        start, end, *step = (int(v) for v in spec.split(":"))
        return list(range(start, end + 1, step[0] if step else 1))
    return [int(v) for v in spec.split(",")]


def run_perf_analyzer(binary: str, url: str, data_path: Path, csv_path: Path, concurrency: int,
                      args) -> list[str]:
    """One bounded run (--request-count works with a single concurrency level only)."""
    command = [binary, "-m", "deltazip_llm", "-u", url, "-i", "grpc", "--streaming",
               "--input-data", str(data_path), "--concurrency-range", str(concurrency),
               "--request-count", str(args.request_count), "-f", str(csv_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout_s)
    if result.returncode != 0 or not csv_path.is_file():
        lines = (result.stderr + result.stdout).splitlines()
        tail = "\n".join(lines[:5] + ["…"] + lines[-8:])
        sys.exit(f"error: perf_analyzer failed (exit {result.returncode}):\n{tail}")
    return command


def table_from_csv(csv_paths: list[Path]) -> str:
    rows = []
    for path in csv_paths:
        with open(path) as f:
            rows += list(csv.DictReader(f))
    ms = lambda row, key: float(row[key]) / 1e3
    return markdown_table(
        ["concurrency", "requests/s", "responses/s", "p50 ms", "p90 ms", "p95 ms", "p99 ms",
         "server queue ms", "server compute ms"],
        [[int(r["Concurrency"]), float(r["Inferences/Second"]), float(r.get("Response Throughput", "nan")),
          ms(r, "p50 latency"), ms(r, "p90 latency"), ms(r, "p95 latency"), ms(r, "p99 latency"),
          ms(r, "Server Queue"), ms(r, "Server Compute Infer")] for r in rows])


def run_genai_perf(binary: str, perf_analyzer: str, url: str, tokenizer: str, max_tokens: int,
                   workdir: Path, variants: list[str]) -> str:
    """Optional: genai-perf 0.0.16 (its own venv) for time to first token and inter-token latency."""
    command = [binary, "profile", "-m", "deltazip_llm", "--backend", "tensorrtllm",
               "--endpoint-type", "kserve", "--streaming", "-u", url, "--tokenizer", tokenizer,
               "--concurrency", "2", "--num-prompts", "20", "--request-count", "40",
               "--synthetic-input-tokens-mean", "8", "--synthetic-input-tokens-stddev", "0",
               "--output-tokens-mean", str(max_tokens), "--artifact-dir", str(workdir / "genai")]
    # genai-perf runs the `perf_analyzer` on PATH: a shim fixes its `model` rows, then runs the 2.51.0 one
    shim_dir = workdir / "shim"
    shim_dir.mkdir()
    shim = shim_dir / "perf_analyzer"
    shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} "
                    f"{shlex.quote(str(Path(__file__).with_name('_genai_pa_shim.py')))} \"$@\"\n")
    shim.chmod(0o755)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PATH=f"{shim_dir}{os.pathsep}{os.environ.get('PATH', '')}",
               DELTAZIP_PA_BINARY=str(Path(perf_analyzer).resolve()),
               DELTAZIP_PA_VARIANTS=json.dumps(variants))
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=workdir, timeout=600)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-15:])
        sys.exit(f"error: genai-perf failed (exit {result.returncode}):\n{tail}")
    found = sorted((workdir / "genai").rglob("*genai_perf.json"))
    if not found:
        sys.exit("error: genai-perf wrote no *genai_perf.json")
    stats = json.loads(found[0].read_text())
    rows = []
    for key, label in (("time_to_first_token", "time to first token"), ("inter_token_latency", "inter-token"),
                       ("request_latency", "request latency")):
        if key in stats:
            s = stats[key]
            per_ms = {"ms": 1.0, "us": 1e3, "ns": 1e6}[s.get("unit", "ms")]  # 0.0.16 writes "ms"
            rows.append([label, s["avg"] / per_ms, s["p50"] / per_ms, s["p99"] / per_ms])
    table = markdown_table(["genai-perf (c=2, base + every delta)", "avg ms", "p50 ms", "p99 ms"], rows)
    throughput = stats.get("output_token_throughput", {}).get("avg")
    note = f"\n\noutput tokens/s: {throughput:.1f}" if throughput else ""
    return f"{table}{note}\n\ngenai-perf command: `{shlex.join(command)}`"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("build_dir", nargs="?", default=None)
    parser.add_argument("--perf-analyzer", required=True)
    parser.add_argument("--concurrency", default="1:4:3", help="levels: start:end:step or a,b,c")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--request-count", type=int, default=64,
                        help="requests measured per concurrency level (bounded; no stability loop)")
    parser.add_argument("--timeout-s", type=int, default=600)
    parser.add_argument("--url", default=None, help="gRPC host:port of a running server (else one starts)")
    parser.add_argument("--genai-perf", default=None, help="path of a genai-perf 0.0.16 binary (own venv)")
    parser.add_argument("--tokenizer", default=None, help="local tokenizer dir for genai-perf (the base dir)")
    parser.add_argument("--no-results", action="store_true", help="print the table, leave RESULTS.md alone")
    args = parser.parse_args()

    config = load_config()
    build_dir = Path(args.build_dir) if args.build_dir else config.path(config.build.out)
    manifest = load_build(build_dir)
    deltas = [d["name"] for d in manifest["deltas"]]
    server = nullcontext() if args.url else TritonServer(build_dir)
    with tempfile.TemporaryDirectory(prefix="deltazip-pa-") as tmp, server as srv:
        url = args.url or srv.grpc_url
        data_path = Path(tmp) / "input.json"
        data_path.write_text(json.dumps(input_data(deltas, args.max_tokens)))
        csv_paths = []
        for level in concurrency_levels(args.concurrency):
            csv_paths.append(Path(tmp) / f"perf-c{level}.csv")
            command = run_perf_analyzer(args.perf_analyzer, url, data_path, csv_paths[-1], level, args)
        table = table_from_csv(csv_paths)
        genai = ""
        if args.genai_perf:
            # genai-perf takes a relative path for a hub repo id: always pass an absolute directory
            tokenizer = str(Path(args.tokenizer or manifest["inputs"]["base_dir"]).resolve())
            genai = run_genai_perf(args.genai_perf, args.perf_analyzer, url, tokenizer, args.max_tokens,
                                   Path(tmp), ["", *deltas])
    print(table)
    if genai:
        print(genai)
    notes = (f"Variants: base + {', '.join(deltas)} (round-robin input data, {args.max_tokens} new tokens, "
             f"stream=true: one response per token chunk). Latency = time to the first response "
             f"(perf_analyzer's rule for decoupled models); responses/s ≈ streamed chunks/s. Torch runtime "
             f"on CPU, 1 model instance, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')}; base "
             f"{manifest['inputs']['base_dir']}. On a shared 2-core machine repeated runs differ up to ~2x; "
             f"compare rows of one run only.\n\n"
             f"perf_analyzer command (last level; one run per level): "
             f"`{shlex.join(['perf_analyzer', *command[1:]])}`")
    if genai:
        notes += "\n\n" + genai
    if not args.no_results:
        given = [a for a in sys.argv[1:] if a != "--perf-analyzer" and a != args.perf_analyzer]
        path = write_section(TITLE, shlex.join(["benchmarks/perf_analyzer.sh", *given]), table, notes)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
