"""NAME.dz/ on disk (docs/FORMAT.md, "Writing and edge cases", "Checksums"): save_delta and load_delta.

The writer (spool.write_artifact) fills a temp directory and renames it; the reader decodes while the
payload is read and hashed.
"""

from __future__ import annotations

import functools
import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from deltazip.errors import ArtifactError, ChecksumError
from deltazip.format.codec import encode_tensors
from deltazip.format.decode import decode_into_slot_layout, output_shapes
from deltazip.format.hostmem import Arena
from deltazip.format.manifest import (
    PAYLOAD,
    check_fingerprint,
    check_name,
    new_manifest,
    read_manifest,
    verify_files,
)
from deltazip.format.payload import MAX_HEADER_BYTES, PayloadError, PayloadReader, open_payload, readahead
from deltazip.format.precision import check_precision
from deltazip.format.schema import TABLE_KEY, checksum_key, stored_bytes, tensor_table_sha256
from deltazip.format.spool import write_artifact
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
               overwrite: bool = False, checksum: str = "blake3", compact: bool = False) -> Path:
    """Write NAME.dz/ atomically; `info` adds manifest fields (target, settings, stats).

    `checksum`: "blake3" (format version 4) or "sha256" (versions 2 / 3, for readers older than version 4).
    `compact`: version 5, the manifest's tensor table zstd-compressed (byte-budgeted artifacts).
    Every encoded tensor is held at once; spool.Spool writes the same bytes holding none of them.
    """
    check_name(name)
    check_fingerprint(base_fingerprint)
    blobs, entries = encode_tensors(linears, exact, lossless, compact)
    manifest = new_manifest(name, base_fingerprint, entries, info, checksum, compact)
    return write_artifact(path, manifest, {k: len(v) for k, v in blobs.items()}, lambda k: (blobs[k],),
                          overwrite)


def load_delta(path: str | Path, verify: bool = True, precision: int | None = None) -> DeltaArtifact:
    """Read NAME.dz/: decode every tensor and (unless verify=False) check the files' sizes and sha256.

    `precision` (bits) installs an any-precision artifact at one of its stored precisions (None: the widest);
    a precision the artifact does not store is an ArtifactError naming the stored ones.

    Nothing in the payload is trusted before the manifest passed its schema (deltazip/format/schema.py):
    the payload must be listed in `files`, and its size must match that entry and the streams' sizes before
    any buffer is allocated. The payload is then read once, by a thread that hashes the same bytes while this
    one decodes the tensors already read (docs/FORMAT.md, Checksums); nothing is returned unless the checksum
    matches. Every fault is an ArtifactError (ChecksumError when a file does not match its checksum).
    """
    path = Path(path)
    readahead(path / PAYLOAD)  # the disk reads while the manifest is checked; nothing is used before that
    manifest = read_manifest(path)
    check_precision(manifest, precision, str(path))
    payload = path / PAYLOAD
    meta = manifest["files"][PAYLOAD]
    if verify:
        others = {k: v for k, v in manifest["files"].items() if k != PAYLOAD}
        verify_files(path, {**manifest, "files": others})
    try:
        file = open_payload(payload)
    except OSError:
        raise (ChecksumError if verify else ArtifactError)(f"{payload}: missing from the artifact") from None
    try:
        size = os.fstat(file.fileno()).st_size
        if size != meta["bytes"]:
            raise ChecksumError(f"{payload}: size {size} bytes, manifest says {meta['bytes']} (truncated?)")
        data = stored_bytes(manifest)
        if not data + 8 <= size <= data + 8 + MAX_HEADER_BYTES:
            raise ArtifactError(f"{payload}: {size} bytes cannot hold the manifest's {data} bytes of streams")
        try:
            outs = _outputs(manifest["tensors"], precision)  # before the reader's threads start (GIL)
        except (MemoryError, RuntimeError):  # torch's allocator raises RuntimeError when memory runs out
            raise ArtifactError(f"{payload}: the decoded tensors do not fit in memory") from None
        reader = PayloadReader(payload, hash=verify and checksum_key(manifest["version"]), file=file)
    except PayloadError as e:
        file.close()
        raise ArtifactError(f"{payload}: cannot read ({e})") from None
    except BaseException:
        file.close()
        raise
    try:
        try:
            linears, exact = _decode_payload(reader, manifest["tensors"], path, precision, outs)
        except (PayloadError, ArtifactError, MemoryError) as e:
            if verify:
                _check_payload_sha(payload, reader, meta)  # corruption first
            if isinstance(e, ArtifactError):
                raise
            raise ArtifactError(f"{payload}: cannot read ({e or type(e).__name__})") from None
        if verify:
            _check_payload_sha(payload, reader, meta)
    finally:
        reader.close()
    return DeltaArtifact(path, manifest["name"], manifest, manifest["base"]["fingerprint"], linears, exact)


