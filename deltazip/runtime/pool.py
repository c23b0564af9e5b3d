"""The delta pool: device slots ← host LRU of decoded artifacts (bounded bytes) ← disk (a store of NAME.dz/).

Disk → host runs on a loader thread (lossless decode, checksums verified once, base fingerprint checked),
or on the caller's thread when it acquires a delta nobody is loading; host → slot runs on the caller's thread
(the engine loop, between steps). A delta pinned by an in-flight request is never evicted from its slot;
concurrent misses on one delta share one load (one future per version).
Slightly over 400 lines: one class whose single lock guards every tier; split, that lock would span modules.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from deltazip.errors import RequestError, shorten

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ARTIFACT_SUFFIX = ".dz"


def artifact_nbytes(artifact) -> int:
    """Host bytes of a decoded artifact: its packed layers plus its exact tensors (counted once per load)."""
    cached = getattr(artifact, "pool_nbytes", None)
    if cached is not None:
        return cached
    return (sum(p.nbytes for p in artifact.linears.values())
            + sum(t.numel() * t.element_size() for t in artifact.exact.values()))


class DeltaPool:
    """`num_slots` device slots filled by `install(slot, artifact)` and emptied by `uninstall(slot)`.

    Every tier is keyed by the artifact's *identity* — (name, real path of NAME.dz, inode and mtime of its
    manifest) — not by its name alone, so a variant replaced in the store (`deltazip variants add` swaps a
    symlink to a new immutable version directory) is loaded afresh while requests already running keep the
    old version's slot. `retire(name)` drops old versions once unpinned; `block(name)` refuses new requests
    (a removal in progress).
    """

    def __init__(self, store_dir: str | Path, base_fingerprint: str, num_slots: int, host_cache_bytes: int,
                 install: Callable[[int, object], None], uninstall: Callable[[int], None],
                 precision_policy=None) -> None:
        self.store_dir = Path(store_dir)
        self.precision_policy = precision_policy  # runtime.precision.PrecisionPolicy; None: the widest
        self.base_fingerprint = base_fingerprint
        self.num_slots, self.host_cache_bytes = num_slots, host_cache_bytes
        self.install, self.uninstall = install, uninstall
        self._lock = threading.Lock()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deltazip-delta-load")
        self._loading: dict[tuple, Future] = {}  # disk → host loads in flight, one per identity
        self._host: OrderedDict[tuple, tuple[object, int]] = OrderedDict()  # key → (artifact, bytes)
        self._host_bytes = 0
        self._slot_of: OrderedDict[tuple, int] = OrderedDict()  # resident versions, least recently used first
        self._slot_bytes: dict[tuple, int] = {}
        self._pins: dict[tuple, int] = {}
        self._retired: set[tuple] = set()  # replaced versions: never cached again, dropped at their last use
        self._blocked: set[str] = set()  # names being removed: new requests are refused
        self.counters = {"hits": 0, "misses": 0, "evictions": 0, "host_hits": 0, "host_misses": 0,
                         "host_evictions": 0, "disk_loads": 0, "disk_load_s": 0.0, "slot_loads": 0,
                         "slot_load_s": 0.0, "load_errors": 0}
        self.per_variant: dict[str, dict] = {}  # name → swap_ins, swap_in_s, disk_loads, disk_load_s
        from deltazip.fsutil import clean_stale

        clean_stale(self.store_dir)  # leftovers of writers killed while saving into the store

    # -- names ---------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Deltas available in the store (NAME.dz/ directories or symlinks to them, with a manifest)."""
        if not self.store_dir.is_dir():
            return []
        return sorted(p.name[: -len(ARTIFACT_SUFFIX)] for p in self.store_dir.glob(f"*{ARTIFACT_SUFFIX}")
                      if not p.name.startswith(".") and (p / "manifest.json").is_file()
                      and self._inside_store(p))

    def _inside_store(self, entry: Path) -> bool:
        """The entry's real path lies inside the store (a symlink may point at `.versions/…`, never out)."""
        root = os.path.realpath(self.store_dir)
        real = os.path.realpath(entry)
        return real != root and os.path.commonpath([root, real]) == root

    def check_name(self, name: str) -> None:
        """Raise RequestError unless `name` is a valid delta name present in the store (and not blocked)."""
        if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
            raise RequestError(f"invalid delta name {shorten(name)}: use up to 128 letters, digits, '.', '_' "
                               f"or '-'")
        if name in self._blocked:
            raise RequestError(f"unknown delta '{name}': it is being removed")
        if not (self.store_dir / f"{name}{ARTIFACT_SUFFIX}" / "manifest.json").is_file():
            # the answer goes to remote clients: neither the store's path nor the other names
            raise RequestError(f"unknown delta '{name}': the store has no such variant")

    def identity(self, name: str) -> tuple:
        """The key of the version of `name` the store holds now: (name, real path, then inode, size and mtime
        of its manifest and of its payload).

        A changed manifest or payload (rewritten, truncated, deleted) is a new key: the next request loads and
        verifies it again, so a corrupted or removed artifact is noticed at once rather than served from the
        host tier; requests already running keep the copy that was verified when it was loaded."""
        entry = self.store_dir / f"{name}{ARTIFACT_SUFFIX}"
        real = os.path.realpath(entry)
        try:
            st = os.stat(os.path.join(real, "manifest.json"))
        except OSError:
            raise RequestError(f"unknown delta '{name}': the store has no such variant") from None
        if not self._inside_store(entry):
            raise RequestError(f"delta '{name}' refused: its store entry points outside the store")
        try:
            payload = os.stat(os.path.join(real, "delta.safetensors"))
            payload_id = (payload.st_ino, payload.st_size, payload.st_mtime_ns)
        except OSError:
            payload_id = (None, None, None)  # the load reports the missing file
        return (name, real, st.st_ino, st.st_size, st.st_mtime_ns, *payload_id)

    def _drop_stale(self, key: tuple) -> None:
        """Drop host copies of earlier states of the same directory (its files changed on disk)."""
        for old in [k for k in self._host if k[:2] == key[:2] and k != key]:
            self._drop_host(old)

    def _variant(self, name: str) -> dict:
        return self.per_variant.setdefault(name, {"swap_ins": 0, "swap_in_s": 0.0, "disk_loads": 0,
                                                  "disk_load_s": 0.0, "requests": 0, "precision_bits": 0})

    def _precision(self, name: str, real: str) -> int | None:
        """The precision the policy installs `name` at (None: the artifact's widest / only one)."""
        policy = self.precision_policy
        if policy is None or policy.policy == "max":
            return None
        from deltazip.format import read_manifest
        from deltazip.format.precision import stored_precisions

        stored = stored_precisions(read_manifest(Path(real)))
        with self._lock:
            fill = self._host_bytes / max(self.host_cache_bytes, 1)
            requests = {n: v.get("requests", 0) for n, v in self.per_variant.items()}
        return policy.choose(name, stored, fill, requests)

    # -- disk → host ---------------------------------------------------------------------------------------
    def prefetch(self, name: str) -> Future:
        """Start loading the store's current version of `name` into the host tier (no-op when there or
        loading); a future of the artifact."""
        with self._lock:
            if name in self._blocked:
                raise RequestError(f"unknown delta '{name}': it is being removed")
            key = self.identity(name)
            self._drop_stale(key)
            if key in self._host:
                self._host.move_to_end(key)
                done: Future = Future()
                done.set_result(self._host[key][0])
                return done
            if key not in self._loading:
                self._loading[key] = self._loader.submit(self._load_from_disk, key)
            return self._loading[key]

    def ready(self, name: str) -> bool:
        """True when acquire(name) will not wait on disk (resident, on host, or its load has finished)."""
        with self._lock:
            try:
                key = self.identity(name)
            except RequestError:
                return False
            if key in self._slot_of or key in self._host:
                return True
            future = self._loading.get(key)
        return future is not None and future.done()

    def _load_or_wait(self, key: tuple):
        """The artifact, loaded on this thread when no load of it is in flight (the caller would only wait
        for the loader thread: the hand-off costs milliseconds on a busy machine), else that load's result."""
        with self._lock:
            if key in self._host:
                self._host.move_to_end(key)
                return self._host[key][0]
            future = self._loading.get(key)
            if future is None:
                future = self._loading[key] = Future()
                future.set_running_or_notify_cancel()
                mine = True
            else:
                mine = False
        if not mine:
            return future.result()
        try:
            artifact = self._load_from_disk(key)  # removes the future from _loading
        except BaseException as e:
            future.set_exception(e)
            raise
        future.set_result(artifact)
        return artifact

    def _load_from_disk(self, key: tuple):
        from deltazip.format import ArtifactError, FingerprintError, load_delta

        name, real = key[0], key[1]
        start = time.perf_counter()
        try:
            artifact = load_delta(Path(real), verify=True,  # the version's own directory, never the link
                                  precision=self._precision(name, real))
            if artifact.name != name:
                raise ArtifactError(f"delta '{name}' refused: its manifest names it '{artifact.name}' (a "
                                    "store entry must be named after its delta)")
            if artifact.base_fingerprint != self.base_fingerprint:
                raise FingerprintError(f"delta '{name}' was made for another base (fingerprint "
                                    f"{str(artifact.base_fingerprint)[:12]}…, this base is "
                                    f"{self.base_fingerprint[:12]}…)")
        except Exception:
            with self._lock:
                self._loading.pop(key, None)
                self.counters["load_errors"] += 1
            raise
        artifact.pool_key = key
        nbytes = artifact.pool_nbytes = artifact_nbytes(artifact)
        seconds = time.perf_counter() - start
        with self._lock:
            self._loading.pop(key, None)
            self.counters["disk_loads"] += 1
            self.counters["disk_load_s"] += seconds
            variant = self._variant(name)
            variant["disk_loads"] += 1
            variant["disk_load_s"] += seconds
            variant["precision_bits"] = max((p.bits for p in artifact.linears.values()), default=0)
            if nbytes <= self.host_cache_bytes and key not in self._retired:
                self._host[key] = (artifact, nbytes)
                self._host_bytes += nbytes
                while self._host_bytes > self.host_cache_bytes:
                    _, (_, evicted_bytes) = self._host.popitem(last=False)
                    self._host_bytes -= evicted_bytes
                    self.counters["host_evictions"] += 1
        return artifact

    # -- host → slot ---------------------------------------------------------------------------------------
    def acquire(self, name: str, artifact: object | None = None) -> int | None:
        """Pin `name` into a slot and return it; None when every slot is pinned by other deltas.

        `artifact`: the result of an earlier prefetch(name) — its version is the one pinned (a replacement
        in the store since then does not change what this request runs). Without it, the store's current
        version. Waits for the disk load if needed; a failed load raises its error (nothing is installed).
        """
        key = getattr(artifact, "pool_key", None) if artifact is not None else None
        with self._lock:
            self._variant(name)["requests"] += 1
            if key is None:
                key = self.identity(name)
                self._drop_stale(key)
            if self._pin_if_resident(key):
                return self._slot_of[key]
            if self._free_or_victim() is None:
                return None
            self.counters["host_hits" if key in self._host else "host_misses"] += 1
        if artifact is None:
            artifact = self._load_or_wait(key)
        with self._lock:
            if self._pin_if_resident(key):  # another thread installed it while we waited
                return self._slot_of[key]
            choice = self._free_or_victim()
            if choice is None:
                return None
            start = time.perf_counter()
            slot, victim = choice
            self.counters["misses"] += 1
            if victim is not None:
                self._drop_slot(victim)
                self.counters["evictions"] += 1
            try:
                self.install(slot, artifact)  # validates before copying; on failure the slot is left empty
            except Exception:
                self.counters["load_errors"] += 1
                raise
            self._slot_of[key] = slot
            self._slot_bytes[key] = artifact_nbytes(artifact)
            self._pins[key] = 1
            seconds = time.perf_counter() - start
            self.counters["slot_loads"] += 1
            self.counters["slot_load_s"] += seconds
            variant = self._variant(name)
            variant["swap_ins"] += 1
            variant["swap_in_s"] += seconds
        return slot

    def _pin_if_resident(self, key: tuple) -> bool:
        if key not in self._slot_of:
            return False
        self.counters["hits"] += 1
        self._slot_of.move_to_end(key)
        self._pins[key] = self._pins.get(key, 0) + 1
        return True

    def _free_or_victim(self) -> tuple[int, tuple | None] | None:
        """(a free slot, None), else (the least recently used unpinned version's slot, its key), else None."""
        used = set(self._slot_of.values())
        free = [s for s in range(self.num_slots) if s not in used]
        if free:
            return free[0], None
        victim = next((k for k in self._slot_of if self._pins.get(k, 0) == 0), None)
        return None if victim is None else (self._slot_of[victim], victim)

    def _drop_slot(self, key: tuple) -> None:
        import torch

        # slot tensors made on the engine thread are inference tensors: an unload from another thread (a
        # removal, a retired version) may only write them in inference mode
        with torch.inference_mode():
            self.uninstall(self._slot_of.pop(key))
        self._slot_bytes.pop(key, None)
        self._pins.pop(key, None)

    def _drop_host(self, key: tuple) -> None:
        if key in self._host:
            self._host_bytes -= self._host.pop(key)[1]

    def release(self, name: str, slot: int | None = None) -> None:
        """Unpin one use of `name` (of the version in `slot` when given); it stays resident until evicted,
        unless it is a retired (replaced) version, which is dropped with its last use."""
        with self._lock:
            keys = [k for k, s in self._slot_of.items() if k[0] == name and (slot is None or s == slot)]
            key = next((k for k in reversed(keys) if self._pins.get(k, 0) > 0), None)
            if key is None:
                return
            self._pins[key] -= 1
            if self._pins[key] == 0 and key in self._retired:
                self._drop_slot(key)
                self._drop_host(key)
                self.counters["evictions"] += 1

    def _keys(self, name: str) -> set[tuple]:
        return {k for k in (*self._slot_of, *self._host, *self._loading) if k[0] == name}

    def evict(self, name: str) -> bool:
        """Drop every version of `name` from its slot and the host tier (an unload); False when in-flight
        requests pin one."""
        with self._lock:
            keys = self._keys(name)
            if any(self._pins.get(k, 0) > 0 for k in keys):
                return False
            for key in keys:
                if key in self._slot_of:
                    self._drop_slot(key)
                    self.counters["evictions"] += 1
                self._drop_host(key)
            return True

    def retire(self, name: str, timeout_s: float = 30.0) -> int:
        """After `name` was replaced in the store: wait for loads of its old versions, drop those versions
        from host and slots (pinned ones when their last use ends). Returns how many versions were retired."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            current = self.identity(name) if (self.store_dir / f"{name}{ARTIFACT_SUFFIX}").exists() else None
            old = {k for k in self._keys(name) if k != current}
            pending = [f for k, f in self._loading.items() if k in old]
        for future in pending:  # an old version's files may be deleted once this returns
            try:
                future.result(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - a failed or slow load of a replaced version does not matter
                pass
        with self._lock:
            for key in old:
                self._retired.add(key)  # a request still waiting with it installs it; its release drops it
                self._drop_host(key)
                if key in self._slot_of and self._pins.get(key, 0) == 0:
                    self._drop_slot(key)
                    self.counters["evictions"] += 1
        return len(old)

    def block(self, name: str) -> None:
        """Refuse new requests for `name` (check_name and prefetch raise RequestError) until unblock."""
        with self._lock:
            self._blocked.add(name)

    def unblock(self, name: str) -> None:
        with self._lock:
            self._blocked.discard(name)

    def pinned(self, name: str) -> int:
        with self._lock:
            return sum(n for k, n in self._pins.items() if k[0] == name)

    def resident(self) -> dict[str, int]:
        """Deltas in device slots: name → slot (the newest version where an old one is still running)."""
        with self._lock:
            return {k[0]: s for k, s in self._slot_of.items()}

    def host_resident(self) -> list[str]:
        with self._lock:
            return list(dict.fromkeys(k[0] for k in self._host))

    def variant_bytes(self) -> dict[str, dict[str, int]]:
        """name → {"device": bytes in slots, "host": bytes in the host tier} for every version held."""
        with self._lock:
            out: dict[str, dict[str, int]] = {}
            for key, nbytes in self._slot_bytes.items():
                out.setdefault(key[0], {"device": 0, "host": 0})["device"] += nbytes
            for key, (_, nbytes) in self._host.items():
                out.setdefault(key[0], {"device": 0, "host": 0})["host"] += nbytes
            return out

    def stats(self) -> dict:
        with self._lock:
            return {**self.counters, "slots_used": len(self._slot_of), "slots": self.num_slots,
                    "host_bytes": self._host_bytes, "host_cache_bytes": self.host_cache_bytes,
                    "host_entries": len(self._host),
                    "per_variant": {k: dict(v) for k, v in self.per_variant.items()}}

    def close(self) -> None:
        self._loader.shutdown(wait=True, cancel_futures=True)
