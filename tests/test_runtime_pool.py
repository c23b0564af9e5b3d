"""DeltaPool: disk → host → slot, LRU and pinning, one load per name under concurrency, bad artifacts."""

from __future__ import annotations

import threading
from pathlib import Path

import factories
import pytest
import torch

from deltazip.format import ChecksumError, FingerprintError, fingerprint_model
from deltazip.runtime.delta_linear import clear_model_delta, enable_deltas, set_model_delta
from deltazip.runtime.model import load_llama
from deltazip.runtime.pool import DeltaPool, RequestError


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory) -> tuple[Path, Path]:
    return factories.synthetic_store(tmp_path_factory.mktemp("runtime-pool"))


def make_pool(base: Path, store: Path, num_slots: int = 2, host_cache_bytes: int = 1 << 30):
    model = load_llama(base)
    enable_deltas(model, num_slots, "torch")
    pool = DeltaPool(store, fingerprint_model(base), num_slots, host_cache_bytes,
                     install=lambda slot, art: set_model_delta(model, slot, art.linears, art.exact),
                     uninstall=lambda slot: clear_model_delta(model, slot))
    return model, pool


def test_names_and_validation(synthetic_store):
    _, pool = make_pool(*synthetic_store)
    assert pool.names() == ["a", "b", "c", "corrupt", "wrongbase"]
    pool.check_name("a")
    for bad in ("nope", "../a", "a/b", ".hidden", ""):
        with pytest.raises(RequestError):
            pool.check_name(bad)


def test_lru_eviction_pinning_and_counters(synthetic_store):
    model, pool = make_pool(*synthetic_store, num_slots=2)
    slot_a = pool.acquire("a")
    slot_b = pool.acquire("b")
    assert {slot_a, slot_b} == {0, 1}
    assert pool.acquire("c") is None  # both slots pinned by in-flight uses: c must wait
    pool.release("b")
    assert pool.acquire("a") == slot_a  # hit; a now has 2 pins
    slot_c = pool.acquire("c")  # evicts b (the only unpinned one), never a
    assert slot_c == slot_b and pool.resident() == {"a": slot_a, "c": slot_c}
    stats = pool.stats()
    assert (stats["hits"], stats["misses"], stats["evictions"], stats["disk_loads"]) == (1, 3, 1, 3)
    assert stats["disk_load_s"] > 0 and stats["slot_load_s"] > 0
    # the slot holds exactly the artifact's packed delta
    art = pool.prefetch("c").result()
    q_proj = model.delta_modules["model.layers.0.self_attn.q_proj"]
    stored = q_proj.packed_stores[q_proj.store_of_slot[slot_c]].packed(slot_c)
    want = art.linears["model.layers.0.self_attn.q_proj"].dequantize()
    torch.testing.assert_close(stored.dequantize(), want)
    assert not pool.evict("a")  # pinned: an unload must wait
    pool.release("a")
    pool.release("a")
    assert pool.pinned("a") == 0
    assert pool.evict("a") and "a" not in pool.resident() and "a" not in pool.host_resident()
    assert not any(model.delta_modules["model.norm"].has_delta[slot_a:slot_a + 1])  # slot emptied
    pool.close()


def test_concurrent_misses_share_one_load(synthetic_store):
    _, pool = make_pool(*synthetic_store)
    results, barrier = [], threading.Barrier(6)

    def worker():
        barrier.wait()
        results.append(pool.prefetch("b").result())

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6 and all(r is results[0] for r in results)
    assert pool.stats()["disk_loads"] == 1
    pool.acquire("b")
    assert pool.stats()["host_hits"] == 1
    pool.close()


def test_host_tier_is_bounded(synthetic_store):
    from deltazip.runtime.pool import artifact_nbytes

    _, pool = make_pool(*synthetic_store, host_cache_bytes=1)
    probe = pool.prefetch("a").result()
    nbytes = artifact_nbytes(probe)
    _, pool = make_pool(*synthetic_store, host_cache_bytes=int(nbytes * 1.5))
    pool.prefetch("a").result()
    pool.prefetch("c").result()  # a and c are both 2-bit: same size; only one fits
    assert pool.host_resident() == ["c"]
    assert pool.stats()["host_evictions"] == 1 and pool.stats()["host_bytes"] <= nbytes * 1.5
    pool.close()


def test_bad_artifacts_fail_alone(synthetic_store):
    model, pool = make_pool(*synthetic_store)
    with pytest.raises(ChecksumError):
        pool.acquire("corrupt")
    with pytest.raises(FingerprintError, match="another base"):
        pool.acquire("wrongbase")
    assert pool.resident() == {} and pool.host_resident() == []
    assert pool.stats()["load_errors"] == 2
    assert pool.acquire("a") is not None  # the pool keeps serving


def test_install_validates_before_copy(synthetic_store):
    base, _ = synthetic_store
    model, _ = make_pool(*synthetic_store)
    linears, exact = factories.store_delta(base, seed=3)
    set_model_delta(model, 0, linears, exact)
    before = model.delta_modules["model.norm"].weight_delta_by_slot.clone()
    exact["model.layers.9.input_layernorm.weight"] = torch.zeros(64)
    with pytest.raises(Exception, match="does not have"):
        set_model_delta(model, 1, linears, exact)
    torch.testing.assert_close(model.delta_modules["model.norm"].weight_delta_by_slot, before)
