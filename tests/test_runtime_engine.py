"""Engine: greedy tokens equal the merged model's (mixed batches); sampling, stop strings, cancel."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest
import torch
from factories import synthetic_store
from transformers import LlamaForCausalLM

from deltazip.config import RuntimeConfig
from deltazip.format import apply_delta
from deltazip.runtime import Engine, GenerationRequest, RequestError, SamplingParams

CONFIG = RuntimeConfig(device="cpu", kernel="torch", delta_slots=3, max_context=96, kv_budget_tokens=4096)


def hf_greedy(model_dir: Path, prompt_ids: list[int], max_tokens: int, eos: int) -> list[int]:
    """Greedy continuation by transformers (full forward each step: no cache to disagree with)."""
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(max_tokens):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if token == eos:
                break
            ids.append(token)
    return ids[len(prompt_ids):]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, Path]:
    return synthetic_store(tmp_path_factory.mktemp("runtime-engine"))


@pytest.fixture(scope="module")
def engine(store):
    engine = Engine.from_dirs(*store, CONFIG)
    engine.start()
    yield engine
    engine.stop()


def _greedy(prompt: str, delta: str | None, max_tokens: int = 10, **kw) -> GenerationRequest:
    return GenerationRequest(prompt, delta, SamplingParams(max_tokens=max_tokens, **kw))


def test_greedy_matches_merged_models_in_mixed_batches(store, engine, tmp_path):
    base, deltas = store
    jobs = [("hello there", "a"), ("sort: 3 1 2", "b"), ("hello there", None), ("xyz", "c"),
            ("a longer prompt to prefill", "a")]
    pieces = {i: [] for i in range(len(jobs))}
    handles = [engine.submit(_greedy(p, d, 12), on_token=pieces[i].append) for i, (p, d) in enumerate(jobs)]
    results = [h.result(timeout=120) for h in handles]
    tok = engine.tokenizer
    for i, ((prompt, delta), result) in enumerate(zip(jobs, results, strict=True)):
        assert result.error is None and result.finish_reason in ("stop", "length")
        model_dir = base if delta is None else apply_delta(base, deltas / f"{delta}.dz", tmp_path / f"m{i}")
        want = hf_greedy(model_dir, tok(prompt)["input_ids"], 12, tok.eos_token_id)
        assert result.text == tok.decode(want, skip_special_tokens=True), (prompt, delta)
        assert result.completion_tokens == len(want)
        assert "".join(pieces[i]) == result.text  # streamed pieces add up to the result
    assert engine.stats()["peak_decode_deltas"] >= 3  # requests on different deltas shared decode steps


def test_seeded_sampling_is_reproducible(engine):
    params = dict(max_tokens=16, temperature=1.0, top_p=0.9, top_k=40)
    first = engine.generate(_greedy("seeded", "a", seed=7, **params))
    again = engine.submit(_greedy("seeded", "a", seed=7, **params))
    other = engine.submit(_greedy("seeded", "a", seed=8, **params))
    assert again.result(timeout=60).text == first.text
    assert other.result(timeout=60).text != first.text


def test_stop_strings_truncate_and_stream(engine):
    full = engine.generate(_greedy("stop here", None, 20)).text
    assert len(full) >= 6
    stop = full[3:5]
    pieces = []
    result = engine.submit(_greedy("stop here", None, 20, stop=[stop]), on_token=pieces.append).result(60)
    assert result.finish_reason == "stop" and result.text == full[: full.find(stop)]
    assert "".join(pieces) == result.text


def test_decoding_work_per_token_is_constant(engine, monkeypatch):
    """Each new token decodes a short window of ids, never the whole completion again."""
    window_sizes: list[int] = []
    decode = engine.tokenizer.decode

    def counting_decode(token_ids, **kwargs):
        window_sizes.append(len(token_ids))
        return decode(token_ids, **kwargs)

    monkeypatch.setattr(engine.tokenizer, "decode", counting_decode)
    result = engine.generate(_greedy("count the decoding", "b", 60))
    assert result.completion_tokens >= 30, result
    assert len(window_sizes) <= 2 * result.completion_tokens + 2
    assert max(window_sizes) <= 4, window_sizes


def test_cancel_ends_one_request(engine):
    long_request = _greedy("cancel me", "b", 80, temperature=0.0)
    started = threading.Event()
    handle = engine.submit(dataclasses.replace(long_request), on_token=lambda piece: started.set())
    other = engine.submit(_greedy("keep going", "a", 8))
    assert started.wait(60)
    handle.cancel()
    result = handle.result(timeout=60)
    assert result.finish_reason == "cancelled" and result.completion_tokens < 80
    assert other.result(timeout=60).finish_reason in ("stop", "length")


@pytest.mark.parametrize("params", [dict(max_tokens=-1), dict(top_p=0.0), dict(top_p=1.5),
                                    dict(temperature=-0.5), dict(top_k=-2), dict(stop="x")])
def test_bad_parameters_raise(engine, params):
    with pytest.raises(RequestError):
        engine.submit(GenerationRequest("hi", None, SamplingParams(**params)))


def test_bad_requests_fail_alone(engine):
    with pytest.raises(RequestError, match="unknown delta 'nope'"):
        engine.submit(_greedy("hi", "nope"))
    with pytest.raises(RequestError, match="context"):
        engine.submit(_greedy("x" * 200, None))
    corrupt = engine.submit(_greedy("hi", "corrupt"))
    wrong = engine.submit(_greedy("hi", "wrongbase"))
    fine = engine.submit(_greedy("hi", "c"))
    assert corrupt.result(60).finish_reason == "error" and "mismatch" in corrupt.result().error
    assert wrong.result(60).finish_reason == "error" and "another base" in wrong.result().error
    assert fine.result(60).finish_reason in ("stop", "length")
    assert "corrupt" not in engine.pool.host_resident() and "corrupt" not in engine.pool.resident()
    again = engine.generate(_greedy("hi", "c"))  # cached state is intact: same greedy output
    assert again.text == fine.result().text


def test_kv_budget_waits_or_fails(store):
    engine = Engine.from_dirs(*store, dataclasses.replace(CONFIG, kv_budget_tokens=40))
    engine.start()
    try:
        too_big = engine.submit(_greedy("hello", None, 60))
        first, second = (engine.submit(_greedy("hello", d, 25)) for d in ("a", None))  # 31 tokens each
        assert too_big.result(60).finish_reason == "error" and "kv_budget_tokens" in too_big.result().error
        assert first.result(60).finish_reason in ("stop", "length")
        assert second.result(60).finish_reason in ("stop", "length")  # waited for the first to finish
        assert engine.stats()["kv_reserved_tokens"] == 0
    finally:
        engine.stop()


def test_generate_command_streams_and_reports_errors(store):
    from click.testing import CliRunner

    from deltazip.cli import cli

    base, deltas = store
    runner = CliRunner()
    args = ["generate", "--base", str(base), "--deltas", str(deltas), "--device", "cpu", "--prompt", "hi"]
    ok = runner.invoke(cli, [*args, "--delta", "a", "--max-tokens", "5"])
    assert ok.exit_code == 0, ok.output
    assert "length" in ok.output or "stop" in ok.output
    bad = runner.invoke(cli, [*args, "--delta", "nope"])
    assert bad.exit_code == 2 and "error: unknown delta 'nope'" in bad.output


def test_family_deltas_match_merged_models(tiny_family, tiny_deltas, tmp_path):
    """The key check on the real tiny family and its default (2-bit 2:4) deltas, all in one mixed batch."""
    from deltazip.family import load_eval_set

    store = next(iter(tiny_deltas.values())).parent
    engine = Engine.from_dirs(tiny_family.base_dir, store, dataclasses.replace(CONFIG, max_context=256))
    jobs = [(ex["prompt"], task) for task in sorted(tiny_deltas)
            for ex in load_eval_set(tiny_family.eval_path(task))[:2]]
    jobs += [(jobs[0][0], None), (jobs[-1][0], None)]
    for delta in tiny_deltas:  # loaded before start, so every request joins the first batch
        engine.pool.prefetch(delta).result()
    handles = [engine.submit(_greedy(prompt, delta, 24)) for prompt, delta in jobs]
    engine.start()
    try:
        results = [h.result(timeout=300) for h in handles]
    finally:
        engine.stop()
    assert engine.stats()["peak_decode_deltas"] == len(tiny_deltas) + 1  # all deltas + base in one step
    tok = engine.tokenizer
    merged = {d: apply_delta(tiny_family.base_dir, p, tmp_path / d) for d, p in tiny_deltas.items()}
    for (prompt, delta), result in zip(jobs, results, strict=True):
        model_dir = tiny_family.base_dir if delta is None else merged[delta]
        want = hf_greedy(model_dir, tok(prompt)["input_ids"], 24, tok.eos_token_id)
        assert result.text == tok.decode(want, skip_special_tokens=True), (prompt, delta)


def test_sample_next_filters():
    from deltazip.runtime.sampling import new_generator, sample_next

    logits = torch.tensor([0.0, 3.0, 2.9, -1.0, 2.8])
    gen = new_generator(0)
    assert sample_next(logits, SamplingParams(), gen) == 1  # greedy
    top2 = {sample_next(logits, SamplingParams(temperature=5.0, top_k=2), gen) for _ in range(200)}
    assert top2 == {1, 2}
    # top_p: probabilities ~ [.02, .36, .33, .01, .29]; 0.6 keeps the two largest (the crossing one included)
    nucleus = {sample_next(logits, SamplingParams(temperature=1.0, top_p=0.6), gen) for _ in range(200)}
    assert nucleus == {1, 2}
    assert {sample_next(logits, SamplingParams(temperature=1.0), gen) for _ in range(300)} >= {0, 1, 2, 4}


def test_half_precision_engine_runs_mixed_batch(store):
    engine = Engine.from_dirs(*store, dataclasses.replace(CONFIG, dtype="bfloat16"))
    engine.start()
    try:
        handles = [engine.submit(_greedy("half", d, 6)) for d in ("a", "b", None)]
        results = [h.result(timeout=60) for h in handles]
    finally:
        engine.stop()
    assert all(r.error is None and r.completion_tokens > 0 for r in results), results


@pytest.mark.parametrize("field,value,match", [("device", "tpu", "runtime.device"),
                                               ("dtype", "float8", "runtime.dtype"),
                                               ("kernel", "cuda", "runtime.kernel")])
def test_bad_runtime_config_names_the_key(store, field, value, match):
    from deltazip.errors import DeltazipError

    with pytest.raises(DeltazipError, match=match):
        Engine.from_dirs(*store, dataclasses.replace(CONFIG, **{field: value}))


def test_more_deltas_than_slots_from_many_threads(store):
    """3 deltas through 2 slots, from 4 threads: requests wait for a slot; none is evicted in flight."""
    engine = Engine.from_dirs(*store, dataclasses.replace(CONFIG, delta_slots=2))
    engine.start()
    handles, lock = [], threading.Lock()

    def client(i: int) -> None:
        for delta in ("a", "b", "c"):
            handle = engine.submit(_greedy(f"client {i}", delta, 6))
            with lock:
                handles.append((i, delta, handle))

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results = {(i, d): h.result(timeout=120) for i, d, h in handles}
    finally:
        engine.stop()
    assert all(r.error is None for r in results.values()), [r.error for r in results.values()]
    assert engine.stats()["pool"]["evictions"] >= 1
    reference = Engine.from_dirs(*store, CONFIG)  # 3 slots: every delta keeps its own
    reference.start()
    try:
        for (i, delta), result in results.items():
            assert result.text == reference.generate(_greedy(f"client {i}", delta, 6)).text
    finally:
        reference.stop()
