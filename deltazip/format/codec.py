"""The stream codec (docs/FORMAT.md, "Tensors" and "Blob layout"): tensors ↔ streams ↔ one blob per tensor.

Linears become byte streams (2-bit 2:4 `nibbles`; else `codes` + `patterns`; `scales`, `zeros`), exact
tensors one `delta` stream; each stream is stored raw or as one zstd frame, concatenated in manifest order.
"""

from __future__ import annotations

import functools
import threading

import numpy as np
import torch

from deltazip.errors import ArtifactError
from deltazip.format import logscale
from deltazip.format.precision import AnyPrecisionLinear, any_precision_streams, view_from_streams
from deltazip.packed import PackedLinear, codes_per_word, pack_codes_np, unpack_codes, unpack_codes_np

ZSTD_LEVEL = 19
# The 6 possible 2:4 patterns (ascending kept positions); a group's symbol is its index here.
PATTERNS_24 = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ---------------------------------------------------------------- byte streams

def _bytes_of(t: torch.Tensor) -> bytes:
    return t.contiguous().cpu().view(torch.uint8).numpy().tobytes() if t.numel() else b""


def codes_per_byte(bits: int) -> int:
    """Codes packed into one byte of the codes stream (3-bit: 2, so every code sits inside one byte)."""
    return 2 if bits == 3 else 8 // bits


def pack_byte_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (flattened) → uint8 stream, codes_per_byte codes per byte, first code in the lowest bits."""
    per = codes_per_byte(bits)
    flat = codes.reshape(-1).to(torch.int32)
    pad = (-flat.numel()) % per
    flat = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, per)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (flat << shifts).sum(-1).to(torch.uint8)


def unpack_byte_codes(stream: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of pack_byte_codes: uint8 stream → int32 codes [count]."""
    return torch.from_numpy(_byte_codes_np(stream.numpy(), bits, count).astype(np.int32))


def pack_patterns(positions: torch.Tensor) -> torch.Tensor:
    """2:4 positions [N, K/2] → one base-6 pattern symbol per group of 4, three groups per byte."""
    symbols = pattern_symbols(positions)
    pad = (-symbols.numel()) % 3
    symbols = torch.cat([symbols, symbols.new_zeros(pad)]).reshape(-1, 3)
    return (symbols[:, 0] + 6 * symbols[:, 1] + 36 * symbols[:, 2]).to(torch.uint8)


