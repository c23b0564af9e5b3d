"""Fast (numpy lookup-table) packing and artifact decoding equal the reference int64 semantics exactly."""

from __future__ import annotations

import pytest
import torch
from factories import random_codes

from deltazip.format import ArtifactError, load_delta, save_delta
from deltazip.packed import PackedLinear, codes_per_word, pack_codes, unpack_codes


def ref_pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The original pack_codes (int64 shifts and a sum), kept here as the reference."""
    vpw = codes_per_word(bits)
    *lead, c = codes.shape
    n_words = -(-c // vpw)
    padded = torch.zeros(*lead, n_words * vpw, dtype=torch.int64)
    padded[..., :c] = codes.to(torch.int64)
    words = (padded.reshape(*lead, n_words, vpw) << (torch.arange(vpw) * bits)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def ref_unpack_codes(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    shifts = torch.arange(codes_per_word(bits)) * bits
    codes = ((words.to(torch.int64) & 0xFFFFFFFF).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*words.shape[:-1], -1)[..., :count]


def ref_dequantize(n, k, bits, group, codes, positions, scales, zeros) -> torch.Tensor:
    """Dense delta straight from codes and positions (no packing involved)."""
    if positions is None:
        cols = torch.arange(k).expand(n, k)
    else:
        cols = torch.arange(k // 2) // 2 * 4 + positions
    g = cols // group
    values = (codes.float() - zeros.float().gather(1, g)) * scales.float().gather(1, g)
    return torch.zeros(n, k).scatter_(1, cols, values)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(5, 37), (3, 4, 96), (7, 1), (2, 160), (0, 16), (4, 0)])
def test_pack_unpack_codes_match_reference(bits, shape):
    codes = torch.randint(0, 1 << bits, shape, generator=torch.Generator().manual_seed(bits))
    words = pack_codes(codes, bits)
    assert words.dtype == torch.int32 and torch.equal(words, ref_pack_codes(codes, bits))
    for dtype in (torch.uint8, torch.int32):
        assert torch.equal(pack_codes(codes.to(dtype), bits), words)
    back = unpack_codes(words, bits, shape[-1])
    assert back.dtype == torch.int64 and torch.equal(back, codes)
    if codes.numel():
        assert torch.equal(back, ref_unpack_codes(words, bits, shape[-1]))


@pytest.mark.parametrize("lossless", ["zstd", "none"])
def test_save_load_dequantize_matches_reference(tmp_path, lossless):
    gen = torch.Generator().manual_seed(0)
    cases, linears = {}, {}
    for bits in (2, 3, 4, 8):
        for sparse in (True, False):
            for n, k, group in ((24, 96, 32), (9, 160, 160), (1, 32, 16)):  # 3-bit rows end mid-word
                name = f"l{bits}.{int(sparse)}.{n}x{k}"
                codes, positions, scales, zeros = random_codes(n, k, bits, sparse, group, gen)
                cases[name] = (n, k, bits, group, codes, positions, scales.half(), zeros.half())
                c = cases[name]
                linears[name] = PackedLinear.from_codes(c[4], c[6], c[7], bits, group, positions=c[5],
                                                        in_features=k)
    fingerprint = "sha256:" + "0" * 64
    loaded = load_delta(save_delta(tmp_path / "x.dz", "x", fingerprint, linears, {}, lossless=lossless))
    for name, (n, k, bits, group, codes, positions, scales, zeros) in cases.items():
        got = loaded.linears[name]
        want_q = ref_pack_codes(codes, bits)
        assert torch.equal(got.qweight, want_q), name
        if positions is not None:
            assert torch.equal(got.meta, ref_pack_codes(positions, 2)), name
        want = ref_dequantize(n, k, bits, group, codes, positions, scales, zeros)
        assert torch.equal(got.dequantize(), want), name


def test_invalid_group_symbol_is_an_artifact_error(tmp_path):
    from deltazip.format.codec import linear_from_streams

    entry = {"name": "t", "shape": [1, 32], "bits": 2, "group_size": 32, "sparse24": True}
    streams = {"groups": bytes([96] + [0] * 7), "scales": bytes(2), "zeros": bytes(2)}
    with pytest.raises(ArtifactError, match="invalid group symbol"):
        linear_from_streams(entry, streams)
    streams["groups"] = bytes(7)
    with pytest.raises(ArtifactError, match="do not fit"):
        linear_from_streams(entry, streams)
    nibbles = {"nibbles": bytes([0x40] * 7 + [0x50]), "scales": bytes(2), "zeros": bytes(2)}  # 0x5: 1, 1
    with pytest.raises(ArtifactError, match="invalid 2:4 positions"):
        linear_from_streams(entry, nibbles)
    nibbles["nibbles"] = bytes([0xE3] * 8)  # positions (2, 3), codes (3, 0): valid
    assert linear_from_streams(entry, nibbles).positions().tolist() == [[2, 3] * 8]
