"""Writing delta.safetensors in bounded memory, and spooling encoded tensors to disk until then.

`write_payload` writes the safetensors file byte for byte as `safetensors.numpy.save_file` writes it for
uint8 blobs (8-byte little-endian header length, compact JSON header padded with spaces to a multiple of
8, `__metadata__` first, then the tensors sorted by name, each `{"dtype":"U8","shape":[n],"data_offsets":
[begin,end]}`, then the blobs in that order), streaming each blob in bounded chunks and hashing the bytes
as they are written. The one freedom: save_file writes the metadata keys in hash-map order (it varies from
process to process); here they are sorted, so the same tensors always give the same file.

`Spool` lets the compressor hand over each tensor as soon as it is final (a finished decoder block, the
embedding, the lm_head): the tensor is encoded at once (codec.encode_tensors: the bytes save_delta would
store), its blob appended to an unnamed temporary file beside the artifact, and only its manifest entry and
its place in the file are kept. `Spool.save` then writes NAME.dz/ atomically (fsutil.atomic_dir) from the
spool: the memory held no longer grows with the number of tensors.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from deltazip.format.codec import encode_tensors
from deltazip.format.manifest import (
    FORMAT_NAME,
    PAYLOAD,
    check_fingerprint,
    check_name,
    new_hasher,
    new_manifest,
    write_manifest,
)
from deltazip.format.schema import TABLE_KEY, checksum_key, tensor_table_sha256
from deltazip.fsutil import atomic_dir
from deltazip.packed import PackedLinear

CHUNK_BYTES = 4 << 20  # bytes of a blob read from the spool (and written) at a time


def payload_header(sizes: dict[str, int], metadata: dict[str, str]) -> bytes:
    """The first bytes of delta.safetensors (length and JSON header) for blobs of `sizes` bytes."""
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for name in sorted(sizes):  # safetensors: by dtype (all U8), then by name (UTF-8 byte order)
        header[name] = {"dtype": "U8", "shape": [sizes[name]], "data_offsets": [offset, offset + sizes[name]]}
        offset += sizes[name]
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_payload(path: Path, sizes: dict[str, int], chunks: Callable[[str], Iterable[bytes]],
                  metadata: dict[str, str], digest: str) -> str:
    """Write the payload of blobs `sizes` (name → bytes), each blob's bytes given by `chunks(name)`; returns
    the file's hex digest (`digest`: "blake3" or "sha256"), computed from the bytes as they are written."""
    hasher = new_hasher(digest)
    with open(path, "wb") as f:
        head = payload_header(sizes, metadata)
        f.write(head)
        hasher.update(head)
        for name in sorted(sizes):
            written = 0
            for chunk in chunks(name):
                f.write(chunk)
                hasher.update(chunk)
                written += len(chunk)
            if written != sizes[name]:
                raise OSError(f"tensor {name}: {written} bytes written, {sizes[name]} expected")
    path.chmod(0o644)
    return hasher.hexdigest()


def write_artifact(path: str | Path, manifest: dict, sizes: dict[str, int],
                   chunks: Callable[[str], Iterable[bytes]], overwrite: bool) -> Path:
    """NAME.dz/ atomically: the payload (write_payload), then manifest.json with its checksum."""
    with atomic_dir(path, overwrite) as tmp:
        metadata = {"format": FORMAT_NAME, TABLE_KEY: tensor_table_sha256(manifest["tensors"])}
        digest_name = checksum_key(manifest["version"])
        digest = write_payload(tmp / PAYLOAD, sizes, chunks, metadata, digest_name)
        write_manifest(tmp, manifest, digest)
    return Path(path)


class Spool:
    """Encoded tensors in an unnamed temporary file (gone when closed or when the process dies).

    Keeps per tensor only its manifest entry and (offset, length) in the file (`spooled_bytes`: its size).
    """

    def __init__(self, directory: str | Path, lossless: str = "zstd", compact: bool = False) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._file = tempfile.TemporaryFile(dir=directory, prefix=".deltazip-spool-")
        self.lossless, self.compact = lossless, compact
        self.linears: dict[str, dict] = {}  # manifest entries, in the order save_delta would list them
        self.exact: dict[str, dict] = {}
        self.spans: dict[str, tuple[int, int]] = {}
        self.spooled_bytes = 0

    def add(self, linears: dict[str, PackedLinear], exact: dict[str, torch.Tensor]) -> None:
        """Encode and spool these tensors (linears listed before exact tensors, each in the given order)."""
        for name, packed in linears.items():
            self._put(name, *encode_tensors({name: packed}, {}, self.lossless, self.compact), self.linears)
        for name, delta in exact.items():
            self._put(name, *encode_tensors({}, {name: delta}, self.lossless, self.compact), self.exact)

    def _put(self, name: str, blobs: dict[str, bytes], entries: dict[str, dict], table: dict) -> None:
        if name in self.spans:
            raise ValueError(f"tensor {name} spooled twice")
        blob = blobs.pop(name)
        self._file.write(blob)
        self.spans[name] = (self.spooled_bytes, len(blob))
        self.spooled_bytes += len(blob)
        table[name] = entries[name]

    def entries(self) -> dict[str, dict]:
        """Every spooled tensor's manifest entry: linears first, then exact tensors (codec.encode_tensors)."""
        return {**self.linears, **self.exact}

    def chunks(self, name: str) -> Iterator[bytes]:
        """The blob of `name`, read back CHUNK_BYTES at a time."""
        self._file.flush()
        offset, length = self.spans[name]
        end = offset + length
        while offset < end:
            chunk = os.pread(self._file.fileno(), min(CHUNK_BYTES, end - offset), offset)
            if not chunk:
                raise OSError(f"spool file ends before tensor {name}'s bytes")
            offset += len(chunk)
            yield chunk

    def save(self, path: str | Path, name: str, base_fingerprint: str, info: dict | None = None,
             overwrite: bool = False, checksum: str = "blake3") -> Path:
        """Write NAME.dz/ from the spool: the bytes save_delta writes for the same tensors."""
        check_name(name)
        check_fingerprint(base_fingerprint)
        manifest = new_manifest(name, base_fingerprint, self.entries(), info, checksum, self.compact)
        return write_artifact(path, manifest, {n: span[1] for n, span in self.spans.items()}, self.chunks,
                              overwrite)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
