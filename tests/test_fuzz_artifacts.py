"""A seeded slice of the artifact fuzzer (benchmarks/fuzz_artifacts.py; `make fuzz` runs 10,000 cases).

Real artifacts mutated every way the fuzzer knows (payload bytes, safetensors header, manifest fields of
every type and range, nesting, raw text, missing / extra / replaced / symlinked files), each loaded under a
per-case timeout: only clean errors and identical (or consistently re-signed) loads are allowed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "fuzz_artifacts.py"


def _fuzzer():
    spec = importlib.util.spec_from_file_location("fuzz_artifacts", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fuzz_slice_has_no_crash_hang_or_undetected_change():
    fuzz = _fuzzer()
    result = fuzz.run(seed=11, cases=600, timeout_s=10.0, inspect_every=8)
    counts = result["counts"]
    assert sum(counts.values()) == 600
    assert [b for b in result["bad"]] == [], result["bad"][:5]
    assert counts["clean error"] > 300 and counts["identical load"] > 10  # the mutations do reach both sides
