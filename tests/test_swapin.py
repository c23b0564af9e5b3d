"""Fast swap-in (issue 10, item 2): the parallel, blake3-checked load decodes exactly what the sequential
reference decode does, for every artifact version the reader accepts (1, 2, 3 with sha256; 4, 5 with blake3),
with the native nibble pass and with its numpy fallback; faults stay one ArtifactError; a host-tier install
overwrites a slot whole."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import random_delta, random_linear

from deltazip.errors import ArtifactError, ChecksumError
from deltazip.format import codec, decode, load_delta, read_manifest, save_delta
from deltazip.format.codec import decode_tensor
from deltazip.format.manifest import file_digest
from deltazip.packed import PackedLinear

FP = "sha256:" + "0" * 64


@pytest.fixture(params=["native", "fallback"])
def decoder(request, monkeypatch) -> str:
    """The swap-in decode with the native nibble pass (skipped where it cannot build) or numpy only."""
    if request.param == "native":
        from deltazip.kernels import native

        if not native.available():
            pytest.skip(f"native code unavailable: {native.error()}")
        assert "nibbles_to_words" in decode.NATIVE
    else:
        monkeypatch.setattr(decode, "NATIVE", {})
    return request.param


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
    ("blake3", "zstd", 4), ("blake3", "raw", 4), ("sha256", "zstd", 2), ("sha256", "raw", 2),
    ("blake3", "zstd", 5)])
def test_swap_in_decode_matches_reference(tmp_path, decoder, checksum, lossless, version):
    path = save_delta(tmp_path / "m.dz", "m", FP, *_mixed_delta(), lossless=lossless, checksum=checksum,
                      compact=version == 5)
    manifest = read_manifest(path)
    assert manifest["version"] == version
    digest = "blake3" if version >= 4 else "sha256"
    assert manifest["files"]["delta.safetensors"][digest] == file_digest(path / "delta.safetensors", digest)
    assert_identical(load_delta(path), reference_decode(path))


def test_version_1_and_any_precision_versions_match_reference(tmp_path, decoder):
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


def test_fixture_artifacts_match_reference(tiny_deltas, decoder):
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


def _nibble_stream(n: int, k: int, seed: int) -> np.ndarray:
    """A valid random 2-bit 2:4 `nibbles` stream of an [n, k] delta."""
    rng = np.random.default_rng(seed)
    positions = np.array([a | b << 2 for a, b in codec.PATTERNS_24], dtype=np.uint8)
    return rng.integers(0, 16, n * k // 4, dtype=np.uint8) | positions[rng.integers(0, 6, n * k // 4)] << 4


@pytest.mark.parametrize("n, k", [(1, 32), (3, 64), (40, 128), (7, 1024)])
def test_native_nibble_pass_matches_numpy(n, k):
    from deltazip.kernels import native

    if not native.available():
        pytest.skip(f"native code unavailable: {native.error()}")
    op = decode.NATIVE["nibbles_to_words"]
    stream = _nibble_stream(n, k, n + k)
    want = codec._nibbles_stream_to_words(stream, n, k)
    holder = np.zeros(stream.size + 1, dtype=np.uint8)  # at an odd address too: the op reads unaligned
    for src in (stream, holder[1:]):
        src[:] = stream
        q, m = torch.empty(n, k // 32, dtype=torch.int32), torch.empty(n, k // 32, dtype=torch.int32)
        assert op(torch.from_numpy(src), q, m) == 1
        assert np.array_equal(q.numpy(), want[0]) and np.array_equal(m.numpy(), want[1])
    for bad in (0b0101, 0b0000, 0b0110, 0b0011):  # positions p0 | p1 << 2 with p0 == p1 or p0 > p1
        broken = stream.copy()
        broken[-1] = (broken[-1] & 15) | bad << 4
        assert op(torch.from_numpy(broken), q, m) == 0
        with pytest.raises(ValueError, match="2:4"):
            codec._nibbles_stream_to_words(broken, n, k)


def test_invalid_positions_are_one_artifact_error(tmp_path, decoder):
    """Without the checksum (verify=False) the decode itself refuses a bad 2:4 group, native or not."""
    linears = {"l": random_linear(8, 64, 2, True, 64, 0)}
    path = save_delta(tmp_path / "b.dz", "b", FP, linears, {}, lossless="raw")
    payload = path / "delta.safetensors"
    data = bytearray(payload.read_bytes())
    nibbles = 8 * 64 // 4
    start = len(data) - sum(s[2] for s in read_manifest(path)["tensors"]["l"]["streams"])
    data[start + nibbles - 1] = (data[start + nibbles - 1] & 15) | 0b0101 << 4  # positions (1, 1)
    payload.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"tensor l: streams do not fit its shape \(invalid 2:4") as err:
        load_delta(path, verify=False)
    assert "\n" not in str(err.value)
    with pytest.raises(ChecksumError, match="blake3 mismatch"):
        load_delta(path)


@pytest.mark.parametrize("size", [300, 200_000])  # one decompress call; a stream reader (large streams)
def test_overlong_or_cut_zstd_stream_is_refused(size):
    """A zstd frame holding more bytes than the manifest says, or cut short, is refused (never cut short or
    padded silently); an exact one fills its target."""
    import zstandard

    data = (np.arange(size) % 251).astype(np.uint8).tobytes()
    stored = zstandard.ZstdCompressor().compress(data)
    with pytest.raises(ArtifactError, match=f"manifest says {size - 100}"):
        decode._inflate(memoryview(stored), "zstd", np.empty(size - 100, dtype=np.uint8), "t.s")
    with pytest.raises(ArtifactError, match="t.s: (cannot decode zstd stream|decoded)"):
        decode._inflate(memoryview(stored[:-6]), "zstd", np.empty(size, dtype=np.uint8), "t.s")
    with pytest.raises(ArtifactError, match="t.s: (cannot decode zstd stream|decoded)"):
        decode._inflate(memoryview(stored + stored), "zstd", np.empty(size, dtype=np.uint8), "t.s")
    out = np.empty(size, dtype=np.uint8)
    decode._inflate(memoryview(stored), "zstd", out, "t.s")
    assert out.tobytes() == data


def test_loads_do_not_share_memory(tmp_path, decoder):
    """Per-thread scratch and per-load blocks: a later load never changes an earlier load's tensors."""
    first = save_delta(tmp_path / "a.dz", "a", FP, *_mixed_delta(0))
    second = save_delta(tmp_path / "b.dz", "b", FP, *_mixed_delta(1))
    a = load_delta(first)
    load_delta(second)
    load_delta(second)
    assert_identical(a, reference_decode(first))


