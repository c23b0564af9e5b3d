"""The delta pool: device slots ← host LRU of decoded artifacts (bounded bytes) ← disk (a store of NAME.dz/).

Disk → host runs on a loader thread (lossless decode, checksums verified once, base fingerprint checked),
or on the caller's thread when it acquires a delta nobody is loading; host → slot runs on the caller's thread
(the engine loop, between steps). A delta pinned by an in-flight request is never evicted from its slot;
concurrent misses on one delta share one load (one future per name).
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from deltazip.errors import DeltazipError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ARTIFACT_SUFFIX = ".dz"


class RequestError(DeltazipError):
    """A request that can never run as given (unknown delta, bad parameters, prompt too long)."""


def artifact_nbytes(artifact) -> int:
    """Host bytes of a decoded artifact: its packed layers plus its exact tensors."""
    return (sum(p.nbytes for p in artifact.linears.values())
            + sum(t.numel() * t.element_size() for t in artifact.exact.values()))


class DeltaPool:
    """`num_slots` device slots filled by `install(slot, artifact)` and emptied by `uninstall(slot)`."""

    def __init__(self, store_dir: str | Path, base_fingerprint: str, num_slots: int, host_cache_bytes: int,
                 install: Callable[[int, object], None], uninstall: Callable[[int], None]) -> None:
        self.store_dir = Path(store_dir)
        self.base_fingerprint = base_fingerprint
        self.num_slots, self.host_cache_bytes = num_slots, host_cache_bytes
        self.install, self.uninstall = install, uninstall
        self._lock = threading.Lock()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deltazip-delta-load")
        self._loading: dict[str, Future] = {}  # disk → host loads in flight, one per name
        self._host: OrderedDict[str, tuple[object, int]] = OrderedDict()  # name → (artifact, bytes)
        self._host_bytes = 0
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # resident deltas, least recently used first
        self._pins: dict[str, int] = {}
        self.counters = {"hits": 0, "misses": 0, "evictions": 0, "host_hits": 0, "host_misses": 0,
                         "host_evictions": 0, "disk_loads": 0, "disk_load_s": 0.0, "slot_loads": 0,
                         "slot_load_s": 0.0, "load_errors": 0}

    # -- names ---------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Deltas available in the store (NAME.dz/ directories with a manifest)."""
        if not self.store_dir.is_dir():
            return []
        return sorted(p.name[: -len(ARTIFACT_SUFFIX)] for p in self.store_dir.glob(f"*{ARTIFACT_SUFFIX}")
                      if (p / "manifest.json").is_file())

    def check_name(self, name: str) -> None:
        """Raise RequestError unless `name` is a valid delta name present in the store."""
        if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
            raise RequestError(f"invalid delta name {name!r}: use letters, digits, '.', '_' or '-'")
        if not (self.store_dir / f"{name}{ARTIFACT_SUFFIX}" / "manifest.json").is_file():
            known = ", ".join(self.names()) or "none"
            raise RequestError(f"unknown delta '{name}' in {self.store_dir} (known: {known})")

    # -- disk → host ---------------------------------------------------------------------------------------
    def prefetch(self, name: str) -> Future:
        """Start loading `name` into the host tier (no-op when there or loading); a future of the artifact."""
        with self._lock:
            if name in self._host:
                self._host.move_to_end(name)
                done: Future = Future()
                done.set_result(self._host[name][0])
                return done
            if name not in self._loading:
                self._loading[name] = self._loader.submit(self._load_from_disk, name)
            return self._loading[name]

    def ready(self, name: str) -> bool:
        """True when acquire(name) will not wait on disk (resident, on host, or its load has finished)."""
        with self._lock:
            if name in self._slot_of or name in self._host:
                return True
            future = self._loading.get(name)
        return future is not None and future.done()

    def _load_or_wait(self, name: str):
        """The artifact, loaded on this thread when no load of it is in flight (the caller would only wait
        for the loader thread: the hand-off costs milliseconds on a busy machine), else that load's result."""
        with self._lock:
            if name in self._host:
                self._host.move_to_end(name)
                return self._host[name][0]
            future = self._loading.get(name)
            if future is None:
                future = self._loading[name] = Future()
                future.set_running_or_notify_cancel()
                mine = True
            else:
                mine = False
        if not mine:
            return future.result()
        try:
            artifact = self._load_from_disk(name)  # removes the future from _loading
        except BaseException as e:
            future.set_exception(e)
            raise
        future.set_result(artifact)
        return artifact

    def _load_from_disk(self, name: str):
        from deltazip.artifact import FingerprintError, load_delta

        start = time.perf_counter()
        try:
            artifact = load_delta(self.store_dir / f"{name}{ARTIFACT_SUFFIX}", verify=True)
            if artifact.base_fingerprint != self.base_fingerprint:
                raise FingerprintError(f"delta '{name}' was made for another base (fingerprint "
                                    f"{str(artifact.base_fingerprint)[:12]}…, this base is "
                                    f"{self.base_fingerprint[:12]}…)")
        except Exception:
            with self._lock:
                self._loading.pop(name, None)
                self.counters["load_errors"] += 1
            raise
        nbytes = artifact_nbytes(artifact)
        with self._lock:
            self._loading.pop(name, None)
            self.counters["disk_loads"] += 1
            self.counters["disk_load_s"] += time.perf_counter() - start
            if nbytes <= self.host_cache_bytes:
                self._host[name] = (artifact, nbytes)
                self._host_bytes += nbytes
                while self._host_bytes > self.host_cache_bytes:
                    _, (_, evicted_bytes) = self._host.popitem(last=False)
                    self._host_bytes -= evicted_bytes
                    self.counters["host_evictions"] += 1
        return artifact

    # -- host → slot ---------------------------------------------------------------------------------------
    def acquire(self, name: str, artifact: object | None = None) -> int | None:
        """Pin `name` into a slot and return it; None when every slot is pinned by other deltas.

        `artifact`: the result of an earlier prefetch(name), used when the host tier has evicted it since.
        Waits for the disk load if needed; a failed load raises its error (nothing is cached or installed).
        """
        with self._lock:
            if self._pin_if_resident(name):
                return self._slot_of[name]
            if self._free_or_victim() is None:
                return None
            self.counters["host_hits" if name in self._host else "host_misses"] += 1
        if artifact is None:
            artifact = self._load_or_wait(name)
        with self._lock:
            if self._pin_if_resident(name):  # another thread installed it while we waited
                return self._slot_of[name]
            choice = self._free_or_victim()
            if choice is None:
                return None
            start = time.perf_counter()
            slot, victim = choice
            self.counters["misses"] += 1
            if victim is not None:
                del self._slot_of[victim]
                self._pins.pop(victim, None)
                self.counters["evictions"] += 1
                self.uninstall(slot)
            try:
                self.install(slot, artifact)  # validates before copying; on failure the slot is left empty
            except Exception:
                self.counters["load_errors"] += 1
                raise
            self._slot_of[name] = slot
            self._pins[name] = 1
            self.counters["slot_loads"] += 1
            self.counters["slot_load_s"] += time.perf_counter() - start
        return slot

    def _pin_if_resident(self, name: str) -> bool:
        if name not in self._slot_of:
            return False
        self.counters["hits"] += 1
        self._slot_of.move_to_end(name)
        self._pins[name] = self._pins.get(name, 0) + 1
        return True

    def _free_or_victim(self) -> tuple[int, str | None] | None:
        """(a free slot, None), else (the least recently used unpinned delta's slot, its name), else None."""
        used = set(self._slot_of.values())
        free = [s for s in range(self.num_slots) if s not in used]
        if free:
            return free[0], None
        victim = next((n for n in self._slot_of if self._pins.get(n, 0) == 0), None)
        return None if victim is None else (self._slot_of[victim], victim)

    def release(self, name: str) -> None:
        """Unpin one use of `name` (it stays resident until evicted)."""
        with self._lock:
            if self._pins.get(name, 0) > 0:
                self._pins[name] -= 1

    def evict(self, name: str) -> bool:
        """Drop `name` from its slot and the host tier (an unload); False when in-flight requests pin it."""
        with self._lock:
            if self._pins.get(name, 0) > 0:
                return False
            if name in self._slot_of:
                self.uninstall(self._slot_of.pop(name))
                self._pins.pop(name, None)
                self.counters["evictions"] += 1
            if name in self._host:
                self._host_bytes -= self._host.pop(name)[1]
            return True

    def pinned(self, name: str) -> int:
        with self._lock:
            return self._pins.get(name, 0)

    def resident(self) -> dict[str, int]:
        """Deltas in device slots: name → slot."""
        with self._lock:
            return dict(self._slot_of)

    def host_resident(self) -> list[str]:
        with self._lock:
            return list(self._host)

    def stats(self) -> dict:
        with self._lock:
            return {**self.counters, "slots_used": len(self._slot_of), "slots": self.num_slots,
                    "host_bytes": self._host_bytes, "host_cache_bytes": self.host_cache_bytes,
                    "host_entries": len(self._host)}

    def close(self) -> None:
        self._loader.shutdown(wait=True, cancel_futures=True)
