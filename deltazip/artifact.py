"""Delta artifact on disk (docs/FORMAT.md): manifest.json + one safetensors file; checksums, atomic write."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import struct
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deltazip.errors import DeltazipError
from deltazip.packed import PackedLinear, codes_per_word, pack_codes_np

FORMAT_NAME = "deltazip.delta"
FORMAT_VERSION = 2  # written; 2 adds the `nibbles` stream (docs/FORMAT.md)
READ_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
PAYLOAD = "delta.safetensors"
ZSTD_LEVEL = 19
# The 6 possible 2:4 patterns (ascending kept positions); a group's symbol is its index here.
PATTERNS_24 = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class ArtifactError(DeltazipError):
    """An artifact that is malformed, of an unknown format or version, or missing a file."""


class ChecksumError(ArtifactError):
    """A file of the artifact does not match the size or sha256 in its manifest."""


class FingerprintError(DeltazipError):
    """The artifact was made against a different base model."""


@dataclass
class DeltaArtifact:
    """A loaded delta: packed linears (HF module names) and exact deltas (HF parameter names)."""

    path: Path
    name: str
    manifest: dict
    base_fingerprint: str
    linears: dict[str, PackedLinear]
    exact: dict[str, torch.Tensor]


# ---------------------------------------------------------------- model directories (safetensors)

class ModelWeights:
    """Lazy, read-only view of the safetensors weights of an HF model directory (sharded or not)."""

    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
        if not files:
            raise DeltazipError(f"{self.dir}: no *.safetensors weights (pickle checkpoints are not read)")
        self.files = files
        # name -> (file, dtype, shape, begin, end) with absolute byte offsets in the file
        self.entries: dict[str, tuple[str, str, list[int], int, int]] = {}
        for file in files:
            for name, info in _read_header(self.dir / file).items():
                self.entries[name] = (file, info["dtype"], info["shape"], *info["data_offsets"])

    def names(self) -> list[str]:
        return sorted(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name][2])

    def get(self, name: str) -> torch.Tensor:
        """One tensor, copied out of the file (no mapping is kept open, so resident memory stays small)."""
        from safetensors import safe_open

        with safe_open(str(self.dir / self.entries[name][0]), framework="pt") as f:
            return f.get_tensor(name).clone()

    def config(self) -> dict:
        path = self.dir / "config.json"
        if not path.is_file():
            raise DeltazipError(f"{self.dir}: no config.json (not a Hugging Face model directory)")
        return json.loads(path.read_text())


def _read_header(path: Path) -> dict:
    """The JSON header of a safetensors file, with data offsets made absolute within the file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ArtifactError(f"{path}: truncated safetensors file")
        (length,) = struct.unpack("<Q", raw)
        if length > 100_000_000:
            raise ArtifactError(f"{path}: safetensors header too large ({length} bytes)")
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    for info in header.values():
        info["data_offsets"] = [8 + length + o for o in info["data_offsets"]]
    return header