def test_install_overwrites_a_slot_whole():
    """A host-tier install copies each tensor once, no zeroing first: the slot ends up exactly the new delta,
    and a slot moved to another store (other bit width) leaves the old store's copy zeroed."""
    from torch import nn

    from deltazip.runtime.delta_linear import DeltaLinear
    from deltazip.runtime.model import BatchMapping

    layer = DeltaLinear(nn.Linear(128, 40), 2, BatchMapping(), "torch")
    a, b = random_linear(40, 128, 2, True, 128, 1), random_linear(40, 128, 2, True, 128, 2)
    wide = random_linear(40, 128, 4, False, 128, 3)
    layer.set_delta(1, a)
    copies: list = []
    layer.set_delta(1, b, copies=copies)
    assert len(copies) == 4  # qweight, scales, zeros, meta: nothing copied yet
    torch._foreach_copy_([d for d, _ in copies], [s for _, s in copies])
    got = layer.packed_stores[0].packed(1)
    for field in ("qweight", "meta", "scales", "zeros"):
        assert torch.equal(getattr(got, field), getattr(b, field))
    layer.set_delta(1, wide)
    assert layer.store_of_slot[1] == 1
    assert not layer.packed_stores[0].qweight[1].any() and not layer.packed_stores[0].scales[1].any()
