"""NAME.dz/ on disk (docs/FORMAT.md, "Writing and edge cases", "Checksums"): save_delta and load_delta.

The writer fills a temp directory and renames it; the reader decodes while the payload is read and hashed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deltazip.errors import ArtifactError, ChecksumError
from deltazip.format.codec import decode_tensor, encode_tensors
from deltazip.format.manifest import (
    FORMAT_NAME,
    PAYLOAD,
    check_name,
    new_manifest,
    read_manifest,
    verify_files,
    write_manifest,
)
from deltazip.format.payload import PayloadError, PayloadReader
from deltazip.fsutil import atomic_dir
from deltazip.packed import PackedLinear


@dataclass
class DeltaArtifact:
    """A loaded delta: packed linears (HF module names) and exact deltas (HF parameter names)."""

    path: Path
    name: str
    manifest: dict
    base_fingerprint: str
    linears: dict[str, PackedLinear]
    exact: dict[str, torch.Tensor]


def save_delta(path: str | Path, name: str, base_fingerprint: str, linears: dict[str, PackedLinear],
               exact: dict[str, torch.Tensor], info: dict | None = None, lossless: str = "zstd",
               overwrite: bool = False) -> Path:
    """Write NAME.dz/ atomically; `info` adds manifest fields (target, settings, stats)."""
    from safetensors.numpy import save_file

    check_name(name)
    blobs, entries = encode_tensors(linears, exact, lossless)
    manifest = new_manifest(name, base_fingerprint, entries, info)
    with atomic_dir(path, overwrite) as tmp:
        arrays = {k: np.frombuffer(v, dtype=np.uint8) for k, v in blobs.items()}
        payload = tmp / PAYLOAD
        save_file(arrays, str(payload), metadata={"format": FORMAT_NAME})
        payload.chmod(0o644)
        write_manifest(tmp, manifest)
    return Path(path)


def load_delta(path: str | Path, verify: bool = True) -> DeltaArtifact:
    """Read NAME.dz/: decode every tensor and (unless verify=False) check the files' sizes and sha256.

    The payload is read once, by a thread that hashes the same bytes while this one decodes the tensors
    already read (docs/FORMAT.md, Checksums); nothing is returned unless the checksum matches.
    """
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


def _check_payload_size(payload: Path, reader: PayloadReader | None, meta: dict | None) -> None:
    if meta is None:
        return
    if reader is None:
        raise ChecksumError(f"{payload}: missing from the artifact")
    if reader.size != meta["bytes"]:
        raise ChecksumError(f"{payload}: size {reader.size} bytes, manifest says {meta['bytes']} "
                            "(truncated?)")


def _check_payload_sha(payload: Path, reader: PayloadReader, meta: dict | None) -> None:
    if meta is None:
        return
    try:
        digest = reader.sha256()
    except PayloadError as e:
        raise ChecksumError(f"{payload}: cannot read ({e})") from None
    if digest != meta["sha256"]:
        raise ChecksumError(f"{payload}: sha256 mismatch (corrupted)")


def _decode_payload(reader: PayloadReader, entries: dict,
                    path: Path) -> tuple[dict[str, PackedLinear], dict[str, torch.Tensor]]:
    """Decode every manifest tensor from the payload, in file order, each as soon as its bytes are read.

    One thread: a pool of 2 decoder threads measured slower (busy 2-core machine, GIL hand-offs).
    """
    spans = reader.header()
    missing = [name for name in entries if name not in spans]
    if missing or len(spans) != len(entries):
        extra = [name for name in spans if name not in entries]
        raise ArtifactError(f"{path / PAYLOAD}: tensors do not match the manifest (missing {missing[:3]}, "
                            f"extra {extra[:3]})")
    decoded = {}
    for name in sorted(entries, key=lambda n: spans[n][0]):
        begin, end = spans[name]
        decoded[name] = decode_tensor(reader.wait(end)[begin:end], entries[name], name)
    linears = {n: decoded[n] for n, e in entries.items() if e["kind"] == "linear"}
    exact = {n: decoded[n] for n, e in entries.items() if e["kind"] == "exact"}
    return linears, exact
