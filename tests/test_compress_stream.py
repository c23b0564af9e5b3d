"""Bounded-memory compression (compress/stream.py): the streamed and in-place paths against the whole-tensor
ones — bit for bit where only data moves, to float rounding where a GEMM is cut into row chunks."""

from __future__ import annotations

import factories
import pytest
import torch
from safetensors.torch import save_file

from deltazip.compress import compress_model, obs, pipeline, stream
from deltazip.compress.tune import ScaleSet, streamed_delta
from deltazip.config import CompressConfig
from deltazip.format import load_delta
from deltazip.hf import ModelWeights


def _hessian(k: int, dead: int = 3) -> torch.Tensor:
    x = torch.randn(300, k) * torch.rand(k)
    x[:, dead] = 0
    return 2 / 300 * x.T @ x


@pytest.mark.parametrize("k", [640, 1376])
def test_in_place_factors_are_bitwise_the_out_of_place_ones(k):
    torch.manual_seed(k)
    h = _hessian(k)
    order = obs._act_order(h)
    u, factor = obs._sketched_factors(h, order, 0.01)
    owned = h.clone()
    u2, factor2 = obs._sketched_factors_(owned, order, 0.01)
    assert u2.data_ptr() == owned.data_ptr()
    assert torch.equal(u, u2) and torch.equal(factor, factor2)


@pytest.mark.parametrize("n,k,group", [(96, 1024, -1), (3000, 640, -1), (200, 640, 128)])
def test_consuming_solve_is_bitwise_the_plain_one(n, k, group):
    torch.manual_seed(n)
    h, delta = _hessian(k), torch.randn(n, k) * 0.01
    plain = obs.solve_delta(delta.clone(), h.clone(), 2, "2:4", group, 0.01, 128)
    consumed = obs.solve_delta(delta.clone(), h.clone(), 2, "2:4", group, 0.01, 128, consume=True)
    for key in ("qweight", "meta", "scales", "zeros"):
        assert torch.equal(getattr(plain, key), getattr(consumed, key)), key


def test_row_chunked_helpers_match_whole_tensors():
    torch.manual_seed(0)
    h, delta = _hessian(256), torch.randn(2500, 256) * 0.01
    packed = obs.solve_delta(delta, h, 2, "2:4", -1, 0.01, 64)
    base = torch.randn(2500, 256).half()
    assert torch.equal(stream.dequantize(packed, rows=700), packed.dequantize())
    assert torch.equal(stream.compressed_weight(base, packed, rows=700), base.float() + packed.dequantize())
    parts = [stream.packed_rows(packed, slice(r, r + 1000)) for r in range(0, 2500, 1000)]
    assert torch.equal(stream.cat_rows(parts).dequantize(), packed.dequantize())
    t = torch.randn(2500, 256).half()
    assert torch.equal(stream.float_delta(t, base, rows=300), t.float() - base.float())


@pytest.mark.parametrize("chunk", [None, 24])
def test_streamed_delta_matches_autograd_on_the_dense_weight(chunk):
    torch.manual_seed(1)
    h, delta = _hessian(64), torch.randn(40, 64) * 0.01
    packed = {"w": obs.solve_delta(delta, h, 4, "none", 16, 0.01, 32)}
    base, x = torch.randn(40, 64).half(), torch.randn(3, 5, 64, requires_grad=True)
    dense, compact = ScaleSet(packed), ScaleSet(packed, compact=True)
    moved = 0.1 * torch.randn_like(dense.log_mult["w"])
    with torch.no_grad():
        for s in (dense, compact):
            s.log_mult["w"].copy_(moved)
    want = torch.nn.functional.linear(x, base.float() + dense.dense("w"))
    got = streamed_delta(compact, "w", lambda rows: base[rows], chunk)(x)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, [x, dense.log_mult["w"]], g)
    got_grads = torch.autograd.grad(got, [x, compact.log_mult["w"]], g)
    for a, b in zip(want_grads, got_grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_model_weights_reads_row_slices(tmp_path):
    t = {"a": torch.randn(10, 4).half(), "b": torch.randn(3).bfloat16(), "c": torch.zeros(0, 5)}
    save_file(t, str(tmp_path / "model.safetensors"))
    weights = ModelWeights(tmp_path)
    for name, value in t.items():
        assert torch.equal(weights.get(name), value)
    assert torch.equal(weights.get("a", slice(2, 5)), t["a"][2:5])
    assert torch.equal(weights.get("a", slice(8, 20)), t["a"][8:])


def test_streamed_pipeline_matches_the_whole_tensor_one(tmp_path, monkeypatch):
    """Every tensor taken as large (row chunks, streamed weights, in-place solves, streamed tuning): the
    same layouts and nearly the same deltas as the whole-tensor run (only rounding order differs)."""
    root = factories.compress_inputs(tmp_path / "in")
    settings = CompressConfig(n_samples=8, seq_len=32, tune_steps=5)
    args = (root / "base", root / "ft")
    whole = load_delta(compress_model(*args, tmp_path / "whole.dz", settings, calib=root / "calib.jsonl"))
    monkeypatch.setattr(stream, "LARGE_BYTES", 0)
    monkeypatch.setattr(pipeline, "bound_heap", lambda: None)  # process-wide: not inside the test run
    streamed = load_delta(compress_model(*args, tmp_path / "streamed.dz", settings,
                                         calib=root / "calib.jsonl"))
    assert set(streamed.linears) == set(whole.linears)
    for name, packed in whole.linears.items():
        a, b = packed.dequantize(), streamed.linears[name].dequantize()
        assert (a - b).norm() <= 0.05 * a.norm() + 1e-8, name
    for name, value in whole.exact.items():
        assert torch.equal(value, streamed.exact[name]), name