def unpack_patterns(stream: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Inverse of pack_patterns: → positions flattened [n_groups * 2]."""
    symbols = _pattern_symbols_np(stream.numpy(), n_groups)
    return torch.from_numpy(np.asarray(PATTERNS_24, dtype=np.int64)[symbols].reshape(-1))


def pattern_symbols(positions: torch.Tensor) -> torch.Tensor:
    """2:4 positions [N, K/2] → pattern symbols [N·K/4] (index into PATTERNS_24)."""
    pairs = positions.reshape(-1, 2).to(torch.int64)
    lookup = torch.full((16,), -1, dtype=torch.int64)
    for symbol, (a, b) in enumerate(PATTERNS_24):
        lookup[a * 4 + b] = symbol
    symbols = lookup[pairs[:, 0] * 4 + pairs[:, 1]]
    if (symbols < 0).any():
        raise ValueError("2:4 positions must be two distinct ascending slots per group")
    return symbols


def linear_streams(packed: PackedLinear, compact: bool = False) -> dict[str, torch.Tensor]:
    """The byte-oriented streams one packed linear is stored as (entropy coders see like symbols together).

    2-bit 2:4 uses one `nibbles` byte per group of 4 (its codes nibble, then its positions nibble): coding the
    positions jointly with the codes lets the entropy coder use their correlation (≈ 5% smaller measured),
    and the two nibbles are the group's bits of the kernel's qweight and meta words (decoded bitwise).
    `compact` (version 5): symmetric-grid scales as `scale0` + uint8 `lscales`, no `zeros` (logscale.py).
    """
    if isinstance(packed, AnyPrecisionLinear):  # bitplanes, MSB first (docs/FORMAT.md, Any-precision linears)
        return any_precision_streams(packed, pack_patterns)
    if packed.sparse24 and packed.bits == 2:
        streams = {"nibbles": torch.cat([_nibbles(packed, r, r + 1024)  # row chunks: int64 temporaries
                                         for r in range(0, max(packed.out_features, 1), 1024)])}
    else:
        streams = {"codes": pack_byte_codes(packed.codes(), packed.bits)}
        if packed.sparse24:
            streams["patterns"] = pack_patterns(packed.positions())
    if compact and packed.scales.numel() and logscale.zero_grid(packed):
        streams["scale0"], streams["lscales"] = logscale.encode(packed.scales)
        return streams
    streams["scales"] = packed.scales.to(torch.float16)
    streams["zeros"] = packed.zeros.to(torch.float16)
    return streams


def _nibbles(packed: PackedLinear, start: int, stop: int) -> torch.Tensor:
    """The `nibbles` stream of rows [start, stop) of a 2-bit 2:4 linear."""
    n_codes = packed.in_features // 2
    codes = unpack_codes(packed.qweight[start:stop], 2, n_codes).reshape(-1, 2)
    positions = unpack_codes(packed.meta[start:stop], 2, n_codes).reshape(-1, 2)
    pattern_symbols(positions)  # checks two distinct ascending positions per group
    return (codes[:, 0] | codes[:, 1] << 2 | (positions[:, 0] | positions[:, 1] << 2) << 4).to(torch.uint8)


def linear_from_streams(entry: dict, streams: dict[str, bytes], precision: int | None = None) -> PackedLinear:
    """Rebuild a PackedLinear from its decoded streams (shapes follow from the manifest entry).

    Straight from bytes to the int32 words with lookup tables (numpy, no per-code int64 tensors): this is
    the host side of a delta's swap-in. An any-precision entry is read at `precision` (default: its widest).
    """
    n, k = entry["shape"]
    bits, group, sparse = entry["bits"], entry["group_size"], entry["sparse24"]
    n_codes = k // 2 if sparse else k
    try:
        meta = None
        if sparse and k % 32:
            raise ValueError(f"2:4 needs in_features % 32 == 0, not {k}")
        if entry.get("precisions"):
            wanted = precision or max(entry["precisions"])
            if wanted not in entry["precisions"]:
                raise ValueError(f"precision {wanted} is not stored (stored: {entry['precisions']})")
            return view_from_streams(entry, streams, wanted, _patterns_to_meta, _as_tensor)
        if precision is not None and precision != bits:
            raise ValueError(f"precision {precision} is not stored (stored: [{bits}])")
        if sparse and "nibbles" in streams:
            qweight, meta = _nibbles_stream_to_words(_bytes_np(streams["nibbles"]), n, k)
        elif sparse and "groups" in streams:  # version 1 artifacts
            qweight, meta = _groups_to_words(_bytes_np(streams["groups"]), n, k)
        else:
            qweight = _codes_to_words(_bytes_np(streams["codes"]), bits, n, n_codes)
            if sparse:
                symbols = _pattern_symbols_np(_bytes_np(streams["patterns"]), n * k // 4)
                meta = _nibbles_to_words(_POSITION_NIBBLES[symbols], n, k // 32)
        if "lscales" in streams:  # version 5 log scales, symmetric zeros
            scales = logscale.decode(_as_tensor(streams["scale0"], torch.float16, [1]),
                                     _as_tensor(streams["lscales"], torch.uint8, [n, k // group]))
            zeros = torch.full((n, k // group), float(1 << (bits - 1)), dtype=torch.float16)
        else:
            scales = _as_tensor(streams["scales"], torch.float16, [n, k // group])
            zeros = _as_tensor(streams["zeros"], torch.float16, [n, k // group])
        return PackedLinear(n, k, bits, group, sparse, torch.from_numpy(qweight),
                            None if meta is None else torch.from_numpy(meta), scales, zeros)
    except (KeyError, RuntimeError, ValueError) as e:
        raise ArtifactError(f"tensor {entry.get('name', '?')}: streams do not fit its shape ({e})") from None


def _patterns_to_meta(raw: bytes, n: int, k: int) -> np.ndarray:
    """The patterns stream of [n, k] → meta int32 [n, k/32]."""
    symbols = _pattern_symbols_np(_bytes_np(raw), n * k // 4)
    return _nibbles_to_words(_POSITION_NIBBLES[symbols], n, k // 32)


# 2:4 pattern symbol → its two kept positions as one nibble (p0 | p1 << 2); symbols 6, 7 never get here
_POSITION_NIBBLES = np.array([a | b << 2 for a, b in PATTERNS_24] + [0, 0], dtype=np.uint8)


def _bytes_np(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype=np.uint8)


def _byte_codes_np(stream: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The codes stream (codes_per_byte codes per byte, lowest bits first) → uint8 codes [count].

    Whole bytes of 2/4/8-bit codes are the little-endian bytes of packed words: packed.unpack_codes_np
    decodes them. 3-bit codes sit two per byte (bits 0–2 and 3–5).
    """
    per = codes_per_byte(bits)
    if stream.size * per < count:
        raise ValueError(f"{stream.size} bytes hold fewer than {count} {bits}-bit codes")
    used = stream[:-(-count // per)]
    if bits == 3:
        return np.stack([used & np.uint8(7), used >> np.uint8(3) & np.uint8(7)], axis=-1).reshape(-1)[:count]
    padded = np.zeros(-(-used.size // 4) * 4, dtype=np.uint8)
    padded[:used.size] = used
    return unpack_codes_np(padded.view("<i4").reshape(1, -1), bits, count).reshape(count)


def _codes_to_words(stream: np.ndarray, bits: int, n: int, n_codes: int) -> np.ndarray:
    """The codes stream of [n, n_codes] → qweight int32 [n, ceil(n_codes / VPW)]."""
    vpw = codes_per_word(bits)
    if bits != 3 and n_codes % vpw == 0:  # rows fill whole words: the stream already is the words' bytes
        size = n * n_codes // codes_per_byte(bits)
        if stream.size < size:
            raise ValueError(f"codes stream has {stream.size} bytes, expected {size}")
        return stream[:size].copy().view("<i4").astype(np.int32, copy=False).reshape(n, n_codes // vpw)
    return pack_codes_np(_byte_codes_np(stream, bits, n * n_codes).reshape(n, n_codes), bits)


def _pattern_symbols_np(stream: np.ndarray, n_groups: int) -> np.ndarray:
    """The patterns stream (three base-6 symbols per byte) → uint8 symbols [n_groups], checked < 6."""
    if stream.size * 3 < n_groups:
        raise ValueError(f"patterns stream has {stream.size} bytes, too few for {n_groups} groups")
    symbols = _PATTERN_LUT[stream[:-(-n_groups // 3)]].reshape(-1)[:n_groups]
    if symbols.size and symbols.max() > 5:
        raise ArtifactError("invalid 2:4 pattern symbol")
    return symbols


_PATTERN_LUT = np.array([[b % 6, b // 6 % 6, b // 36] for b in range(256)], dtype=np.uint8)


def _nibbles_to_words(nibbles: np.ndarray, n: int, words_per_row: int) -> np.ndarray:
    """4-bit items (two 2-bit fields each, lowest first) → int32 words [n, words_per_row], 8 per word."""
    pairs = nibbles.reshape(-1, 2)
    packed = pairs[:, 0] | (pairs[:, 1] << np.uint8(4))
    return packed.view("<i4").astype(np.int32, copy=False).reshape(n, words_per_row)


@functools.cache
def _group_luts() -> tuple[np.ndarray, np.ndarray]:
    """For two `groups` bytes read as one little-endian uint16: the byte of their 4 codes and of their 4
    positions (first group in the low nibble) — 64 KiB tables, one gather per pair of groups."""
    symbol = np.arange(256)
    valid = symbol < 6 * 16
    pattern = np.where(valid, symbol // 16, 0)
    code_nib = np.where(valid, (symbol // 4 % 4) | (symbol % 4) << 2, 0).astype(np.uint8)
    pos_nib = _POSITION_NIBBLES[pattern]
    lo, hi = np.arange(1 << 16) & 0xFF, np.arange(1 << 16) >> 8
    return code_nib[lo] | code_nib[hi] << np.uint8(4), pos_nib[lo] | pos_nib[hi] << np.uint8(4)


def _groups_to_words(stream: np.ndarray, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The 2-bit 2:4 `groups` stream [n·k/4] → (qweight, meta), both int32 [n, k/32]."""
    if stream.size != n * k // 4:
        raise ValueError(f"groups stream has {stream.size} bytes, expected {n * k // 4}")
    if stream.size and stream.max() >= 6 * 16:
        raise ValueError("invalid group symbol")
    code_lut, pos_lut = _group_luts()
    pairs = stream.view("<u2")  # k % 32 == 0: a pair never straddles rows, 8 groups make one word
    words = [lut[pairs].view("<i4").astype(np.int32, copy=False).reshape(n, k // 32)
             for lut in (code_lut, pos_lut)]
    return words[0], words[1]


_LOW_PAIRS, _THREES, _FOURS = (np.uint64(0x0101010101010101 * b) for b in (0x03, 0x03, 0x04))
# delta swaps (shift, mask) that transpose 8 groups' nibbles [c0 p0 c1 p1 ... c7 p7] (lowest first) in a
# uint64 into [c0 c1 ... c7 p0 p1 ... p7]: nibbles within 16 bits, then bytes within 32, then 16-bit halves
_TRANSPOSE = [(np.uint64(shift), np.uint64(mask)) for shift, mask in
              ((4, 0x00F000F000F000F0), (8, 0x0000FF000000FF00), (16, 0x00000000FFFF0000))]


def _nibbles_stream_to_words(stream: np.ndarray, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The 2-bit 2:4 `nibbles` stream [n·k/4] → (qweight, meta), both int32 [n, k/32].

    Bitwise on 8 groups (one uint64) at a time: their low nibbles make one qweight word, their high nibbles
    one meta word (k % 32 == 0, so words never straddle rows).
    """
    if stream.size != n * k // 4:
        raise ValueError(f"nibbles stream has {stream.size} bytes, expected {n * k // 4}")
    lanes = stream.view("<u8")
    # 2:4 check of every byte at once: second + 3 - first keeps bit 2 iff second > first (no borrows)
    gap = lanes >> np.uint64(6)
    gap &= _LOW_PAIRS
    gap += _THREES
    gap -= (lanes >> np.uint64(4)) & _LOW_PAIRS
    if lanes.size and np.bitwise_and.reduce(gap) & _FOURS != _FOURS:
        raise ValueError("invalid 2:4 positions (need two distinct ascending positions per group)")
    words, swap = lanes, gap
    for shift, mask in _TRANSPOSE:
        np.right_shift(words, shift, out=swap)
        swap ^= words
        swap &= mask
        words = words ^ swap if words is lanes else words.__ixor__(swap)
        swap <<= shift
        words ^= swap
    pairs = words.view("<u4").reshape(n, k // 32, 2)
    return (np.ascontiguousarray(pairs[..., 0]).view(np.int32),
            np.ascontiguousarray(pairs[..., 1]).view(np.int32))


def _encode(data: bytes, encoding: str) -> bytes:
    if encoding == "raw" or not data:
        return data
    import zstandard

    return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data)


def _decode(data: bytes, encoding: str, raw_bytes: int, where: str) -> bytes:
    if encoding == "zstd" and data:
        import zstandard

        try:
            data = _zstd_decompressor().decompress(data, max_output_size=raw_bytes)
        except zstandard.ZstdError as e:
            raise ArtifactError(f"{where}: cannot decode zstd stream: {e}") from None
    elif encoding != "raw":
        raise ArtifactError(f"{where}: unknown stream encoding {encoding!r}")
    if len(data) != raw_bytes:
        raise ArtifactError(f"{where}: decoded {len(data)} bytes, manifest says {raw_bytes}")
    return data


def _zstd_decompressor():
    """One reused decompression context per thread (a context must not be shared between threads)."""
    dctx = getattr(_THREAD, "zstd", None)
    if dctx is None:
        import zstandard

        dctx = _THREAD.zstd = zstandard.ZstdDecompressor()
    return dctx


_THREAD = threading.local()


def _encode_streams(streams: dict[str, torch.Tensor], encoding: str) -> tuple[bytes, list[list]]:
    """Concatenate the encoded streams into one blob; list each as [name, raw bytes, stored bytes]."""
    blob, infos = [], []
    for name, t in streams.items():
        raw = _bytes_of(t)
        stored = _encode(raw, encoding)
        blob.append(stored)
        infos.append([name, len(raw), len(stored)])
    return b"".join(blob), infos


def _decode_streams(blob: bytes, entry: dict, where: str) -> dict[str, bytes]:
    """Split a tensor's blob into its streams and decode each (checking sizes against the manifest)."""
    out, offset = {}, 0
    for stream, raw_bytes, stored_bytes in entry["streams"]:
        stored = blob[offset:offset + stored_bytes]
        offset += stored_bytes
        out[stream] = _decode(stored, entry["encoding"], raw_bytes, f"{where}.{stream}")
    if offset != len(blob):
        raise ArtifactError(f"{where}: streams total {offset} bytes but the stored blob has {len(blob)}")
    return out


def _as_tensor(raw: bytes, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    return flat.view(dtype).reshape(shape)


# ---------------------------------------------------------------- tensors

def encode_tensors(linears: dict[str, PackedLinear], exact: dict[str, torch.Tensor],
                   lossless: str, compact: bool = False) -> tuple[dict[str, bytes], dict[str, dict]]:
    """Encode every tensor to its stored blob; returns blobs and the manifest's per-tensor entries
    (`compact`: version 5 log scales where a linear's zeros allow)."""
    encoding = "zstd" if lossless == "zstd" else "raw"
    blobs, entries = {}, {}
    for name, packed in linears.items():
        blobs[name], streams = _encode_streams(linear_streams(packed, compact), encoding)
        shape = [packed.out_features, packed.in_features]
        entries[name] = {"kind": "linear", "codec": "packed", "shape": shape, "bits": packed.bits,
                         "group_size": packed.group_size, "sparse24": packed.sparse24,
                         "encoding": encoding, "streams": streams}
        if isinstance(packed, AnyPrecisionLinear):
            entries[name]["precisions"] = packed.precisions
    for name, delta in exact.items():
        blobs[name], streams = _encode_streams({"delta": delta}, encoding)
        dtype = str(delta.dtype).removeprefix("torch.")
        entries[name] = {"kind": "exact", "codec": "delta", "shape": list(delta.shape), "dtype": dtype,
                         "encoding": encoding, "streams": streams}
    return blobs, entries


def decode_tensor(blob: bytes | memoryview, entry: dict, name: str,
                  precision: int | None = None) -> PackedLinear | torch.Tensor:
    """One tensor from its stored blob and manifest entry: a PackedLinear or an exact delta.

    `precision` picks the view of an any-precision linear (None: its widest; other linears: their bits).
    """
    streams = _decode_streams(blob, entry, name)
    if entry["kind"] == "linear":
        return linear_from_streams({**entry, "name": name}, streams, precision)
    if entry["kind"] == "exact":
        if entry["dtype"] not in DTYPES:
            raise ArtifactError(f"tensor {name} has unsupported dtype {entry['dtype']!r}")
        return _as_tensor(streams["delta"], DTYPES[entry["dtype"]], entry["shape"])
    raise ArtifactError(f"tensor {name} has unknown kind {entry['kind']!r}")
