"""manifest.json: build, write, read and check it; file checksums; the base fingerprint.

Implements docs/FORMAT.md, sections "manifest.json", "Checksums" and "Base fingerprint".
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from deltazip.errors import ArtifactError, ChecksumError, DeltazipError
from deltazip.hf import ModelWeights

FORMAT_NAME = "deltazip.delta"
FORMAT_VERSION = 2  # written; 2 adds the `nibbles` stream (docs/FORMAT.md)
READ_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
PAYLOAD = "delta.safetensors"


def check_name(name: str) -> None:
    """Delta names become file names and request fields: letters, digits, '.', '_', '-' only."""
    if not name or name.startswith(".") or not all(c.isalnum() or c in "._-" for c in name):
        raise DeltazipError(f"invalid delta name {name!r}: use letters, digits, '.', '_' or '-'")


def new_manifest(name: str, base_fingerprint: str, entries: dict[str, dict],
                 info: dict | None = None) -> dict:
    """The manifest of tensor `entries` (codec.encode_tensors); `info` adds fields (target, settings, stats).

    `files` and the size stats are filled in by write_manifest once the payload is on disk.
    """
    num_params = sum(int(np.prod(e["shape"])) for e in entries.values())
    raw = sum(s[1] for e in entries.values() for s in e["streams"])
    stored = sum(s[2] for e in entries.values() for s in e["streams"])
    info = dict(info or {})
    manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "name": name,
                "base": {"fingerprint": base_fingerprint, **info.pop("base", {})}, **info}
    stats = manifest.setdefault("stats", {})
    stats.update({"num_parameters": num_params, "fp16_bytes": 2 * num_params, "raw_stream_bytes": raw,
                  "stored_stream_bytes": stored, "lossless_gain": raw / max(stored, 1)})
    manifest["tensors"] = entries
    return manifest


def write_manifest(directory: Path, manifest: dict) -> None:
    """Checksum the payload in `directory` into `files`, then write manifest.json (compact, one line)."""
    payload = directory / PAYLOAD
    manifest["files"] = {PAYLOAD: {"sha256": sha256_file(payload), "bytes": payload.stat().st_size}}
    stats = manifest["stats"]
    num_params = stats["num_parameters"]
    text = ""
    for _ in range(8):  # the manifest's own size is part of the ratio: iterate to a fixed point
        total = payload.stat().st_size + len(text.encode())
        stats.update({"artifact_bytes": total, "ratio": 2 * num_params / total,
                      "bits_per_weight": 8 * total / max(num_params, 1)})
        text, previous = json.dumps(manifest, separators=(",", ":")), text
        if len(text.encode()) == len(previous.encode()):
            break
    (directory / MANIFEST).write_text(text)


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


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
