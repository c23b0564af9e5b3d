"""benchmarks/perf_analyzer.sh against a real tritonserver: a short gRPC streaming load over the base and
every delta completes with nonzero throughput and no errors (the README's "verified by perf_analyzer")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "perf_analyzer.sh"


def test_perf_analyzer_short_run(live_server):
    venv = Path(sys.prefix)  # the script runs this venv's perf_analyzer (tritonclient[all], a dev dependency)
    command = ["bash", str(SCRIPT), str(live_server.build_dir), "--url", live_server.triton.grpc_url,
               "--concurrency", "1", "--request-count", "8", "--max-tokens", "4", "--timeout-s", "50",
               "--no-results"]
    results = REPO / "benchmarks" / "RESULTS.md"
    before = results.stat().st_mtime_ns
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, VENV=str(venv)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "error" not in done.stdout.lower(), done.stdout
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| 1 |")]
    assert len(rows) == 1, done.stdout
    concurrency, requests_per_s, responses_per_s = (float(cell) for cell in rows[0][:3])
    assert concurrency == 1 and requests_per_s > 0 and responses_per_s > 0
    assert results.stat().st_mtime_ns == before  # --no-results: RESULTS.md untouched
