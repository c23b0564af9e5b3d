"""A short aiperf profile against the OpenAI front (outside client, its own venv) → benchmarks/RESULTS.md.

aiperf pulls numpy 2 (the serving venv pins numpy<2), so it lives in its own venv:

    python3 -m venv .venv-aiperf && .venv-aiperf/bin/pip install aiperf
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/aiperf_profile.py [BUILD_DIR]
        [--aiperf .venv-aiperf/bin/aiperf] [--model upper] [--concurrency 2] [--requests 40]
        [--osl 8] [--no-write]

Starts tritonserver + the front on free loopback ports, runs `aiperf profile --endpoint-type completions
--streaming` with the base's own tokenizer directory, and records aiperf's summary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import command_line, markdown_table, write_section  # noqa: E402

TITLE = "OpenAI front: aiperf profile (completions, streaming, tiny)"
METRICS = [("time_to_first_token", "TTFT ms"), ("inter_token_latency", "ITL ms"),
           ("request_latency", "request latency ms")]


def summary(export: dict) -> tuple[list[str], list[list]]:
    """aiperf's profile_export_aiperf.json → (columns, rows): avg/p50/p90 of latencies, throughputs."""
    records = export.get("records", export)
    rows = []
    for key, label in METRICS:
        m = records.get(key) or {}
        if m:
            rows.append([label, m.get("avg"), m.get("p50"), m.get("p90"), m.get("unit", "")])
    for key, label in (("request_throughput", "requests/s"), ("output_token_throughput", "output tokens/s"),
                       ("request_count", "requests"), ("error_request_count", "errors")):
        m = records.get(key) or {}
        if m:
            rows.append([label, m.get("avg"), "-", "-", m.get("unit", "")])
    return ["metric", "avg", "p50", "p90", "unit"], rows


def task_prompts(build: Path, model: str) -> list[str]:
    """The held-out prompts of the family task named like `model` (the family sits beside the base)."""
    from deltazip.builder.build import load_build
    from deltazip.family import load_eval_set

    family = Path(load_build(build)["inputs"]["base_dir"]).parent
    path = family / "eval" / f"{model}.jsonl"
    if not path.is_file():
        sys.exit(f"error: no eval set {path} for model '{model}' (use a family task's variant)")
    return [e["prompt"] for e in load_eval_set(path)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("build_dir", nargs="?", default=None,
                        help="a `deltazip build` (default: [build].out)")
    parser.add_argument("--aiperf", default=".venv-aiperf/bin/aiperf", help="the aiperf executable")
    parser.add_argument("--model", default="upper")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--osl", type=int, default=8, help="output tokens (max_tokens)")
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if not Path(args.aiperf).is_file():
        sys.exit(f"error: aiperf not found at {args.aiperf} (see this script's docstring for its venv)")

    from deltazip.config import load_config
    from deltazip.serving.openai_api import FrontSettings, OpenAIFront
    from deltazip.serving.server import TritonServer

    config = load_config(None)
    build = Path(args.build_dir) if args.build_dir else config.path(config.build.out)
    with TritonServer(build) as triton, tempfile.TemporaryDirectory(prefix="aiperf-") as workdir:
        settings = FrontSettings.from_build(build, triton.grpc_url)
        with OpenAIFront(settings) as front:
            # prompts of the variant's own task (random synthetic text makes the tiny model stop at once,
            # which aiperf counts as an error); --osl sets max_tokens
            prompts = Path(workdir) / "prompts.jsonl"
            lines = [json.dumps({"text": p}) + "\n" for p in task_prompts(build, args.model)]
            prompts.write_text("".join(lines))
            command = [args.aiperf, "profile", "--model", args.model, "--url", front.url,
                       "--endpoint-type", "completions", "--streaming",
                       "--tokenizer", str(settings.base_dir), "--concurrency", str(args.concurrency),
                       "--request-count", str(args.requests), "--warmup-request-count", "4",
                       "--input-file", str(prompts), "--custom-dataset-type", "single_turn",
                       "--osl", str(args.osl), "--ui-type", "none", "--artifact-dir", workdir]
            # a local tokenizer directory: aiperf's offline mode only looks in the hub cache, so leave it off
            env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
            result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout_s)
            if result.returncode != 0:
                tail = "\n".join((result.stdout + result.stderr).splitlines()[-15:])
                sys.exit(f"error: aiperf failed (exit {result.returncode}):\n{tail}")
        exports = sorted(Path(workdir).rglob("profile_export_aiperf.json"))
        if not exports:
            sys.exit(f"error: aiperf wrote no profile_export_aiperf.json under {workdir}")
        export = json.loads(exports[0].read_text())
        errors = export.get("error_summary") or []
    columns, rows = summary(export)
    table = markdown_table(columns, rows)
    print(table)
    shown = " ".join(Path(c).name if i == 0 else c for i, c in enumerate(command)).replace(workdir, "TMP")
    notes = (f"aiperf (own venv) against `deltazip serve`'s OpenAI front: `{shown}`. "
             f"Tiny family, CPU; {args.requests} requests at concurrency {args.concurrency}, prompts from "
             f"the '{args.model}' eval set. Errors: {json.dumps(errors) if errors else 'none'}.")
    if not args.no_write:
        write_section(TITLE, command_line(), table, notes)


if __name__ == "__main__":
    main()
