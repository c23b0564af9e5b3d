"""Any-precision deltas: nested solver, bitplane format, install at a stored precision, kernels, policy."""

from __future__ import annotations

import json

import pytest
import torch
from factories import compress_inputs

from deltazip.compress import compress_model
from deltazip.compress.anyprec import solve_any_precision
from deltazip.compress.obs import solve_delta
from deltazip.config import CompressConfig
from deltazip.errors import ArtifactError, DeltazipError
from deltazip.format import load_delta, read_manifest, save_delta
from deltazip.format.precision import (
    AnyPrecisionLinear,
    midrise_zero,
    precision_sizes,
    snapped,
    stored_precisions,
)
from deltazip.runtime.precision import PrecisionPolicy

FP = "sha256:" + "0" * 64


def _problem(n=64, k=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(600, k, generator=gen) * torch.rand(k, generator=gen) * 2
    return torch.randn(n, k, generator=gen) * 0.01, 2 / 600 * x.T @ x


def _rel(delta, hessian, approx):
    diff = approx - delta
    return float(((diff @ hessian) * diff).sum() / ((delta @ hessian) * delta).sum())


@pytest.mark.parametrize("sparse24", [True, False])
def test_codes_are_nested_and_each_view_is_a_valid_delta(sparse24):
    delta, hessian = _problem()
    ap = solve_any_precision(delta, hessian, [2, 3, 4], sparse24, -1, 0.01, 128)
    ap.check_nested()
    assert ap.precisions == [2, 3, 4]
    errors = []
    for bits, view in ap.views.items():
        assert view.bits == bits and view.sparse24 == sparse24
        assert torch.all(view.zeros.float() == midrise_zero(bits))
        dense = view.dequantize()
        if sparse24:
            assert int((dense.reshape(dense.shape[0], -1, 4) != 0).sum(-1).max()) <= 2
        errors.append(_rel(delta, hessian, dense))
    assert errors[0] > errors[1] > errors[2]  # each plane refines
    stored = snapped(ap)  # narrower scales as the artifact stores them: within one 1.1% ratio step
    for bits in (2, 3):
        torch.testing.assert_close(stored.views[bits].scales.float(), ap.views[bits].scales.float(),
                                   rtol=6e-3, atol=0)


def test_views_are_close_to_dedicated_solves():
    delta, hessian = _problem()
    ap = solve_any_precision(delta, hessian, [2, 3, 4], True, -1, 0.01, 128)
    for bits in (2, 3, 4):
        dedicated = _rel(delta, hessian, solve_delta(delta, hessian, bits, "2:4", -1, 0.01, 128).dequantize())
        # the shared 2:4 mask dominates the error; nesting costs at most a little at 3 and 4 bits
        assert _rel(delta, hessian, ap.views[bits].dequantize()) < 1.15 * dedicated, bits


def _artifact(tmp_path, sparse24=True):
    delta, hessian = _problem()
    ap = snapped(solve_any_precision(delta, hessian, [2, 3, 4], sparse24, -1, 0.01, 128))
    dense = snapped(solve_any_precision(delta[:32], hessian, [2, 3, 4], False, -1, 0.01, 128))
    path = save_delta(tmp_path / "ap.dz", "ap", FP, {"x": ap, "y": dense}, {"n": torch.ones(4)})
    return path, {"x": ap, "y": dense}


def test_bitplane_artifact_round_trips_at_every_precision(tmp_path):
    path, linears = _artifact(tmp_path)
    manifest = read_manifest(path)
    assert manifest["version"] == 4  # blake3 checksums (checksum="sha256" writes version 3)
    entry = manifest["tensors"]["x"]
    assert entry["precisions"] == [2, 3, 4] and entry["bits"] == 4
    names = [s[0] for s in entry["streams"]]
    assert names == ["patterns", "plane0", "plane1", "plane2", "plane3", "scales", "ratio2", "ratio3"]
    assert stored_precisions(manifest) == [2, 3, 4]
    sizes = precision_sizes(manifest)
    assert sizes[2] < sizes[3] < sizes[4]
    for bits in (2, 3, 4, None):
        art = load_delta(path, precision=bits)
        for name, ap in linears.items():
            view = art.linears[name]
            assert view.bits == (bits or 4)
            assert torch.equal(view.dequantize(), ap.views[bits or 4].dequantize())
    torch.testing.assert_close(load_delta(path).exact["n"], torch.ones(4))


def test_unstored_precision_is_a_clear_error(tmp_path):
    path, _ = _artifact(tmp_path)
    with pytest.raises(ArtifactError, match="stored precisions: 2-bit, 3-bit, 4-bit"):
        load_delta(path, precision=8)
    delta, hessian = _problem()
    plain = save_delta(tmp_path / "plain.dz", "plain", FP,
                       {"x": solve_delta(delta, hessian, 2, "2:4", -1, 0.01, 128)}, {})
    assert read_manifest(plain)["version"] == 4  # blake3 (checksum="sha256" keeps version 2 for old readers)
    assert load_delta(plain, precision=2).linears["x"].bits == 2
    with pytest.raises(ArtifactError, match="stored precisions: 2-bit"):
        load_delta(plain, precision=4)


@pytest.mark.parametrize("precisions", [[2, 4], [3, 4, 5], [], [2, 3]])
def test_schema_rejects_bad_precisions(tmp_path, precisions):
    path, _ = _artifact(tmp_path)
    manifest_path = path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["tensors"]["x"]["precisions"] = precisions
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError):
        load_delta(path, verify=False)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_every_view_is_served_by_the_torch_kernel(tmp_path, bits):
    from deltazip.kernels import DeltaSlots, add_delta_matmul

    path, linears = _artifact(tmp_path)
    view = load_delta(path, precision=bits).linears["x"]
    slots = DeltaSlots(2, view.out_features, view.in_features, 4, view.in_features, True, "cpu")
    slots.set(1, view)
    x = torch.randn(5, view.in_features)
    out = torch.zeros(5, view.out_features)
    add_delta_matmul(out, x, slots, torch.tensor([1, -1, 1, 1, -1], dtype=torch.int32), impl="torch")
    expect = x @ linears["x"].views[bits].dequantize().T
    expect[[1, 4]] = 0
    torch.testing.assert_close(out, expect, atol=1e-4, rtol=1e-4)


