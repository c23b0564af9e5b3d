"""The payload reader (docs/FORMAT.md, "Checksums"): delta.safetensors read once, hashed while it arrives.

A background job reads the file in chunks into one buffer and a second hashes the same bytes, while the
caller decodes each tensor as soon as its bytes are in (read, sha256, decode overlap).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

CHUNK_BYTES = 1 << 18  # small enough that decoding starts early, large enough that hashing stays fast


class PayloadError(Exception):
    """The payload cannot be read or its safetensors header is malformed (the caller names the file)."""


class PayloadReader:
    """The whole file in one buffer, filled by a read job and hashed (when `hash`) by a second job that
    follows it: in a warm page cache the bytes arrive at memcpy speed and decoding never waits on sha256."""

    def __init__(self, path: Path, hash: bool = True) -> None:
        self.path = path
        self._file = open(path, "rb")  # noqa: SIM115 - closed by the reader thread
        self.size = os.fstat(self._file.fileno()).st_size
        self.buffer = memoryview(np.empty(self.size, dtype=np.uint8)).cast("B")  # not zero-filled
        self._digest = hashlib.sha256() if hash else None
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
        """The safetensors header: tensor name → absolute (begin, end) byte offsets of its uint8 data."""
        (length,) = struct.unpack("<Q", self.wait(8)[:8])
        if length > min(100_000_000, self.size - 8):
            raise PayloadError(f"safetensors header of {length} bytes does not fit the file")
        try:
            header = json.loads(bytes(self.wait(8 + length)[8:8 + length]))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PayloadError(f"invalid safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise PayloadError("invalid safetensors header")
        header.pop("__metadata__", None)
        spans, start = {}, 8 + length
        for name, info in header.items():
            begin, end = (start + int(o) for o in info["data_offsets"])
            if info.get("dtype") != "U8" or list(info.get("shape", ())) != [end - begin] or not \
                    start <= begin <= end <= self.size:
                raise PayloadError(f"tensor {name}: not a uint8 blob inside the file")
            spans[name] = (begin, end)
        return spans

    def sha256(self) -> str:
        """Wait for the reader to finish; the hex sha256 of the whole file (raises the reader's error)."""
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


@functools.cache
def _workers() -> ThreadPoolExecutor:
    """Two threads shared by all readers; a hash job only waits on its own read job, submitted before it."""
    return ThreadPoolExecutor(2, thread_name_prefix="deltazip-payload")
