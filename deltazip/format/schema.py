"""The manifest schema (docs/FORMAT.md, "manifest.json"): every field checked before any payload byte is used.

`parse_manifest` turns manifest.json's bytes into a dict (bounded size and nesting, UTF-8, no duplicate keys);
`validate_manifest` checks types, ranges and names of every field the reader uses, derives each stream's
exact size from the tensor's shape and settings, and requires the payload to be listed in `files`.
Anything wrong is one `ArtifactError` line naming the field. Plain Python: no schema library.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np

from deltazip.errors import ArtifactError

FORMAT_NAME = "deltazip.delta"
READ_VERSIONS = (1, 2, 3, 4, 5)  # 3: any-precision linears (bitplanes, `precisions`); 4: blake3 checksums
BLAKE3_VERSION = 4  # from this version on, `files` entries carry `blake3` (earlier: `sha256`)
COMPACT_VERSION = 5  # from here on: `tensors_zstd` (base64 zstd JSON of the tensor table) and log scales
COMPACT_KEY = "tensors_zstd"
MANIFEST = "manifest.json"
PAYLOAD = "delta.safetensors"

MAX_MANIFEST_BYTES = 64 << 20  # a 70B model's manifest is well under 1 MiB
MAX_DEPTH = 32  # a manifest needs 5 levels (tensors → entry → streams → stream); `quality` a few more
MAX_NAME = 128  # delta names (also the pool's limit)
MAX_TENSOR_NAME = 512
MAX_DIM = 1 << 31
MAX_BYTES = 1 << 50  # any single size field: 1 PiB

NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
TENSOR_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]*")
FINGERPRINT_RE = re.compile(r"sha256:[0-9a-f]{64}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
FILE_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")

KINDS = {"linear": "packed", "exact": "delta"}  # kind → its codec
ENCODINGS = ("raw", "zstd")
BITS = (2, 3, 4, 8)
EXACT_DTYPES = {"float32": 4, "float64": 8}


def _show(value: object, limit: int = 40) -> str:
    """A value for an error message, cut short (a 1 MB name is not echoed in full)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


