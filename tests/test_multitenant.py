"""A seconds-long smoke run of benchmarks/multitenant.py on the tiny family (the full sweep stays out of the
suite): all three systems through real tritonservers on free loopback ports (always torn down), the same
Poisson trace replayed against each, and a spot check that deltazip and the merged models answer alike."""

from __future__ import annotations

import importlib.util
import math
import sys
from argparse import Namespace
from pathlib import Path

import pytest

pytest.importorskip("tritonclient.grpc.aio")


@pytest.fixture(scope="module")
def mt():
    script = Path(__file__).parent.parent / "benchmarks" / "multitenant.py"
    spec = importlib.util.spec_from_file_location("multitenant", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules["multitenant"] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_trace_is_seeded_and_follows_popularity(mt):
    names = [f"d{i:02d}" for i in range(8)]
    a = mt.make_trace(names, 1.0, 20.0, 30.0, seed=0)
    assert a == mt.make_trace(names, 1.0, 20.0, 30.0, seed=0)  # every system sees the same trace
    assert 450 < len(a) < 750  # Poisson, 20 req/s for 30 s
    counts = [sum(r.variant == n for r in a) for n in names]
    assert counts[0] > 2 * counts[-1]  # Zipf 1: rank 1 is 8x rank 8 in expectation
    assert all(8 <= r.max_tokens <= 24 and r.prompt.endswith("=") for r in a)
    assert math.isclose(mt.popularity(names, 0.0).sum(), 1.0) and len(set(mt.popularity(names, 0.0))) == 1


def test_smoke_run_all_systems_through_tritonserver(mt, tiny_family, tiny_deltas, tmp_path):
    v = mt.family_variants(tmp_path / "variants", tiny_family.base_dir, list(tiny_deltas.values()))
    args = Namespace(duration=2.0, drain=20.0, seed=0, slo_s=10.0, max_batch=8, max_context=64,
                     resident_limit_bytes=1 << 30, page_cache="cold")
    spot = [(name, f"{name} {word}=") for name in v.names for word in ("abc", "hello")]
    answers: dict = {}
    rows, budgets = mt.run_matrix(v, [len(v.names)], [1.0], [3.0], args, tmp_path / "work",
                                  log=lambda _: None, spot=spot, answers=answers)
    assert {r["system"] for r in rows} == set(mt.SYSTEMS)
    budget = budgets[len(v.names)]
    assert budget["k"] >= 1 and budget["budget_bytes"] > budget["base_bytes"]
    for row in rows:
        assert row["completed"] == row["offered"] > 0 and row["errors"] == 0, row
        assert row["req_s"] > 0 and row["e2e_p50"] >= row["ttft_p50"] > 0
    swap = next(r for r in rows if r["system"] == "full-swap")
    if budget["k"] < len(v.names):
        assert swap["swap_ins"] > 0 and swap["bytes_moved"] > 0  # k < V: the baseline swaps
    assert next(r for r in rows if r["system"] == "all-resident")["swap_ins"] == 0
    # spot check on real fine-tunes: base + compressed delta and the merged model answer alike
    same = sum(a == b for a, b in zip(answers["deltazip"], answers["full-swap"], strict=True))
    assert answers["full-swap"] == answers["all-resident"]
    assert same >= len(spot) - 1, (answers["deltazip"], answers["full-swap"])
    summary, detail = mt.tables(rows, budgets)
    assert "full-swap" in detail and "req/s at SLO" in summary
