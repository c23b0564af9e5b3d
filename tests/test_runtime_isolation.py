"""Engine fault isolation: a request that fails while sampling or in its own forward pass fails alone (the
rest of its batch answer exactly as when run one by one); parameters that cannot be sampled are refused at
submit; a prompt too long to ever fit is refused before any tokenizer work; errors leak no store path."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from factories import synthetic_store

import deltazip.runtime.engine as engine_module
from deltazip.config import RuntimeConfig
from deltazip.runtime import Engine, GenerationRequest, RequestError, SamplingParams

CONFIG = RuntimeConfig(device="cpu", kernel="torch", delta_slots=3, max_context=96, kv_budget_tokens=4096)
JOBS = [("hello there", "a"), ("sort: 3 1 2", "b"), ("hello there", None), ("xyz", "c"), ("more text", "a")]
POISON_SEED = 666  # marks the request the tests make fail


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, Path]:
    return synthetic_store(tmp_path_factory.mktemp("runtime-isolation"))


@pytest.fixture(scope="module")
def engine(store):
    engine = Engine.from_dirs(*store, CONFIG)
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def sequential(engine) -> list[tuple[str, str]]:
    """Each job's greedy (text, finish_reason) when it runs alone."""
    out = []
    for prompt, delta in JOBS:
        result = engine.generate(_greedy(prompt, delta))
        assert result.error is None
        out.append((result.text, result.finish_reason))
    return out


def _greedy(prompt: str, delta: str | None) -> GenerationRequest:
    return GenerationRequest(prompt, delta, SamplingParams(max_tokens=12))


def _poisoned() -> GenerationRequest:
    return GenerationRequest("hello there", "b", SamplingParams(max_tokens=12, temperature=1.0,
                                                                seed=POISON_SEED))


def _run_mixed(engine) -> tuple[list, list]:
    """Submit the good jobs with poisoned requests between them, all at once; (good results, bad results)."""
    good, bad = [], []
    for i, (prompt, delta) in enumerate(JOBS):
        good.append(engine.submit(_greedy(prompt, delta)))
        if i % 2 == 0:
            bad.append(engine.submit(_poisoned()))
    return [h.result(timeout=120) for h in good], [h.result(timeout=120) for h in bad]


def test_sampling_failure_fails_only_its_request(engine, sequential, monkeypatch):
    real = engine_module.sample_next

    def sample_next(logits, params, generator):
        if params.seed == POISON_SEED:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real(logits, params, generator)

    monkeypatch.setattr(engine_module, "sample_next", sample_next)
    good, bad = _run_mixed(engine)
    assert [(r.text, r.finish_reason) for r in good] == sequential
    assert all(r.finish_reason == "error" and "sampling failed" in r.error for r in bad)
    assert engine.stats()["peak_decode_batch"] >= 3  # they did share a batch


def test_forward_failure_of_one_row_fails_only_its_request(engine, sequential, monkeypatch):
    model = engine.model
    real_forward = type(model).forward
    poisoned_caches: set[int] = set()
    real_admit = engine._admit

    def admit():
        admitted = real_admit()
        poisoned_caches.update(id(s.cache) for s in admitted if s.request.params.seed == POISON_SEED)
        return admitted

    def forward(self, tokens, segments, row_slot=None):
        if any(id(seg.cache) in poisoned_caches for seg in segments):
            raise RuntimeError("injected fault in one row")
        return real_forward(self, tokens, segments, row_slot)

    monkeypatch.setattr(engine, "_admit", admit)
    monkeypatch.setattr(type(model), "forward", forward)
    good, bad = _run_mixed(engine)
    assert [(r.text, r.finish_reason) for r in good] == sequential
    assert all(r.finish_reason == "error" and "injected fault" in r.error for r in bad)


@pytest.mark.parametrize("params", [dict(temperature=1e-40), dict(temperature=1e-3), dict(temperature=1e6),
                                    dict(seed=-1), dict(seed=2**64), dict(top_k=True)])
def test_unsamplable_parameters_are_refused_at_submit(engine, params):
    with pytest.raises(RequestError):
        engine.submit(GenerationRequest("hello", None, SamplingParams(max_tokens=4, **params)))


def test_temperature_at_the_bounds_samples(engine):
    for temperature in (1e-2, 100.0):
        result = engine.generate(GenerationRequest("hello", "a", SamplingParams(
            max_tokens=4, temperature=temperature, seed=1)))
        assert result.error is None


def test_huge_prompt_is_refused_before_tokenizing(engine, monkeypatch):
    calls = []
    real = engine._encoder.__class__.__call__
    monkeypatch.setattr(engine._encoder.__class__, "__call__",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    started = time.perf_counter()
    with pytest.raises(RequestError, match="context holds"):
        engine.submit(GenerationRequest("x" * 10_000_000, None, SamplingParams(max_tokens=4)))
    assert time.perf_counter() - started < 1.0 and not calls
    # a prompt just under the byte bound is tokenized and checked in tokens as before
    with pytest.raises(RequestError, match="context holds"):
        engine.submit(GenerationRequest("x" * (CONFIG.max_context + 5), None, SamplingParams(max_tokens=4)))
    assert calls
    assert engine.max_prompt_bytes >= CONFIG.max_context


def test_unknown_delta_error_names_neither_store_nor_other_deltas(engine, store):
    with pytest.raises(RequestError) as info:
        engine.submit(GenerationRequest("hello", "nope", SamplingParams(max_tokens=4)))
    message = str(info.value)
    assert "unknown delta 'nope'" in message
    assert str(store[1]) not in message and "'a'" not in message and ", b" not in message
    with pytest.raises(RequestError) as info:
        engine.submit(GenerationRequest("hello", "n" * 1_000_000, SamplingParams(max_tokens=4)))
    assert len(str(info.value)) < 300


def test_load_error_hides_the_store_path(engine, store):
    result = engine.generate(GenerationRequest("hello", "corrupt", SamplingParams(max_tokens=4)))
    assert result.finish_reason == "error" and result.error
    assert str(store[1]) not in result.error and str(Path(store[1]).resolve()) not in result.error
