"""manifest.json: build, write, read and check it; file checksums; the base fingerprint.

Implements docs/FORMAT.md, sections "manifest.json", "Checksums" and "Base fingerprint".
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import numpy as np

from deltazip.errors import ArtifactError, ChecksumError, DeltazipError
from deltazip.format.schema import (
    COMPACT_KEY,
    COMPACT_VERSION,
    FINGERPRINT_RE,
    FORMAT_NAME,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    MAX_NAME,
    NAME_RE,
    PAYLOAD,
    READ_VERSIONS,
    checksum_key,
    inflate_tensors,
    parse_manifest,
    validate_manifest,
)
from deltazip.hf import ModelWeights

FORMAT_VERSION = 4  # written; 4 records blake3 file checksums (docs/FORMAT.md); 2 and 3 still read
# written with compact=True (budgeted artifacts): blake3 and the tensor table as `tensors_zstd`
SHA256_VERSION = 2  # written with checksum="sha256" (the layout older readers know); 2 adds `nibbles`
ANY_PRECISION_VERSION = 3  # ... or this when a linear is any-precision (bitplanes; version 2 readers refuse)
__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "MANIFEST", "PAYLOAD", "READ_VERSIONS", "check_fingerprint",
           "check_name", "file_digest", "fingerprint_model", "new_manifest", "read_manifest", "sha256_file",
           "verify_files", "write_manifest"]


def check_name(name: str) -> None:
    """Delta names become file names and request fields: ASCII letters, digits, '.', '_', '-' only, not
    starting with '.', at most 128 characters (the rule the manifest schema checks on read)."""
    if not isinstance(name, str) or len(name) > MAX_NAME or not NAME_RE.fullmatch(name):
        raise DeltazipError(f"invalid delta name {name!r}: use letters, digits, '.', '_' or '-' "
                            f"(not starting with '.', at most {MAX_NAME} characters)")


def check_fingerprint(fingerprint: str) -> None:
    """A base fingerprint as fingerprint_model returns it: 'sha256:' and 64 lowercase hex digits."""
    if not isinstance(fingerprint, str) or not FINGERPRINT_RE.fullmatch(fingerprint):
        raise DeltazipError(f"invalid base fingerprint {str(fingerprint)[:80]!r}: expected 'sha256:' and 64 "
                            "hex digits (fingerprint_model)")


def new_manifest(name: str, base_fingerprint: str, entries: dict[str, dict],
                 info: dict | None = None, checksum: str = "blake3", compact: bool = False) -> dict:
    """The manifest of tensor `entries` (codec.encode_tensors); `info` adds fields (target, settings, stats).

    `files` and the size stats are filled in by write_manifest once the payload is on disk. `checksum`
    "blake3" writes version 4; "sha256" the older versions 2 / 3 (what readers before version 4 accept).
    `compact` (blake3 only) writes version 5, whose manifest.json stores the tensor table zstd-compressed.
    """
    num_params = sum(int(np.prod(e["shape"])) for e in entries.values())
    raw = sum(s[1] for e in entries.values() for s in e["streams"])
    stored = sum(s[2] for e in entries.values() for s in e["streams"])
    info = dict(info or {})
    if checksum not in ("blake3", "sha256"):
        raise ValueError(f"unknown checksum {checksum!r} (blake3 or sha256)")
    if compact and checksum != "blake3":
        raise ValueError("a compact manifest (version 5) needs blake3 checksums")
    any_precision = any("precisions" in e for e in entries.values())
    version = (COMPACT_VERSION if compact else FORMAT_VERSION if checksum == "blake3"
               else ANY_PRECISION_VERSION if any_precision else SHA256_VERSION)
    manifest = {"format": FORMAT_NAME, "version": version, "name": name,
                "base": {"fingerprint": base_fingerprint, **info.pop("base", {})}, **info}
    stats = manifest.setdefault("stats", {})
    stats.update({"num_parameters": num_params, "fp16_bytes": 2 * num_params, "raw_stream_bytes": raw,
                  "stored_stream_bytes": stored, "lossless_gain": raw / max(stored, 1)})
    manifest["tensors"] = entries
    return manifest


def write_manifest(directory: Path, manifest: dict, payload_digest: str | None = None) -> None:
    """Checksum the payload in `directory` into `files`, then write manifest.json (compact, one line).

    `payload_digest`: the payload's digest (the one its version names) computed while it was written."""
    payload = directory / PAYLOAD
    digest = checksum_key(manifest["version"])
    payload_digest = payload_digest or file_digest(payload, digest)
    manifest["files"] = {PAYLOAD: {digest: payload_digest, "bytes": payload.stat().st_size}}
    stats = manifest["stats"]
    num_params = stats["num_parameters"]
    text = ""
    for _ in range(8):  # the manifest's own size is part of the ratio: iterate to a fixed point
        total = payload.stat().st_size + len(text.encode())
        stats.update({"artifact_bytes": total, "ratio": 2 * num_params / total,
                      "bits_per_weight": 8 * total / max(num_params, 1)})
        text, previous = manifest_text(manifest), text
        if len(text.encode()) == len(previous.encode()):
            break
    (directory / MANIFEST).write_text(text)


