"""The delta artifact: stream packing round trips, checksums, fingerprints, atomic writes, apply_delta."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from factories import random_linear
from safetensors.torch import load_file, save_file

from deltazip.format import (
    ArtifactError,
    ChecksumError,
    FingerprintError,
    apply_delta,
    decompress,
    fingerprint_model,
    load_delta,
    read_manifest,
    save_delta,
)
from deltazip.format.codec import (
    PATTERNS_24,
    linear_from_streams,
    linear_streams,
    pack_byte_codes,
    pack_patterns,
    unpack_patterns,
)
from deltazip.fsutil import atomic_dir
from deltazip.packed import PackedLinear

FP = "sha256:" + "ab" * 32  # a base fingerprint (any 64 hex digits)


def assert_packed_equal(a: PackedLinear, b: PackedLinear) -> None:
    assert (a.out_features, a.in_features, a.bits, a.group_size, a.sparse24) == \
        (b.out_features, b.in_features, b.bits, b.group_size, b.sparse24)
    for key, t in a.tensors().items():
        assert torch.equal(t, b.tensors()[key]), key


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sparse", [True, False])
def test_streams_round_trip_exact(bits, sparse):
    packed = random_linear(24, 96, bits, sparse, group=32, seed=bits)
    streams = {k: v.contiguous().view(torch.uint8).numpy().tobytes()
               for k, v in linear_streams(packed).items()}
    entry = {"shape": [24, 96], "bits": bits, "group_size": 32, "sparse24": sparse}
    assert_packed_equal(linear_from_streams(entry, streams), packed)
    if sparse and bits == 2:  # structural: one byte per group of 4 holds both kept codes and positions
        assert set(streams) == {"nibbles", "scales", "zeros"} and len(streams["nibbles"]) == 24 * 96 // 4
        codes, positions = packed.codes().reshape(-1, 2), packed.positions().reshape(-1, 2)
        symbols = torch.tensor([PATTERNS_24.index(tuple(p)) for p in positions.tolist()])
        groups = (symbols * 16 + codes[:, 0] * 4 + codes[:, 1]).to(torch.uint8)  # the version 1 layout
        v1 = {**streams, "groups": groups.numpy().tobytes()}
        del v1["nibbles"]
        assert_packed_equal(linear_from_streams(entry, v1), packed)
    elif sparse:  # structural: codes of kept values only
        per_byte = 2 if bits == 3 else 8 // bits
        assert len(streams["codes"]) == -(-24 * 48 // per_byte)
    if sparse:  # the other layout (separate codes and base-6 patterns) must decode the same
        split = {"codes": pack_byte_codes(packed.codes(), bits),
                 "patterns": pack_patterns(packed.positions())}
        split = {k: v.numpy().tobytes() for k, v in split.items()}
        split.update({k: v for k, v in streams.items() if k in ("scales", "zeros")})
        assert_packed_equal(linear_from_streams(entry, split), packed)


def test_pattern_symbols_cover_all_six():
    positions = torch.tensor(PATTERNS_24 * 5).reshape(1, -1)  # 30 groups, 2 positions each
    stream = pack_patterns(positions)
    assert stream.numel() == 10 and int(stream.max()) < 216
    assert torch.equal(unpack_patterns(stream, 30).reshape(1, -1), positions)


@pytest.mark.parametrize("lossless", ["zstd", "none"])
def test_save_load_round_trip(tmp_path, lossless):
    linears = {"model.layers.0.mlp.down_proj": random_linear(32, 64, 2, True, 64),
               "lm_head": random_linear(16, 32, 4, False, 32, seed=1)}
    exact = {"model.norm.weight": torch.randn(32),
             "model.layers.0.input_layernorm.weight": torch.randn(32).double()}
    path = save_delta(tmp_path / "x.dz", "x", FP, linears, exact, {"target": "t"}, lossless)
    assert sorted(os.listdir(path)) == ["delta.safetensors", "manifest.json"]
    delta = load_delta(path)
    assert delta.name == "x" and delta.base_fingerprint == FP
    for name, packed in linears.items():
        assert_packed_equal(delta.linears[name], packed)
    for name, t in exact.items():
        assert delta.exact[name].dtype == t.dtype and torch.equal(delta.exact[name], t)
    dense = decompress(delta)
    assert set(dense) == {"model.layers.0.mlp.down_proj.weight", "lm_head.weight", *exact}
    stats = read_manifest(path)["stats"]
    assert stats["num_parameters"] == 32 * 64 + 16 * 32 + 64
    total = sum(f.stat().st_size for f in path.iterdir())
    assert abs(stats["artifact_bytes"] - total) <= 8
    assert stats["ratio"] == pytest.approx(2 * stats["num_parameters"] / stats["artifact_bytes"])


def _small_artifact(tmp_path: Path) -> Path:
    return save_delta(tmp_path / "a.dz", "a", FP, {"lm_head": random_linear(64, 64, 2, True, 64)},
                      {"model.norm.weight": torch.randn(64)})


def test_flipped_byte_is_a_checksum_error_naming_the_file(tmp_path):
    path = _small_artifact(tmp_path)
    payload = path / "delta.safetensors"
    data = bytearray(payload.read_bytes())
    data[len(data) // 2] ^= 0x40
    payload.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="delta.safetensors.*(sha256|blake3)"):
        load_delta(path)


def test_truncated_file_is_an_error(tmp_path):
    path = _small_artifact(tmp_path)
    payload = path / "delta.safetensors"
    payload.write_bytes(payload.read_bytes()[:-100])
    with pytest.raises(ChecksumError, match="delta.safetensors.*truncated"):
        load_delta(path)
    with pytest.raises(ArtifactError):  # even unverified, a short payload never loads silently
        load_delta(path, verify=False)


def test_manifest_rules(tmp_path):
    path = _small_artifact(tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(ArtifactError, match="unsupported version 99"):
        load_delta(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="invalid JSON"):
        load_delta(path)
    with pytest.raises(ArtifactError, match="not a delta artifact"):
        load_delta(tmp_path)


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.dz"
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)), atomic_dir(target) as tmp:
            (tmp / "manifest.json").write_text("{}")
            raise exc
    assert os.listdir(tmp_path) == []
    with atomic_dir(target) as tmp:
        (tmp / "f").write_text("1")
    assert os.listdir(tmp_path) == ["out.dz"]
    with pytest.raises(Exception, match="already exists"), atomic_dir(target):
        pass


def _model_dir(path: Path, seed: int) -> Path:
    gen = torch.Generator().manual_seed(seed)
    path.mkdir()
    tensors = {"model.embed_tokens.weight": torch.randn(16, 32, generator=gen),
               "model.norm.weight": torch.randn(32, generator=gen),
               "lm_head.weight": torch.randn(64, 32, generator=gen).half()}
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "tokenizer.json").write_text("{}")
    return path


def test_fingerprint_and_exact_apply(tmp_path):
    base = _model_dir(tmp_path / "base", 0)
    other = _model_dir(tmp_path / "other", 1)
    assert fingerprint_model(base) == fingerprint_model(base) != fingerprint_model(other)
    target = load_file(str(other / "model.safetensors"))
    base_t = load_file(str(base / "model.safetensors"))
    exact = {k: target[k].double() - base_t[k].double() for k in target}
    path = save_delta(tmp_path / "d.dz", "d", fingerprint_model(base), {}, exact)
    merged = apply_delta(base, path, tmp_path / "merged")
    out = load_file(str(merged / "model.safetensors"))
    for k, t in target.items():
        assert out[k].dtype == t.dtype and torch.equal(out[k].view(torch.uint8), t.view(torch.uint8)), k
    assert (merged / "config.json").is_file() and (merged / "tokenizer.json").is_file()
    with pytest.raises(FingerprintError, match="was made for base"):
        apply_delta(other, path, tmp_path / "wrong")
    assert not (tmp_path / "wrong").exists()


def test_compact_manifest_version5(tmp_path):
    """Version 5 (budgeted artifacts): the tensor table is stored as base64 zstd JSON, loads like version 4,
    is smaller, and is refused when malformed or in an older version."""
    import base64

    from deltazip.format.logscale import log_snapped

    linears = {f"model.layers.{i}.mlp.down_proj": log_snapped(random_linear(32, 64, 2, True, 64, seed=i))
               for i in range(6)}
    exact = {"model.norm.weight": torch.randn(32)}
    plain = save_delta(tmp_path / "p.dz", "p", FP, linears, exact, {"target": "t"})
    compact = save_delta(tmp_path / "c.dz", "c", FP, linears, exact, {"target": "t"}, compact=True)
    raw = json.loads((compact / "manifest.json").read_text())
    assert raw["version"] == 5 and "tensors" not in raw and isinstance(raw["tensors_zstd"], str)
    assert (compact / "manifest.json").stat().st_size < (plain / "manifest.json").stat().st_size
    assert read_manifest(compact)["tensors"].keys() == read_manifest(plain)["tensors"].keys()
    delta = load_delta(compact)
    for name, packed in linears.items():
        assert_packed_equal(delta.linears[name], packed)
    assert read_manifest(plain)["version"] == 4  # the default stays version 4
    stats = read_manifest(compact)["stats"]
    assert abs(stats["artifact_bytes"] - sum(f.stat().st_size for f in compact.iterdir())) <= 8

    def broken(edit, match):
        m = dict(raw)
        edit(m)
        (compact / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(ArtifactError, match=match):
            read_manifest(compact)

    broken(lambda m: m.update(version=4), "needs version 5")
    broken(lambda m: m.update(tensors={}), "exclusive")
    broken(lambda m: m.update(tensors_zstd="not base64!"), "cannot be decoded")
    broken(lambda m: m.update(tensors_zstd=base64.b64encode(b"junk").decode()), "cannot be decoded")
    bomb = __import__("zstandard").ZstdCompressor().compress(b"[" * 40 + b"]" * 40)
    broken(lambda m: m.update(tensors_zstd=base64.b64encode(bomb).decode()), "nested")


def test_log_scales_version5(tmp_path):
    """Version 5 log scales: symmetric-grid linears store scale0 + uint8 lscales (no zeros); the writer's
    snapped scales load back bit for bit; other zeros keep fp16 scales and zeros."""
    from deltazip.format.logscale import log_snapped

    sym = random_linear(48, 64, 2, False, 32, seed=3)
    sym = sym.__class__(**{**sym.__dict__, "zeros": torch.full_like(sym.zeros, 2.0)})
    other = random_linear(16, 32, 4, True, 32, seed=4)
    other = other.__class__(**{**other.__dict__, "zeros": torch.full_like(other.zeros, 7.5)})
    snapped = {"a": log_snapped(sym), "b": log_snapped(other)}
    assert torch.equal(snapped["b"].scales, other.scales)  # not the symmetric grid: left alone
    ratio = snapped["a"].scales.float() / sym.scales.float()
    assert float((ratio - 1).abs().max()) < 0.012  # half a 2.2% step
    path = save_delta(tmp_path / "s.dz", "s", FP, snapped, {}, compact=True)
    entries = read_manifest(path)["tensors"]
    assert [s[0] for s in entries["a"]["streams"]] == ["codes", "scale0", "lscales"]
    assert "zeros" in [s[0] for s in entries["b"]["streams"]]
    delta = load_delta(path)
    for name, packed in snapped.items():
        assert_packed_equal(delta.linears[name], packed)
    plain = save_delta(tmp_path / "p.dz", "p", FP, snapped, {})
    assert [s[0] for s in read_manifest(plain)["tensors"]["a"]["streams"]] == ["codes", "scales", "zeros"]
