"""The payload reader (docs/FORMAT.md, "Checksums"): delta.safetensors read once, hashed while it arrives.

A background job reads the file in chunks into one buffer and a second hashes the same bytes, while the
caller decodes each tensor as soon as its bytes are in (read, sha256, decode overlap).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import stat
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from deltazip.format.hostmem import host_block

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
CHUNK_BYTES = 1 << 18  # small enough that decoding starts early, large enough that hashing stays fast


class PayloadError(Exception):
    """The payload cannot be read or its safetensors header is malformed (the caller names the file)."""


class PayloadReader:
    """The whole file in one buffer, filled by a read job and hashed (when `hash`) by a second job that
    follows it: in a warm page cache the bytes arrive at memcpy speed and decoding never waits on the hash
    (blake3 for version 4 artifacts, several GB/s; sha256 for older ones)."""

    def __init__(self, path: Path, hash: bool | str = True, file=None) -> None:
        """`file`: the payload already opened (open_payload) and its size checked by the caller; `hash`:
        False, True (sha256) or the digest's name ("sha256", "blake3")."""
        self.path = path
        self._file = file if file is not None else open_payload(path)
        self.size = os.fstat(self._file.fileno()).st_size
        try:
            self._block = host_block(self.size)  # not zero-filled; huge pages when large (hostmem.py)
            self.buffer = memoryview(self._block.numpy()).cast("B")
        except MemoryError:
            self._file.close()
            raise PayloadError(f"{self.size} bytes do not fit in memory") from None
        self.digest_name = ("sha256" if hash is True else hash) if hash else None
        self._digest = _hasher(self.digest_name) if hash else None
        self.metadata: dict[str, str] = {}  # the header's __metadata__ (after header())
        self._available = 0
        self._done = False
        self._error: BaseException | None = None
        self._stop = False
        self._cond = threading.Condition()
        # persistent workers: Thread.start() waits until the new thread runs, milliseconds on a busy machine
        self._jobs = [_workers().submit(self._read)] + ([_workers().submit(self._hash)] if hash else [])

    def _read(self) -> None:
        try:
            with self._file:
                pos = 0
                while pos < self.size and not self._stop:
                    n = self._file.readinto(self.buffer[pos:pos + CHUNK_BYTES])
                    if not n:
                        raise PayloadError(f"file shrank to {pos} bytes while reading")
                    pos += n
                    with self._cond:
                        self._available = pos
                        self._cond.notify_all()
        except BaseException as e:  # handed to the caller's thread
            self._error = e
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def _hash(self) -> None:
        hashed = 0
        while True:
            with self._cond:
                while self._available == hashed and not self._done:
                    self._cond.wait()
                end = self._available
            if end == hashed:
                return
            self._digest.update(self.buffer[hashed:end])  # releases the GIL
            hashed = end

    def wait(self, end: int) -> memoryview:
        """The buffer, once bytes [0, end) have been read (raises the reader's error, if any)."""
        if end > self.size:
            raise PayloadError(f"data ends at byte {end} but the file has {self.size} (truncated?)")
        with self._cond:
            while self._available < end and not self._done:
                self._cond.wait()
        if self._available < end:
            raise PayloadError(str(self._error))
        return self.buffer

    def header(self) -> dict[str, tuple[int, int]]:
        """The safetensors header: tensor name → absolute (begin, end) byte offsets of its uint8 data.

        Every entry must be a uint8 blob, and the blobs must tile the data section exactly (safetensors:
        contiguous, no gaps or overlaps, ending at the end of the file)."""
        if self.size < 8:
            raise PayloadError(f"{self.size} bytes: too short for a safetensors header")
        (length,) = struct.unpack("<Q", self.wait(8)[:8])
        if length > min(MAX_HEADER_BYTES, self.size - 8):
            raise PayloadError(f"safetensors header of {length} bytes does not fit the file")
        try:
            header = json.loads(bytes(self.wait(8 + length)[8:8 + length]).decode("utf-8"),
                                object_pairs_hook=_unique_keys)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, duplicate keys
            raise PayloadError(f"invalid safetensors header ({str(e)[:200]})") from None
        if not isinstance(header, dict):
            raise PayloadError("invalid safetensors header")
        metadata = header.pop("__metadata__", None)
        if metadata is not None and not (isinstance(metadata, dict)
                                         and all(isinstance(v, str) for v in metadata.values())):
            raise PayloadError("invalid safetensors metadata (a map of strings is required)")
        self.metadata = metadata or {}
        spans, start = {}, 8 + length
        for name, info in header.items():
            offsets = info.get("data_offsets") if isinstance(info, dict) else None
            if not (isinstance(offsets, list) and len(offsets) == 2
                    and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
                raise PayloadError(f"tensor {name[:100]}: invalid safetensors entry")
            begin, end = start + offsets[0], start + offsets[1]
            if info.get("dtype") != "U8" or info.get("shape") != [end - begin] or not \
                    start <= begin <= end <= self.size:
                raise PayloadError(f"tensor {name[:100]}: not a uint8 blob inside the file")
            spans[name] = (begin, end)
        position = start
        for begin, end in sorted(spans.values()):
            if begin != position:
                raise PayloadError(f"tensor data has a gap or an overlap at byte {begin}")
            position = end
        if position != self.size:
            raise PayloadError(f"tensor data ends at byte {position} but the file has {self.size}")
        return spans

    def sha256(self) -> str:
        """Wait for the reader to finish; the hex digest of the whole file (raises the reader's error).

        The digest named at construction (sha256 unless "blake3" was asked for): see hexdigest."""
        return self.hexdigest()

    def hexdigest(self) -> str:
        """Wait for the reader to finish; the hex digest of the whole file (raises the reader's error)."""
        for job in self._jobs:
            job.result()
        if self._error is not None:
            raise PayloadError(str(self._error))
        if self._digest is None:
            raise RuntimeError("this reader was opened without hashing")
        return self._digest.hexdigest()

    def close(self) -> None:
        """Stop reading (if still going) and wait for the reader thread."""
        self._stop = True
        for job in self._jobs:
            job.result()


def _hasher(name: str):
    if name == "blake3":
        import blake3

        return blake3.blake3()  # one thread: the read and decode jobs use the other core
    if name != "sha256":
        raise ValueError(f"unknown digest {name!r}")
    return hashlib.sha256()


def _unique_keys(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate tensor names")
    return out


def open_payload(path: Path):
    """The payload opened for reading, without blocking (a FIFO never hangs the reader); OSError unless it
    is a regular file."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    file = open(fd, "rb")  # noqa: SIM115 - the reader thread closes it
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        file.close()
        raise IsADirectoryError(f"{path}: not a regular file")
    return file


READAHEAD_LIMIT = 1 << 30


def readahead(path: Path) -> None:
    """Ask the kernel to start reading a regular file into the page cache (its first GiB), without waiting
    and without reading anything into this process: a hint only, every failure ignored."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, min(st.st_size, READAHEAD_LIMIT), os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


@functools.cache
def _workers() -> ThreadPoolExecutor:
    """Two threads shared by all readers; a hash job only waits on its own read job, submitted before it."""
    return ThreadPoolExecutor(2, thread_name_prefix="deltazip-payload")
