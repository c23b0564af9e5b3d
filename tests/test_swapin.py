"""Fast swap-in (issue 10, item 2): the parallel, blake3-checked load decodes exactly what the sequential
reference decode does, for every artifact version the reader accepts (1, 2, 3 with sha256; 4 with blake3)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from factories import random_delta, random_linear

from deltazip.errors import ArtifactError, ChecksumError
from deltazip.format import load_delta, read_manifest, save_delta
from deltazip.format.codec import decode_tensor
from deltazip.format.manifest import file_digest
from deltazip.packed import PackedLinear

FP = "sha256:" + "0" * 64


def reference_decode(path: Path, precision: int | None = None) -> dict[str, object]:
    """Today's decode, one tensor at a time on this thread: safetensors' own reader + the stream codec."""
    from safetensors import safe_open

    manifest = read_manifest(path)
    out = {}
    with safe_open(str(path / "delta.safetensors"), framework="numpy") as f:
        for name, entry in manifest["tensors"].items():
            out[name] = decode_tensor(f.get_tensor(name).tobytes(), entry, name, precision)
    return out


def assert_identical(art, reference: dict[str, object]) -> None:
    assert set(art.linears) | set(art.exact) == set(reference)
    for name, want in reference.items():
        if isinstance(want, PackedLinear):
            got = art.linears[name]
            assert (got.bits, got.group_size, got.sparse24) == (want.bits, want.group_size, want.sparse24)
            for field in ("qweight", "meta", "scales", "zeros"):
                a, b = getattr(got, field), getattr(want, field)
                assert (a is None and b is None) or torch.equal(a, b), (name, field)
        else:
            got = art.exact[name]
            assert got.dtype == want.dtype and torch.equal(got, want), name


def _mixed_delta(seed: int = 0):
    """Every layout the format allows: 2/3/4/8 bits, 2:4 and dense, row and group scales, odd N."""
    linears = {f"l{bits}{'s' if sparse else 'd'}{group}": random_linear(n, 128, bits, sparse, group, seed + i)
               for i, (n, bits, sparse, group) in enumerate(
                   [(40, 2, True, 128), (33, 2, True, 32), (24, 3, True, 64), (17, 4, True, 128),
                    (9, 8, True, 32), (40, 2, False, 128), (7, 3, False, 32), (16, 4, False, 64),
                    (5, 8, False, 128)])}
    gen = torch.Generator().manual_seed(seed)
    exact = {"n32": torch.randn(13, generator=gen), "n64": torch.randn(3, 5, generator=gen).double()}
    return linears, exact


@pytest.mark.parametrize("checksum, lossless, version", [
    ("blake3", "zstd", 4), ("blake3", "raw", 4), ("sha256", "zstd", 2), ("sha256", "raw", 2)])
def test_swap_in_decode_matches_reference(tmp_path, checksum, lossless, version):
    path = save_delta(tmp_path / "m.dz", "m", FP, *_mixed_delta(), lossless=lossless, checksum=checksum)
    manifest = read_manifest(path)
    assert manifest["version"] == version
    digest = "blake3" if version >= 4 else "sha256"
    assert manifest["files"]["delta.safetensors"][digest] == file_digest(path / "delta.safetensors", digest)
    assert_identical(load_delta(path), reference_decode(path))


def test_version_1_and_any_precision_versions_match_reference(tmp_path):
    script = Path(__file__).parent.parent / "benchmarks" / "fuzz_artifacts.py"
    spec = importlib.util.spec_from_file_location("fuzz_artifacts", script)
    fuzz = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fuzz)
    v2 = save_delta(tmp_path / "v2.dz", "v2", FP, *random_delta([("lm_head.weight", (16, 64)),
                                                                   ("model.norm.weight", (64,))]),
                    checksum="sha256")
    v1 = fuzz._as_version_1(v2, tmp_path / "v1.dz")
    assert read_manifest(v1)["version"] == 1
    assert_identical(load_delta(v1), reference_decode(v1))

    from deltazip.compress.anyprec import solve_any_precision
    from deltazip.format.precision import snapped

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 128, generator=gen)
    ap = snapped(solve_any_precision(torch.randn(32, 128, generator=gen) * 0.01, 2 / 300 * x.T @ x,
                                     [2, 3, 4], True, -1, 0.01, 128))
    for checksum, version in (("sha256", 3), ("blake3", 4)):
        path = save_delta(tmp_path / f"ap{version}.dz", "ap", FP, {"x": ap}, {"n": torch.ones(4)},
                          checksum=checksum)
        assert read_manifest(path)["version"] == version
        for precision in (2, 3, 4):
            assert_identical(load_delta(path, precision=precision), reference_decode(path, precision))


def test_fixture_artifacts_match_reference(tiny_deltas):
    """The shared store's real (compressed, cached) artifacts: whatever version they were written at."""
    for path in tiny_deltas.values():
        assert_identical(load_delta(path), reference_decode(path))


@pytest.mark.parametrize("checksum", ["blake3", "sha256"])
def test_corruption_is_a_checksum_error_naming_the_digest(tmp_path, checksum):
    path = save_delta(tmp_path / "c.dz", "c", FP, *_mixed_delta(), checksum=checksum)
    payload = path / "delta.safetensors"
    data = bytearray(payload.read_bytes())
    data[len(data) // 2] ^= 0x10
    payload.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=f"delta.safetensors: {checksum} mismatch"):
        load_delta(path)


def test_version_4_requires_blake3(tmp_path):
    path = save_delta(tmp_path / "d.dz", "d", FP, *_mixed_delta())
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["delta.safetensors"] = {"sha256": "0" * 64,
                                              "bytes": manifest["files"]["delta.safetensors"]["bytes"]}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="files.delta.safetensors.blake3"):
        load_delta(path)