def fingerprint_model(model_dir: str | Path) -> str:
    """sha256 over every tensor's name, dtype, shape and sampled bytes (whole tensor up to 1 MiB).

    Sampling keeps this fast on multi-GB bases; any fine-tune changes sampled bytes in practice.
    """
    weights = ModelWeights(model_dir)
    digest = hashlib.sha256()
    chunk, n_chunks, whole_limit = 4096, 64, 1 << 20
    handles: dict[str, object] = {}
    try:
        for name in weights.names():
            file, dtype, shape, begin, end = weights.entries[name]
            digest.update(f"{name}|{dtype}|{shape}|".encode())
            f = handles.setdefault(file, open(weights.dir / file, "rb"))
            size = end - begin
            spans = [(begin, size)] if size <= whole_limit else [
                (begin + (size - chunk) * i // (n_chunks - 1), chunk) for i in range(n_chunks)]
            for offset, length in spans:
                f.seek(offset)
                digest.update(f.read(length))
    finally:
        for f in handles.values():
            f.close()
    return "sha256:" + digest.hexdigest()


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


def linear_streams(packed: PackedLinear) -> dict[str, torch.Tensor]:
    """The byte-oriented streams one packed linear is stored as (entropy coders see like symbols together).

    2-bit 2:4 uses one `nibbles` byte per group of 4 (its codes nibble, then its positions nibble): coding the
    positions jointly with the codes lets the entropy coder use their correlation (≈ 5% smaller measured),
    and the two nibbles are the group's bits of the kernel's qweight and meta words (decoded bitwise).
    """
    if packed.sparse24 and packed.bits == 2:
        codes, positions = packed.codes().reshape(-1, 2), packed.positions().reshape(-1, 2)
        pattern_symbols(positions)  # checks two distinct ascending positions per group
        nibbles = codes[:, 0] | codes[:, 1] << 2 | (positions[:, 0] | positions[:, 1] << 2) << 4
        streams = {"nibbles": nibbles.to(torch.uint8)}
    else:
        streams = {"codes": pack_byte_codes(packed.codes(), packed.bits)}
        if packed.sparse24:
            streams["patterns"] = pack_patterns(packed.positions())
    streams["scales"] = packed.scales.to(torch.float16)
    streams["zeros"] = packed.zeros.to(torch.float16)
    return streams


def linear_from_streams(entry: dict, streams: dict[str, bytes]) -> PackedLinear:
    """Rebuild a PackedLinear from its decoded streams (shapes follow from the manifest entry).

    Straight from bytes to the int32 words with lookup tables (numpy, no per-code int64 tensors): this is
    the host side of a delta's swap-in.
    """
    n, k = entry["shape"]
    bits, group, sparse = entry["bits"], entry["group_size"], entry["sparse24"]
    n_codes = k // 2 if sparse else k
    try:
        meta = None
        if sparse and k % 32:
            raise ValueError(f"2:4 needs in_features % 32 == 0, not {k}")
        if sparse and "nibbles" in streams:
            qweight, meta = _nibbles_stream_to_words(_bytes_np(streams["nibbles"]), n, k)
        elif sparse and "groups" in streams:  # version 1 artifacts
            qweight, meta = _groups_to_words(_bytes_np(streams["groups"]), n, k)
        else:
            qweight = _codes_to_words(_bytes_np(streams["codes"]), bits, n, n_codes)
            if sparse:
                symbols = _pattern_symbols_np(_bytes_np(streams["patterns"]), n * k // 4)
                meta = _nibbles_to_words(_POSITION_NIBBLES[symbols], n, k // 32)
        scales = _as_tensor(streams["scales"], torch.float16, [n, k // group])
        zeros = _as_tensor(streams["zeros"], torch.float16, [n, k // group])
        return PackedLinear(n, k, bits, group, sparse, torch.from_numpy(qweight),
                            None if meta is None else torch.from_numpy(meta), scales, zeros)
    except (KeyError, RuntimeError, ValueError) as e:
        raise ArtifactError(f"tensor {entry.get('name', '?')}: streams do not fit its shape ({e})") from None


# 2:4 pattern symbol → its two kept positions as one nibble (p0 | p1 << 2); symbols 6, 7 never get here
_POSITION_NIBBLES = np.array([a | b << 2 for a, b in PATTERNS_24] + [0, 0], dtype=np.uint8)


def _bytes_np(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype=np.uint8)


def _byte_codes_np(stream: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The codes stream (codes_per_byte codes per byte, lowest bits first) → uint8 codes [count]."""
    per = codes_per_byte(bits)
    if stream.size * per < count:
        raise ValueError(f"{stream.size} bytes hold fewer than {count} {bits}-bit codes")
    return _byte_code_lut(bits, per)[stream[:-(-count // per)]].view(np.uint8)[:count]


@functools.cache
def _byte_code_lut(bits: int, per: int) -> np.ndarray:
    """[256] of `per`-byte items: a codes-stream byte → its `per` codes, one per byte (one gather)."""
    byte = np.arange(256, dtype=np.uint8)[:, None]
    table = (byte >> (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)) & np.uint8((1 << bits) - 1)
    return np.ascontiguousarray(table, dtype=np.uint8).view(f"<u{per}").reshape(256)


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


# ---------------------------------------------------------------- atomic directories

@contextlib.contextmanager
def atomic_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside `target`; on success it becomes `target`, on any failure it is removed."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise DeltazipError(f"{target} already exists (pass --force / overwrite=True to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- save / load

def encode_tensors(linears: dict[str, PackedLinear], exact: dict[str, torch.Tensor],
                   lossless: str) -> tuple[dict[str, bytes], dict[str, dict]]:
    """Encode every tensor to its stored blob; returns blobs and the manifest's per-tensor entries."""
    encoding = "zstd" if lossless == "zstd" else "raw"
    blobs, entries = {}, {}
    for name, packed in linears.items():
        blobs[name], streams = _encode_streams(linear_streams(packed), encoding)
        shape = [packed.out_features, packed.in_features]
        entries[name] = {"kind": "linear", "codec": "packed", "shape": shape, "bits": packed.bits,
                         "group_size": packed.group_size, "sparse24": packed.sparse24,
                         "encoding": encoding, "streams": streams}
    for name, delta in exact.items():
        blobs[name], streams = _encode_streams({"delta": delta}, encoding)
        dtype = str(delta.dtype).removeprefix("torch.")
        entries[name] = {"kind": "exact", "codec": "delta", "shape": list(delta.shape), "dtype": dtype,
                         "encoding": encoding, "streams": streams}
    return blobs, entries


def save_delta(path: str | Path, name: str, base_fingerprint: str, linears: dict[str, PackedLinear],
               exact: dict[str, torch.Tensor], info: dict | None = None, lossless: str = "zstd",
               overwrite: bool = False) -> Path:
    """Write NAME.dz/ atomically; `info` adds manifest fields (target, settings, stats)."""
    from safetensors.numpy import save_file

    check_name(name)
    blobs, entries = encode_tensors(linears, exact, lossless)
    num_params = sum(int(np.prod(e["shape"])) for e in entries.values())
    raw = sum(s[1] for e in entries.values() for s in e["streams"])
    stored = sum(s[2] for e in entries.values() for s in e["streams"])
    info = dict(info or {})
    manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "name": name,
                "base": {"fingerprint": base_fingerprint, **info.pop("base", {})}, **info}
    stats = manifest.setdefault("stats", {})
    stats.update({"num_parameters": num_params, "fp16_bytes": 2 * num_params, "raw_stream_bytes": raw,
                  "stored_stream_bytes": stored, "lossless_gain": raw / max(stored, 1)})
    with atomic_dir(path, overwrite) as tmp:
        arrays = {k: np.frombuffer(v, dtype=np.uint8) for k, v in blobs.items()}
        payload = tmp / PAYLOAD
        save_file(arrays, str(payload), metadata={"format": FORMAT_NAME})
        payload.chmod(0o644)
        manifest["tensors"] = entries
        manifest["files"] = {PAYLOAD: {"sha256": sha256_file(payload), "bytes": payload.stat().st_size}}
        text = ""
        for _ in range(8):  # the manifest's own size is part of the ratio: iterate to a fixed point
            total = payload.stat().st_size + len(text.encode())
            stats.update({"artifact_bytes": total, "ratio": 2 * num_params / total,
                          "bits_per_weight": 8 * total / max(num_params, 1)})
            text, previous = json.dumps(manifest, separators=(",", ":")), text
            if len(text.encode()) == len(previous.encode()):
                break
        (tmp / MANIFEST).write_text(text)
    return Path(path)


def check_name(name: str) -> None:
    """Delta names become file names and request fields: letters, digits, '.', '_', '-' only."""
    if not name or name.startswith(".") or not all(c.isalnum() or c in "._-" for c in name):
        raise DeltazipError(f"invalid delta name {name!r}: use letters, digits, '.', '_' or '-'")


def read_manifest(path: str | Path) -> dict:
    """Parse and check manifest.json of an artifact directory (format, version, required fields)."""
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise ArtifactError(f"{path}: not a delta artifact (no {MANIFEST})")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{file}: invalid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{file}: format is not {FORMAT_NAME!r}")
    if manifest.get("version") not in READ_VERSIONS:
        version = manifest.get("version")
        raise ArtifactError(f"{file}: unsupported version {version!r} (this reader: {READ_VERSIONS})")
    for key, kind in (("name", str), ("base", dict), ("tensors", dict), ("files", dict)):
        if not isinstance(manifest.get(key), kind):
            raise ArtifactError(f"{file}: missing or invalid field {key!r}")
    if not isinstance(manifest["base"].get("fingerprint"), str):
        raise ArtifactError(f"{file}: missing field 'base.fingerprint'")
    return manifest


def verify_files(path: Path, manifest: dict) -> None:
    """Check every listed file's size and sha256; raise ChecksumError naming the first bad file."""
    for fname, meta in manifest["files"].items():
        file = path / fname
        if Path(fname).name != fname or not file.is_file():
            raise ChecksumError(f"{file}: missing from the artifact")
        size = file.stat().st_size
        if size != meta["bytes"]:
            raise ChecksumError(f"{file}: size {size} bytes, manifest says {meta['bytes']} (truncated?)")
        if sha256_file(file) != meta["sha256"]:
            raise ChecksumError(f"{file}: sha256 mismatch (corrupted)")


def load_delta(path: str | Path, verify: bool = True) -> DeltaArtifact:
    """Read NAME.dz/: decode every tensor and (unless verify=False) check the files' sizes and sha256.

    The payload is read once, by a thread that hashes the same bytes while this one decodes the tensors
    already read (docs/FORMAT.md, Checksums); nothing is returned unless the checksum matches.
    """
    from deltazip.payload import PayloadError, PayloadReader

    path = Path(path)
    payload = path / PAYLOAD
    reader = PayloadReader(payload, hash=verify) if payload.is_file() else None  # reads during the manifest
    try:
        manifest = read_manifest(path)
        if verify:
            verify_files(path, {**manifest, "files": {k: v for k, v in manifest["files"].items()
                                                      if k != PAYLOAD}})
            _check_payload_size(payload, reader, manifest["files"].get(PAYLOAD))
        if reader is None:
            raise ArtifactError(f"{payload}: missing from the artifact")
        try:
            linears, exact = _decode_payload(reader, manifest["tensors"], path)
        except (PayloadError, ArtifactError, KeyError, ValueError, TypeError) as e:
            if verify:
                _check_payload_sha(payload, reader, manifest["files"].get(PAYLOAD))  # corruption first
            if isinstance(e, ArtifactError):
                raise
            raise ArtifactError(f"{payload}: cannot read ({e})") from None
        if verify:
            _check_payload_sha(payload, reader, manifest["files"].get(PAYLOAD))
    finally:
        if reader is not None:
            reader.close()
    return DeltaArtifact(path, manifest["name"], manifest, manifest["base"]["fingerprint"], linears, exact)


def _check_payload_size(payload: Path, reader, meta: dict | None) -> None:
    if meta is None:
        return
    if reader is None:
        raise ChecksumError(f"{payload}: missing from the artifact")
    if reader.size != meta["bytes"]:
        raise ChecksumError(f"{payload}: size {reader.size} bytes, manifest says {meta['bytes']} "
                            "(truncated?)")


def _check_payload_sha(payload: Path, reader, meta: dict | None) -> None:
    from deltazip.payload import PayloadError

    if meta is None:
        return
    try:
        digest = reader.sha256()
    except PayloadError as e:
        raise ChecksumError(f"{payload}: cannot read ({e})") from None
    if digest != meta["sha256"]:
        raise ChecksumError(f"{payload}: sha256 mismatch (corrupted)")


def _decode_payload(reader, entries: dict, path: Path) -> tuple[dict[str, PackedLinear],
                                                                 dict[str, torch.Tensor]]:
    """Decode every manifest tensor from the payload, in file order, each as soon as its bytes are read.

    One thread: a pool of 2 decoder threads measured slower (busy 2-core machine, GIL hand-offs).
    """
    spans = reader.header()
    missing = [name for name in entries if name not in spans]
    if missing or len(spans) != len(entries):
        extra = [name for name in spans if name not in entries]
        raise ArtifactError(f"{path / PAYLOAD}: tensors do not match the manifest (missing {missing[:3]}, "
                            f"extra {extra[:3]})")
    decoded = {name: _decode_tensor(reader, spans[name], entries[name], name)
               for name in sorted(entries, key=lambda n: spans[n][0])}
    linears = {n: decoded[n] for n, e in entries.items() if e["kind"] == "linear"}
    exact = {n: decoded[n] for n, e in entries.items() if e["kind"] == "exact"}
    return linears, exact


def _decode_tensor(reader, span: tuple[int, int], entry: dict, name: str) -> PackedLinear | torch.Tensor:
    """One tensor of the payload, decoded once bytes [begin, end) have been read."""
    begin, end = span
    streams = _decode_streams(reader.wait(end)[begin:end], entry, name)
    if entry["kind"] == "linear":
        return linear_from_streams({**entry, "name": name}, streams)
    if entry["kind"] == "exact":
        if entry["dtype"] not in _DTYPES:
            raise ArtifactError(f"tensor {name} has unsupported dtype {entry['dtype']!r}")
        return _as_tensor(streams["delta"], _DTYPES[entry["dtype"]], entry["shape"])
    raise ArtifactError(f"tensor {name} has unknown kind {entry['kind']!r}")


def decompress(delta: DeltaArtifact) -> dict[str, torch.Tensor]:
    """Dense deltas keyed by HF parameter name (linears as float32, exact deltas in their stored dtype)."""
    out = {f"{name}.weight": packed.dequantize(torch.float32) for name, packed in delta.linears.items()}
    out.update(delta.exact)
    return out


def merge_tensor(base: torch.Tensor, delta: torch.Tensor, exact: bool) -> torch.Tensor:
    """base + delta in base's dtype; exact deltas are added in float64 so the sum reproduces the target."""
    if exact:
        return (base.double() + delta.double()).to(base.dtype)
    return (base.float() + delta.float()).to(base.dtype)


def apply_delta(base_dir: str | Path, delta: DeltaArtifact | str | Path, out_dir: str | Path,
                overwrite: bool = False) -> Path:
    """Write base + delta as a full HF model directory (config, tokenizer copied from base), atomically."""
    from safetensors.torch import save_file

    if not isinstance(delta, DeltaArtifact):
        delta = load_delta(delta)
    base_dir = Path(base_dir)
    fingerprint = fingerprint_model(base_dir)
    if fingerprint != delta.base_fingerprint:
        raise FingerprintError(f"delta {delta.name!r} was made for base {delta.base_fingerprint[:19]}…, "
                               f"not {base_dir} ({fingerprint[:19]}…)")
    weights = ModelWeights(base_dir)
    params = {f"{n}.weight": (p, False) for n, p in delta.linears.items()}
    params.update({n: (t, True) for n, t in delta.exact.items()})
    for name, (value, _) in params.items():
        is_linear = isinstance(value, PackedLinear)
        shape = (value.out_features, value.in_features) if is_linear else tuple(value.shape)
        if name not in weights.entries or weights.shape(name) != shape:
            raise ArtifactError(f"delta {delta.name!r} does not fit {base_dir}: tensor {name} missing or of "
                                f"another shape")
    with atomic_dir(out_dir, overwrite) as tmp:
        for file in weights.files:
            merged = {}
            for name, entry in weights.entries.items():
                if entry[0] != file:
                    continue
                base = weights.get(name)
                if name in params:
                    value, exact = params[name]
                    dense = value.dequantize(torch.float32) if isinstance(value, PackedLinear) else value
                    base = merge_tensor(base, dense, exact)
                merged[name] = base.contiguous()
            save_file(merged, str(tmp / file), metadata={"format": "pt"})
        for item in base_dir.iterdir():
            if item.is_file() and item.suffix != ".safetensors":
                shutil.copy2(item, tmp / item.name)
    return Path(out_dir)
