"""How many threads the computing commands use: the CPUs this process may really run on, never spin-waiting.

torch (and OpenMP) default to one thread per core of the machine, ignoring the cgroup CPU quota of a
container and the process's affinity mask; on a busy machine the surplus threads spin and wait for each
other (a `deltazip compress` that takes 12 s on one thread did not finish in 300 s with the defaults on a
busy 2-core machine). `usable_cpus()` counts what the process may use; `configure_threads()` sets torch's
intra- and inter-op pools to it (or to `[runtime] threads` in deltazip.toml) and makes OpenMP wait passively.
The native delta-GEMM kernel (deltazip/kernels/native) applies the same affinity and quota rule to its
OpenMP threads.

OpenMP reads OMP_WAIT_POLICY once, when its runtime starts (when torch is imported): `early_env()` sets it
for this process and its children and must run before `import torch` (the CLI calls it first thing).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
# hidden sizes up to this compress on one thread: their ops are too small to share, and with passive waiting
# every op pays a thread wake-up (benchmarks/RESULTS.md, "Threads: one thread for narrow models")
NARROW_WIDTH = 256
_configured: int | None = None
_chosen_by_user = False  # [runtime] threads set (OMP_NUM_THREADS is read when asked: _env_threads)


def early_env() -> None:
    """Environment for OpenMP before any runtime starts: passive waiting (idle threads sleep, never spin),
    and run-to-run reproducible MKL results, unless the user chose otherwise. Inherited by child processes
    (tritonserver, its Python backend)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # MKL picks GEMM code paths by buffer alignment unless told not to: the same compression run twice
    # could differ in the last bits (and `compress --resume` could not reproduce an uninterrupted run)
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (taskset, cpusets), else os.cpu_count()."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def cgroup_cpu_limit(root: str | Path = CGROUP_ROOT,
                     self_cgroup: str | Path = "/proc/self/cgroup") -> float | None:
    """The CPU quota of this process's cgroup in CPUs (quota / period), None when unlimited or unknown.

    cgroup v2: `cpu.max` ("max 100000" or "200000 100000") in the process's own cgroup directory (from
    /proc/self/cgroup's "0::/path" line) or at the root of the mount; cgroup v1: `cpu.cfs_quota_us` /
    `cpu.cfs_period_us` under `cpu/` or `cpu,cpuacct/` (quota -1: unlimited). `root` is the mount point
    (tests pass a directory of fake files, and `self_cgroup` a fake /proc/self/cgroup).
    """
    root = Path(root)
    limits = []
    for directory in _cgroup_dirs(root, Path(self_cgroup)):
        v2 = _read(directory / "cpu.max")
        if v2 is not None:
            parts = v2.split()
            if len(parts) >= 1 and parts[0] != "max":
                limits.append(_ratio(parts[0], parts[1] if len(parts) > 1 else "100000"))
            continue
        for v1 in (directory / "cpu", directory / "cpu,cpuacct", directory):
            quota, period = _read(v1 / "cpu.cfs_quota_us"), _read(v1 / "cpu.cfs_period_us")
            if quota is not None and period is not None:
                limits.append(_ratio(quota, period))
                break
    limits = [x for x in limits if x is not None]
    return min(limits) if limits else None


def _cgroup_dirs(root: Path, self_cgroup: Path) -> list[Path]:
    """Where this process's limits may be: its own cgroup (v2 path from /proc/self/cgroup, when it exists
    under `root`) and the mount root (inside a container the root is the container's cgroup)."""
    dirs = []
    for line in (_read(self_cgroup) or "").splitlines():
        if line.startswith("0::/") and len(line) > 4:
            candidate = root / line[4:].strip()
            if candidate.is_dir():
                dirs.append(candidate)
    dirs.append(root)
    return dirs


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = float(quota), float(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 and math.isfinite(q / p) else None


def usable_cpus(root: str | Path = CGROUP_ROOT) -> int:
    """CPUs this process may use: its affinity mask, capped by the cgroup quota (rounded up), at least 1."""
    n = affinity_cpus()
    quota = cgroup_cpu_limit(root)
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return n


def resolve_threads(configured: int = 0, root: str | Path = CGROUP_ROOT) -> int:
    """The thread count to use: `configured` when > 0 (deltazip.toml `[runtime] threads`), else a positive
    OMP_NUM_THREADS (the user's or the launcher's explicit choice), else usable_cpus()."""
    if not isinstance(configured, int) or isinstance(configured, bool) or configured < 0:
        raise ValueError(f"threads must be 0 (auto) or a positive integer, not {configured!r}")
    if configured > 0:
        return configured
    return _env_threads() or usable_cpus(root)


def _env_threads() -> int:
    """A positive OMP_NUM_THREADS, else 0."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(env) if env.isdigit() else 0


def work_threads(hidden_size: int) -> int:
    """Threads for compressing a model of this hidden size: one for a narrow model (NARROW_WIDTH) unless the
    user chose a count ([runtime] threads, OMP_NUM_THREADS), else torch's current count."""
    import torch

    if hidden_size <= NARROW_WIDTH and not (_chosen_by_user or _env_threads() > 0):
        return 1
    return torch.get_num_threads()


def configure_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads to `n` (None or 0: usable_cpus()) and its inter-op threads to at most
    2; OMP_WAIT_POLICY=PASSIVE for child processes. Returns the thread count. Safe to call again (the
    inter-op pool can be sized only once per process; later calls leave it)."""
    global _configured, _chosen_by_user
    early_env()
    threads = resolve_threads(n or 0)
    _chosen_by_user = bool(n)
    import torch

    torch.set_num_threads(threads)
    if _configured is None:
        try:
            torch.set_num_interop_threads(min(threads, 2))
        except RuntimeError:  # the inter-op pool already started (torch allows setting it once)
            pass
    _configured = threads
    return threads


@contextlib.contextmanager
def fixed_threads(num_threads: int) -> Iterator[None]:
    """Run with a fixed torch thread count, restoring the caller's afterwards."""
    import torch

    previous = torch.get_num_threads()
    if num_threads == previous:
        yield
        return
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
