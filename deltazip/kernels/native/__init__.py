"""The native CPU delta GEMM: C++ built with torch.utils.cpp_extension on first use, cached on disk.

`build()` compiles `delta_gemm.cpp` and `swapin.cpp` (once per source/torch/compiler version, into
``$DELTAZIP_NATIVE_CACHE`` or ``~/.cache/deltazip/native/``) and loads them, which registers the CPU
kernel of the ``deltazip::add_delta_matmul`` op and hands the swap-in decode (deltazip.format.decode) its
native pass. Where it cannot build (no compiler, no ninja, headers
missing) or ``DELTAZIP_NATIVE=0``, the op's CPU kernel is the torch path and one warning line says why.

Tuning (read on every call, so benchmarks can switch): ``DELTAZIP_NATIVE_STRATEGY`` = auto | direct |
lut | rowvec | dense; for auto, ``DELTAZIP_NATIVE_DENSE_ROWS`` (segments with at least this many rows
decode to dense and run a BLAS GEMM; 1024), ``DELTAZIP_NATIVE_LUT_ROWS`` (2-bit 2:4 segments with at most
this many rows use the table-lookup kernel; 0) and ``DELTAZIP_NATIVE_ROWVEC_ROWS`` (segments with at least
this many rows use the row-vector kernel; 9, fewer run direct); ``DELTAZIP_NATIVE_ISA=scalar`` (skip AVX2),
``DELTAZIP_NATIVE_NOFAST=1`` (the AVX2 kernel's general loop instead of its unrolled chunks; for tests).
The defaults come from benchmarks/kernel.py on this 2-core AVX2 machine.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import tempfile
import threading
from pathlib import Path

import torch

SOURCES = (Path(__file__).with_name("delta_gemm.cpp"), Path(__file__).with_name("swapin.cpp"))
CFLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-std=c++17"]
LOG = logging.getLogger("deltazip.kernels")

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool, "error": str, "path": str


def cache_dir() -> Path:
    """Where built extensions live: $DELTAZIP_NATIVE_CACHE, else ~/.cache/deltazip/native (a per-user temp
    directory when home is not writable)."""
    env = os.environ.get("DELTAZIP_NATIVE_CACHE")
    if env:
        return Path(env)
    home = Path.home() / ".cache" / "deltazip" / "native"
    try:
        home.mkdir(parents=True, exist_ok=True)
        if os.access(home, os.W_OK):
            return home
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"deltazip-native-{os.getuid()}"


def _build_name() -> str:
    digest = hashlib.sha256()
    for src in SOURCES:
        digest.update(src.read_bytes())
    tag = [torch.__version__, platform.machine(), platform.python_version(), *CFLAGS]
    digest.update(" ".join(tag).encode())
    return f"deltazip_native_{digest.hexdigest()[:16]}"


def enabled() -> bool:
    """False when DELTAZIP_NATIVE=0 asks for the torch path."""
    return os.environ.get("DELTAZIP_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def build(verbose: bool = False) -> bool:
    """Compile (or reuse) and load the extension; True when the native kernel is registered.

    Idempotent and thread-safe; never raises for a failed build (the reason is in `error()`).
    The op schema must exist first: deltazip.kernels.ops defines it and calls this.
    """
    with _lock:
        if "ok" in _state:
            return bool(_state["ok"])
        if not enabled():
            _state.update(ok=False, error="DELTAZIP_NATIVE=0")
            return False
        try:
            from torch.utils import cpp_extension

            name = _build_name()
            where = cache_dir() / name
            built = where / f"{name}.so"
            if built.is_file() and not (where / "lock").exists():  # cached: load without asking ninja
                torch.ops.load_library(str(built))
                _state.update(ok=True, error="", path=str(where))
                _register_decoders()
                return True
            where.mkdir(parents=True, exist_ok=True)
            cpp_extension.load(name=name, sources=[str(s) for s in SOURCES], extra_cflags=CFLAGS,
                               extra_ldflags=["-fopenmp"], build_directory=str(where),
                               is_python_module=False, verbose=verbose)
            _state.update(ok=True, error="", path=str(where))
            _register_decoders()
        except Exception as exc:  # noqa: BLE001 - any build failure means: use the torch path
            first = str(exc).strip().splitlines()
            _state.update(ok=False, error=f"{type(exc).__name__}: {first[0] if first else ''}"[:300])
        return bool(_state["ok"])


def _register_decoders() -> None:
    """Hand the swap-in decode its native passes (swapin.cpp; deltazip.format.decode falls back to numpy)."""
    from deltazip.format import decode

    decode.NATIVE["nibbles_to_words"] = torch.ops.deltazip_native.nibbles_to_words.default


def available() -> bool:
    """Whether the native CPU kernel is loaded (builds it on first call)."""
    return build()


def error() -> str:
    """Why the native kernel is not in use ('' when it is)."""
    build()
    return str(_state.get("error", ""))


def info() -> dict[str, object]:
    """Build state plus what the kernel sees: usable CPUs (affinity and cgroup quota), AVX2."""
    out: dict[str, object] = {"available": available(), "error": error(), "path": _state.get("path")}
    if out["available"]:
        out["usable_cpus"] = torch.ops.deltazip_native.info(0)
        out["avx2"] = bool(torch.ops.deltazip_native.info(1))
    return out


def fallback_warning() -> str:
    """The one warning line printed when the torch path stands in for the native kernel."""
    return f"deltazip: native CPU delta kernel unavailable ({error()}); using the torch path"