def _check_payload_sha(payload: Path, reader: PayloadReader, meta: dict) -> None:
    """The payload's digest (blake3 from version 4, else sha256) against its `files` entry."""
    try:
        digest = reader.hexdigest()
    except PayloadError as e:
        raise ChecksumError(f"{payload}: cannot read ({e})") from None
    if digest != meta[reader.digest_name]:
        raise ChecksumError(f"{payload}: {reader.digest_name} mismatch (corrupted)")


def _outputs(entries: dict, precision: int | None) -> dict[str, dict[str, torch.Tensor] | None]:
    """Every decoded tensor's memory, in the layout a device slot holds (deltazip.format.decode), carved out
    of one huge-page block (hostmem.Arena); None for tensors that take the reference decode. Sized from the
    validated manifest only, after the payload's size matched it."""
    shapes = {name: output_shapes(entry, precision) for name, entry in entries.items()}
    arena = Arena([shape for s in shapes.values() if s for shape in s.values()])
    return {name: s and {key: arena.take(*shape) for key, shape in s.items()} for name, s in shapes.items()}


def _decode_payload(reader: PayloadReader, entries: dict, path: Path, precision: int | None, outs: dict
                    ) -> tuple[dict[str, PackedLinear], dict[str, torch.Tensor]]:
    """Decode every manifest tensor from the payload, each as soon as its bytes are read.

    Parallel per tensor: each decoder thread takes the next tensor in file order once its bytes are read
    (zstd and the native or numpy word transforms release the GIL); with one core free the threads still
    overlap decoding with the read and the hash. `outs` (_outputs) are the tensors they fill, in the layout a
    device slot holds, so the host tier holds exactly what a slot copy needs.
    """
    spans = reader.header()

    def check_table() -> None:  # before any other fault is reported: an edited manifest names itself
        table = reader.metadata.get(TABLE_KEY)
        if table is not None and table != tensor_table_sha256(entries):  # absent in older artifacts
            raise ChecksumError(f"{path}: the manifest's tensor table does not match the payload's record "
                                "of it (the manifest was edited or damaged)")

    missing = [name for name in entries if name not in spans]
    if missing or len(spans) != len(entries):
        check_table()
        extra = [name[:100] for name in spans if name not in entries]
        raise ArtifactError(f"{path / PAYLOAD}: tensors do not match the manifest (missing {missing[:3]}, "
                            f"extra {extra[:3]})")
    for name, entry in entries.items():  # every size before any decode (and any allocation it makes)
        begin, end = spans[name]
        stored = sum(s[2] for s in entry["streams"])
        if end - begin != stored:
            check_table()
            raise ArtifactError(f"{path / PAYLOAD}: tensor {name} has {end - begin} bytes, its streams "
                                f"{stored}")
    order = sorted(entries, key=lambda n: spans[n][0])
    decoded = _per_worker(reader, order, spans, entries, precision, outs, check_table)
    linears = {n: decoded[n] for n, e in entries.items() if e["kind"] == "linear"}
    exact = {n: decoded[n] for n, e in entries.items() if e["kind"] == "exact"}
    return linears, exact


def _per_worker(reader: PayloadReader, order: list[str], spans: dict, entries: dict, precision: int | None,
                outs: dict, check_table) -> dict:
    """Each decoder thread takes the next tensor in file order (a shared counter), waits for its bytes and
    decodes it: one job per thread, not per tensor. The first failure in file order is raised, after every
    thread stopped (nothing may still read the buffer once the reader is closed)."""
    decoded: dict[str, object] = {}
    failed: dict[int, BaseException] = {}
    counter = itertools.count()

    def work() -> None:
        for i in counter:
            if i >= len(order) or failed:
                return
            name = order[i]
            begin, end = spans[name]
            try:
                blob = reader.wait(end)[begin:end]
                decoded[name] = decode_into_slot_layout(blob, entries[name], name, precision, outs[name])
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                failed[i] = e
                return

    check_table()  # before the decoders start: Python work beside them waits on the GIL (milliseconds)
    pool = _decoders()
    jobs = [pool.submit(work) for _ in range(pool._max_workers)]
    for job in jobs:
        job.result()
    if failed:
        raise failed[min(failed)]
    return decoded


@functools.cache
def _decoders() -> ThreadPoolExecutor:
    """The decoder threads shared by every load (DELTAZIP_DECODE_THREADS, default: the CPUs this process may
    use, deltazip.threads.usable_cpus)."""
    from deltazip.threads import usable_cpus

    return ThreadPoolExecutor(int(os.environ.get("DELTAZIP_DECODE_THREADS", "0")) or usable_cpus(),
                              thread_name_prefix="deltazip-decode")