def test_precision_policy():
    stored = [2, 3, 4]
    assert PrecisionPolicy("max").choose("a", stored, 0.0, {}) == 4
    assert PrecisionPolicy("max").choose("a", [2], 0.0, {}) is None
    assert PrecisionPolicy("fixed", bits=3).choose("a", stored, 0.0, {}) == 3
    assert PrecisionPolicy("fixed", bits=8).choose("a", stored, 0.0, {}) == 4
    assert PrecisionPolicy("pressure", pressure=0.5).choose("a", stored, 0.6, {}) == 2
    assert PrecisionPolicy("pressure", pressure=0.5).choose("a", stored, 0.4, {}) == 4
    popular = PrecisionPolicy("popularity", hot=1)
    assert popular.choose("a", stored, 0.0, {"a": 9, "b": 1}) == 4
    assert popular.choose("b", stored, 0.0, {"a": 9, "b": 1}) == 2
    with pytest.raises(ValueError):
        PrecisionPolicy("sometimes")


def test_pool_installs_at_the_policy_precision(tmp_path):
    from deltazip.runtime.pool import DeltaPool

    store = tmp_path / "store"
    store.mkdir()
    path, _ = _artifact(store)
    path.rename(store / "ap.dz")
    installed = {}
    pool = DeltaPool(store, FP, 2, 1 << 30, install=lambda slot, art: installed.update({slot: art}),
                     uninstall=lambda slot: installed.pop(slot, None),
                     precision_policy=PrecisionPolicy("fixed", bits=3))
    try:
        slot = pool.acquire("ap")
        assert installed[slot].linears["x"].bits == 3
        assert pool.stats()["per_variant"]["ap"]["precision_bits"] == 3
    finally:
        pool.close()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return compress_inputs(tmp_path_factory.mktemp("synthetic-ap"))


def test_compress_any_precision_end_to_end(synthetic, tmp_path):
    settings = CompressConfig(bits=4, any_precision=True, n_samples=8, seq_len=32, tune_steps=5)
    out = compress_model(synthetic / "base", synthetic / "ft", tmp_path / "ap.dz", settings,
                         calib=synthetic / "calib.jsonl")
    manifest = read_manifest(out)
    assert stored_precisions(manifest) == [2, 3, 4]
    from safetensors.torch import load_file

    base = load_file(str(synthetic / "base/model.safetensors"))
    ft = load_file(str(synthetic / "ft/model.safetensors"))
    name = "model.layers.1.mlp.down_proj"
    true = ft[f"{name}.weight"] - base[f"{name}.weight"]
    errors = []
    for bits in (2, 3, 4):
        view = load_delta(out, precision=bits).linears[name]
        assert view.bits == bits
        errors.append(float((view.dequantize() - true).norm() / true.norm()))
    assert errors[0] < 0.95 and errors[2] <= errors[0]
    tops = load_delta(out).linears
    lows = load_delta(out, precision=2).linears
    for key in tops:  # the 2-bit codes are the top bits of the 4-bit codes in every tensor
        AnyPrecisionLinear({2: lows[key], 4: tops[key]}).check_nested()


def test_any_precision_bad_settings(synthetic, tmp_path):
    for kw in ({"bits": 2}, {"bits": 4, "sparsity": "0.5"}, {"bits": 4, "target_ratio": 8.0}):
        settings = CompressConfig(any_precision=True, n_samples=4, seq_len=32, **kw)
        with pytest.raises(DeltazipError, match="any-precision"):
            compress_model(synthetic / "base", synthetic / "ft", tmp_path / "x.dz", settings,
                           calib=synthetic / "calib.jsonl")


def test_precision_is_a_per_variant_metric():
    from deltazip.serving.metrics import ServingMetrics

    values: dict = {}

    class Family:
        COUNTER, GAUGE = "counter", "gauge"

        def __init__(self, name, description, kind):
            self.name = name

        def Metric(self, labels):  # noqa: N802 - the Python backend's spelling
            family = self

            class Metric:
                def set(self, value):
                    values[family.name, labels.get("variant")] = value

                def increment(self, value):
                    key = (family.name, labels.get("variant"))
                    values[key] = values.get(key, 0) + value

            return Metric()

    class PbUtils:
        MetricFamily = Family

    metrics = ServingMetrics(PbUtils)
    pool = {"per_variant": {"ap": {"swap_ins": 1, "precision_bits": 3}}}
    metrics.refresh({"pool": pool}, {"ap": {"device": 10, "host": 0}}, {}, ["ap"])
    assert values["deltazip_variant_precision_bits", "ap"] == 3.0