class _Fail(Exception):
    """One failed check: the field's path and what is wrong with it (the caller raises ArtifactError)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"field {field!r} {message}")


def _int(value: object, field: str, minimum: int = 0, maximum: int = MAX_BYTES) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Fail(field, f"must be an integer, not {_show(value)}")
    if not minimum <= value <= maximum:
        raise _Fail(field, f"must be in [{minimum}, {maximum}], not {_show(value)}")
    return value


def _str(value: object, field: str, pattern: re.Pattern | None = None, max_len: int = 4096) -> str:
    if not isinstance(value, str):
        raise _Fail(field, f"must be a string, not {_show(value)}")
    if len(value) > max_len:
        raise _Fail(field, f"is longer than {max_len} characters")
    if pattern is not None and not pattern.fullmatch(value):
        raise _Fail(field, f"is not valid: {_show(value)}")
    return value


def _dict(value: object, field: str) -> dict:
    if not isinstance(value, dict):
        raise _Fail(field, f"must be an object, not {type(value).__name__}")
    return value


def _list(value: object, field: str) -> list:
    if not isinstance(value, list):
        raise _Fail(field, f"must be an array, not {type(value).__name__}")
    return value


def _enum(value: object, field: str, allowed: tuple | dict) -> object:
    # type first: True == 1 and 2.0 == 2 must not pass as the integers of an enum
    for a in allowed:
        if type(value) is type(a) and value == a:
            return value
    raise _Fail(field, f"must be one of {', '.join(map(repr, allowed))}, not {_show(value)}")


# ---------------------------------------------------------------- parsing

def max_json_depth(text: bytes) -> int:
    """Deepest nesting of [ and { in a JSON text, outside strings (vectorised: no recursion, no Python loop
    over characters)."""
    data = np.frombuffer(text, dtype=np.uint8)
    if not data.size:
        return 0
    quote, backslash = data == ord('"'), data == ord("\\")
    if backslash.any():  # a quote is escaped when an odd run of backslashes precedes it
        idx = np.flatnonzero(backslash)
        run_start = np.ones(idx.size, dtype=bool)
        run_start[1:] = idx[1:] != idx[:-1] + 1
        starts = np.flatnonzero(run_start)
        lengths = np.diff(np.append(starts, idx.size))
        ends = idx[starts] + lengths  # the character after each run
        escaped = ends[(lengths % 2 == 1) & (ends < data.size)]
        quote[escaped] = False
    inside = (np.cumsum(quote) % 2 == 1) & ~quote  # characters between an opening and a closing quote
    step = np.zeros(data.size, dtype=np.int64)
    step[(data == ord("[")) | (data == ord("{"))] = 1
    step[(data == ord("]")) | (data == ord("}"))] = -1
    step[inside] = 0
    return int(np.cumsum(step).max(initial=0))


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ArtifactError(f"duplicate key {_show(dup)}")
    return out


def _no_constant(name: str) -> float:
    raise ArtifactError(f"{name} is not valid JSON")


def parse_manifest(text: bytes, where: str) -> dict:
    """manifest.json's bytes → dict: at most MAX_MANIFEST_BYTES, UTF-8, nesting ≤ MAX_DEPTH, unique keys."""
    if len(text) > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{where}: more than {MAX_MANIFEST_BYTES} bytes, too large for a manifest")
    depth = max_json_depth(text)
    if depth > MAX_DEPTH:
        raise ArtifactError(f"{where}: invalid JSON (nested {depth} deep, at most {MAX_DEPTH} allowed)")
    try:
        manifest = json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates,
                              parse_constant=_no_constant)
    except ArtifactError as e:
        raise ArtifactError(f"{where}: invalid JSON ({e})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ArtifactError(f"{where}: invalid JSON ({_show(str(e), 200)})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{where}: invalid manifest (a JSON object is required, not "
                            f"{type(manifest).__name__})")
    return manifest


def inflate_tensors(manifest: dict, where: str) -> dict:
    """A version ≥ 5 manifest may store its tensor table as `tensors_zstd`: base64 of one zstd frame of the
    table's compact JSON. Decode it (bounded like manifest.json itself) into `tensors`; others unchanged."""
    if COMPACT_KEY not in manifest:
        return manifest
    import base64
    import binascii

    import zstandard

    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < COMPACT_VERSION:
        raise ArtifactError(f"{where}: field {COMPACT_KEY!r} needs version {COMPACT_VERSION} or later")
    if "tensors" in manifest:
        raise ArtifactError(f"{where}: field {COMPACT_KEY!r} and field 'tensors' are exclusive")
    packed = manifest[COMPACT_KEY]
    if not isinstance(packed, str) or len(packed) > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{where}: field {COMPACT_KEY!r} must be a base64 string")
    try:
        frame = base64.b64decode(packed.encode("ascii"), validate=True)
        text = zstandard.ZstdDecompressor().decompress(frame, max_output_size=MAX_MANIFEST_BYTES)
    except (ValueError, binascii.Error, zstandard.ZstdError) as e:
        raise ArtifactError(f"{where}: field {COMPACT_KEY!r} cannot be decoded ({_show(str(e), 80)})"
                            ) from None
    if len(text) > MAX_MANIFEST_BYTES:  # a frame without a content size decodes up to the bound only
        raise ArtifactError(f"{where}: field {COMPACT_KEY!r} decodes to more than {MAX_MANIFEST_BYTES} bytes")
    out = {k: v for k, v in manifest.items() if k != COMPACT_KEY}
    out["tensors"] = parse_manifest(text, f"{where} ({COMPACT_KEY})")
    return out


# ---------------------------------------------------------------- fields

def validate_manifest(manifest: object, where: str) -> dict:
    """Check every field the reader relies on (docs/FORMAT.md); ArtifactError naming the field otherwise."""
    try:
        _validate(manifest)
    except _Fail as e:
        raise ArtifactError(f"{where}: {e}") from None
    return manifest  # type: ignore[return-value]


def _validate(m: object) -> None:
    m = _dict(m, "(manifest)")
    if m.get("format") != FORMAT_NAME:
        raise _Fail("format", f"must be {FORMAT_NAME!r}, not {_show(m.get('format'))}")
    version = m.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version not in READ_VERSIONS:
        raise _Fail("version", f"names an unsupported version {_show(version)} (this reader: "
                               f"{', '.join(map(str, READ_VERSIONS))})")
    for key in ("name", "base", "tensors", "files"):
        if key not in m:
            raise _Fail(key, "is missing")
    _str(m["name"], "name", NAME_RE, MAX_NAME)
    base = _dict(m["base"], "base")
    if "fingerprint" not in base:
        raise _Fail("base.fingerprint", "is missing")
    _str(base["fingerprint"], "base.fingerprint", FINGERPRINT_RE)
    if "name" in base:
        _str(base["name"], "base.name")
    if "target" in m:
        _str(m["target"], "target")
    for key in ("model", "settings"):
        if key in m:
            _dict(m[key], key)
    if "stats" in m:
        for key, value in _dict(m["stats"], "stats").items():
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
                raise _Fail(f"stats.{key}", f"must be a finite number, not {_show(value)}")
    _validate_files(_dict(m["files"], "files"), checksum_key(version))
    tensors = _dict(m["tensors"], "tensors")
    for name, entry in tensors.items():
        _str(name, "tensors", TENSOR_NAME_RE, MAX_TENSOR_NAME)  # a bad key is named by its value
        _validate_tensor(entry, f"tensors.{name}", version >= COMPACT_VERSION)


def checksum_key(version: int) -> str:
    """The per-file checksum a manifest of `version` records in `files`: "blake3" (4+) or "sha256"."""
    return "blake3" if version >= BLAKE3_VERSION else "sha256"


def _validate_files(files: dict, digest: str = "sha256") -> None:
    if PAYLOAD not in files:
        raise _Fail("files", f"must list {PAYLOAD} (every payload file is checksummed)")
    for fname, meta in files.items():
        if fname == MANIFEST or ".." in fname:
            raise _Fail("files", f"has an invalid file name {_show(fname)}")
        _str(fname, "files", FILE_NAME_RE, 255)
        meta = _dict(meta, f"files.{fname}")
        for key in (digest, "bytes"):
            if key not in meta:
                raise _Fail(f"files.{fname}.{key}", "is missing")
        _str(meta[digest], f"files.{fname}.{digest}", SHA256_RE)  # both digests: 64 lowercase hex
        _int(meta["bytes"], f"files.{fname}.bytes")


def stream_sizes(entry: dict) -> dict[str, int]:
    """The raw byte count of every stream a (validated) tensor entry must have, by stream name."""
    shape = entry["shape"]
    if entry["kind"] == "exact":
        return {"delta": math.prod(shape) * EXACT_DTYPES[entry["dtype"]]}
    n, k = shape
    bits, group, sparse = entry["bits"], entry["group_size"], entry["sparse24"]
    n_codes = k // 2 if sparse else k
    per_byte = 2 if bits == 3 else 8 // bits
    sizes = {"codes": -(-n * n_codes // per_byte)}
    if sparse:
        sizes["patterns"] = -(-(n * k // 4) // 3)
    sizes["scales"] = sizes["zeros"] = 2 * n * (k // group)
    return sizes


def any_precision_sizes(entry: dict) -> dict[str, int]:
    """Raw stream sizes of an any-precision linear: `patterns` (2:4), `plane0`.. (one bit per kept value,
    most significant plane first), `scales` (widest precision) and `ratio{b}` for each narrower one."""
    n, k = entry["shape"]
    group, sparse = entry["group_size"], entry["sparse24"]
    n_codes = k // 2 if sparse else k
    sizes = {"patterns": -(-(n * k // 4) // 3)} if sparse else {}
    for i in range(entry["bits"]):
        sizes[f"plane{i}"] = -(-n * n_codes // 8)
    sizes["scales"] = 2 * n * (k // group)  # the widest precision's fp16 scales
    for b in entry["precisions"][:-1]:
        sizes[f"ratio{b}"] = n * (k // group)  # int8 log-ratios of the narrower precisions' scales
    return sizes


def _validate_precisions(value: object, bits: int, field: str) -> None:
    """`precisions`: consecutive ascending bit widths from BITS, the widest equal to the entry's bits."""
    value = _list(value, field)
    if not value:
        raise _Fail(field, "must not be empty")
    for i, b in enumerate(value):
        _enum(b, f"{field}[{i}]", BITS)
    if value != list(range(value[0], value[0] + len(value))) or value[-1] != bits:
        raise _Fail(field, f"must be consecutive ascending bit widths ending at bits {bits}, "
                           f"not {_show(value)}")


def _validate_tensor(entry: object, where: str, compact: bool = False) -> None:
    entry = _dict(entry, where)
    for key in ("kind", "codec", "shape", "encoding", "streams"):
        if key not in entry:
            raise _Fail(f"{where}.{key}", "is missing")
    kind = _enum(entry["kind"], f"{where}.kind", tuple(KINDS))
    if entry["codec"] != KINDS[kind]:
        raise _Fail(f"{where}.codec", f"must be {KINDS[kind]!r} for a {kind} tensor, "
                                      f"not {_show(entry['codec'])}")
    _enum(entry["encoding"], f"{where}.encoding", ENCODINGS)
    shape = _list(entry["shape"], f"{where}.shape")
    if len(shape) > 8:
        raise _Fail(f"{where}.shape", f"has {len(shape)} dimensions")
    for i, dim in enumerate(shape):
        _int(dim, f"{where}.shape[{i}]", 0, MAX_DIM)
    if kind == "linear":
        for key in ("bits", "group_size", "sparse24"):
            if key not in entry:
                raise _Fail(f"{where}.{key}", "is missing")
        if len(shape) != 2:
            raise _Fail(f"{where}.shape", f"must be [out_features, in_features], not {_show(shape)}")
        _enum(entry["bits"], f"{where}.bits", BITS)
        if not isinstance(entry["sparse24"], bool):
            raise _Fail(f"{where}.sparse24", f"must be true or false, not {_show(entry['sparse24'])}")
        k = shape[1]
        group = _int(entry["group_size"], f"{where}.group_size", 1, MAX_DIM)
        if k % group:
            raise _Fail(f"{where}.group_size", f"{group} does not divide in_features {k}")
        if entry["sparse24"] and k % 32:
            raise _Fail(f"{where}.shape", f"in_features {k} is not a multiple of 32 (needed for 2:4)")
        if "precisions" in entry:
            _validate_precisions(entry["precisions"], entry["bits"], f"{where}.precisions")
    else:
        if "dtype" not in entry:
            raise _Fail(f"{where}.dtype", "is missing")
        _enum(entry["dtype"], f"{where}.dtype", tuple(EXACT_DTYPES))
    expected = stream_sizes(entry)
    if math.prod(shape) > MAX_BYTES or sum(expected.values()) > MAX_BYTES:
        raise _Fail(f"{where}.shape", f"{_show(shape)} is too large")
    streams = _list(entry["streams"], f"{where}.streams")
    seen: dict[str, int] = {}
    for i, stream in enumerate(streams):
        field = f"{where}.streams[{i}]"
        stream = _list(stream, field)
        if len(stream) != 3:
            raise _Fail(field, f"must be [name, raw_bytes, stored_bytes], not {_show(stream)}")
        sname = stream[0]
        if not isinstance(sname, str) or sname in seen:
            raise _Fail(field, f"has an invalid or repeated stream name {_show(sname)}")
        raw, stored = _int(stream[1], f"{field}[1]"), _int(stream[2], f"{field}[2]")
        if entry["encoding"] == "raw" and stored != raw:
            raise _Fail(field, f"stores {stored} bytes of a raw {raw}-byte stream")
        if entry["encoding"] == "zstd" and (raw == 0) != (stored == 0):
            raise _Fail(field, "is empty on one side only (an empty stream is stored as zero bytes)")
        seen[sname] = raw
    names = set(seen)
    allowed = [set(expected)]
    if kind == "linear":
        base = {"scales", "zeros"}
        allowed = [base | {"codes", "patterns"}] if entry["sparse24"] else [base | {"codes"}]
        if entry["sparse24"] and entry["bits"] == 2:
            n, k = shape
            expected["nibbles"] = expected["groups"] = n * k // 4
            allowed += [base | {"nibbles"}, base | {"groups"}]  # version 2 and version 1 layouts
        if compact:  # version 5: log scales (scale0 + lscales) instead of scales + zeros
            expected.update(scale0=2, lscales=expected["scales"] // 2)
            allowed += [a - {"scales", "zeros"} | {"scale0", "lscales"} for a in allowed]
        if "precisions" in entry:  # version 3 any-precision: patterns, bitplanes, per-precision scales/zeros
            expected = any_precision_sizes(entry)
            allowed = [set(expected)]
    if names not in allowed:
        raise _Fail(f"{where}.streams", f"are {sorted(names)}, expected one of "
                                        f"{' or '.join(str(sorted(a)) for a in allowed)}")
    for sname, raw in seen.items():
        if raw != expected[sname]:
            raise _Fail(f"{where}.streams.{sname}", f"has {raw} raw bytes, its shape needs {expected[sname]}")


TABLE_KEY = "tensors_sha256"  # payload metadata: sha256 of the manifest's tensor table (canonical JSON)


def tensor_table_sha256(tensors: dict) -> str:
    """sha256 of the canonical JSON of a manifest's `tensors` (sorted keys, compact): the writer records it
    in the checksummed payload's metadata, so an edit of any tensor entry is detected."""
    import hashlib

    text = json.dumps(tensors, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def stored_bytes(manifest: dict) -> int:
    """Sum of every tensor's stored stream bytes (the payload's data section, after its header)."""
    return sum(s[2] for entry in manifest["tensors"].values() for s in entry["streams"])