def manifest_text(manifest: dict) -> str:
    """manifest.json as written: compact JSON; from version 5 the tensor table as `tensors_zstd` (base64 of
    one zstd-19 frame of its compact JSON)."""
    if manifest.get("version", 0) < COMPACT_VERSION or "tensors" not in manifest:
        return json.dumps(manifest, separators=(",", ":"))
    import base64

    import zstandard

    table = json.dumps(manifest["tensors"], separators=(",", ":")).encode()
    packed = base64.b64encode(zstandard.ZstdCompressor(level=19).compress(table)).decode("ascii")
    out = {COMPACT_KEY if k == "tensors" else k: packed if k == "tensors" else v for k, v in manifest.items()}
    return json.dumps(out, separators=(",", ":"))


def read_manifest(path: str | Path) -> dict:
    """Parse manifest.json of an artifact directory and validate it against the schema (deltazip/format/
    schema.py): every field the reader uses, each stream's size from its tensor's shape, the payload listed
    in `files`. Any fault is one ArtifactError line naming the file and the field."""
    path = Path(path)
    file = path / MANIFEST
    try:
        text = read_regular_file(file, MAX_MANIFEST_BYTES + 1)
    except OSError:
        raise ArtifactError(f"{path}: not a delta artifact (no readable {MANIFEST})") from None
    return validate_manifest(inflate_tensors(parse_manifest(text, str(file)), str(file)), str(file))


def read_regular_file(file: Path, limit: int) -> bytes:
    """At most `limit` bytes of a regular file (opened non-blocking: a FIFO or device never hangs the reader;
    anything but a regular file is an OSError)."""
    fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise IsADirectoryError(f"{file}: not a regular file")
        return f.read(limit)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def new_hasher(digest: str):
    """A hash object of the named file checksum ("blake3" or "sha256"), with update() and hexdigest()."""
    if digest == "blake3":
        import blake3

        return blake3.blake3()
    return hashlib.sha256()


def file_digest(path: Path, digest: str = "sha256") -> str:
    """Hex blake3 or sha256 of a file, read in 1 MiB blocks."""
    hasher = new_hasher(digest)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def verify_files(path: Path, manifest: dict) -> None:
    """Check every listed file's size and checksum (blake3 from version 4, else sha256); raise ChecksumError
    naming the first bad file.

    `manifest` must have passed read_manifest (file names are plain names, sizes integers)."""
    for fname, meta in manifest["files"].items():
        file = path / fname
        try:
            st = os.stat(file)
        except OSError:
            raise ChecksumError(f"{file}: missing from the artifact") from None
        if not stat.S_ISREG(st.st_mode):
            raise ChecksumError(f"{file}: not a regular file")
        if st.st_size != meta["bytes"]:
            raise ChecksumError(f"{file}: size {st.st_size} bytes, manifest says {meta['bytes']} "
                                "(truncated?)")
        digest = checksum_key(manifest["version"])
        if file_digest(file, digest) != meta[digest]:
            raise ChecksumError(f"{file}: {digest} mismatch (corrupted)")


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
