"""Launch the tritonserver binary bundled in the nvidia-pytriton wheel on a built model repository.

How it runs on a CPU-only machine: venv bin first on PATH, the interpreter's LIBDIR on
LD_LIBRARY_PATH, the Python stub copied into backends/python/, explicit model control, loopback binds,
a unique shm prefix per server (so leftovers can be removed), SIGINT to stop.

Supervision (`supervise`, used by `deltazip serve`): when the model's Python stub process dies, tritonserver
2.51 keeps /v2/health/ready at 200, never answers the stub's in-flight decoupled requests, fails each new
one after about a second ("Stub process ... is not healthy"), and an unload of the model hangs in UNLOADING.
So the launcher polls the stub (every 0.5 s) and on its death kills tritonserver — its in-flight requests get
an error at once (the connections close) and readiness is false while it is down — then starts it again on
the same ports. The same happens when tritonserver itself dies. More than `max_restarts` restarts within
`window_s` and `deltazip serve` gives up: one error line, exit code 2.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from deltazip.errors import DeltazipError
from deltazip.serving.protocol import MODEL_NAME

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "deltazip_"  # every server's regions start with this, then a per-server token
EXIT_TIMEOUT_S = 5


class ServerError(DeltazipError):
    """tritonserver could not be started, did not get ready, or exited early."""


@dataclass(frozen=True)
class TritonPaths:
    """Where the bundled server lives: binary, backends, caches, the stub for this Python, the libs dir."""

    binary: Path
    backends: Path
    caches: Path
    stub: Path
    libs: Path


def find_tritonserver() -> TritonPaths:
    """Locate the tritonserver of the nvidia-pytriton wheel (no import of pytriton itself)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("tritonserver not found: install the serve extra (pip install 'deltazip[serve]')")
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    minor = f"{sys.version_info.major}.{sys.version_info.minor}"
    paths = TritonPaths(
        binary=root / "bin" / "tritonserver",
        backends=root / "backends",
        caches=root / "caches",
        stub=root / "python_backend_stubs" / minor / "triton_python_backend_stub",
        libs=root.parent.parent / "nvidia_pytriton.libs",
    )
    for p in (paths.binary, paths.stub):
        if not p.exists():
            raise ServerError(f"tritonserver install is incomplete: {p} is missing")
    return paths


def install_stub(paths: TritonPaths) -> None:
    """Copy the Python stub next to libtriton_python.so (where 2.51.0 looks); atomic, done once."""
    target = paths.backends / "python" / "triton_python_backend_stub"
    if target.exists():
        return
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    shutil.copy2(paths.stub, tmp)
    os.replace(tmp, target)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port_free(host: str, port: int, flag: str) -> None:
    """Raise a clear error when `port` cannot be bound on `host` (checked before the server starts).

    With SO_REUSEADDR, as tritonserver's own listeners bind: connections of a server that just exited linger
    in TIME_WAIT on the port for a minute and must not count as "in use"; a listener still does."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ServerError(f"port {port} on {host} is not available ({flag}): {e.strerror}") from None


def server_env(paths: TritonPaths) -> dict[str, str]:
    """Environment for tritonserver and its Python stubs (PATH and LD_LIBRARY_PATH for the bundled binary
    and its stubs)."""
    env = dict(os.environ)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    parts = [p for p in (libdir, str(paths.libs), env.get("LD_LIBRARY_PATH", "")) if p]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(parts)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _die_with_parent() -> list[str]:
    """A command prefix that makes the server get SIGINT if the launching process dies (no orphaned server).

    util-linux `setpriv --pdeathsig` sets it and then execs; no Python runs between fork and exec (a
    preexec_fn would, and in a process with gRPC or torch threads that child could crash before exec).
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "INT", "--"] if setpriv else []


def shm_regions(prefix: str) -> list[Path]:
    """The /dev/shm regions whose names start with `prefix`."""
    if not SHM_DIR.is_dir():
        return []
    return sorted(p for p in SHM_DIR.iterdir() if p.name.startswith(prefix))


def stub_pids(prefix: str) -> list[int]:
    """Python stub processes whose command line names our shm prefix."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"triton_python_backend_stub" in cmdline and prefix.encode() in cmdline:
            pids.append(int(proc.name))
    return pids


class TritonServer:
    """A tritonserver serving BUILD_DIR/triton_repo; use as a context manager (start on enter, stop on exit).

    Ports given as 0 are replaced by free ones; `http_url`, `grpc_url`, `metrics_url` say where it listens.
    """

    def __init__(self, build_dir: str | Path, host: str = "127.0.0.1", http_port: int = 0,
                 grpc_port: int = 0, metrics_port: int = 0, ready_timeout_s: float = 180.0,
                 log_path: str | Path | None = None, stats_path: str | Path | None = None) -> None:
        self.build_dir = Path(build_dir).resolve()
        self.repo = self.build_dir / "triton_repo"
        if not (self.repo / MODEL_NAME / "config.pbtxt").is_file():
            raise ServerError(f"{self.build_dir} is not a build: triton_repo/{MODEL_NAME}/config.pbtxt is "
                              f"missing (run `deltazip build`)")
        self.host = host
        self.ports = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        self.ready_timeout_s = ready_timeout_s
        self.shm_prefix = f"{SHM_PREFIX}{os.getpid()}_{secrets.token_hex(3)}_"
        self.log_path = Path(log_path) if log_path else None
        self.stats_path = Path(stats_path).resolve() if stats_path else None  # engine counters (JSON)
        self.process: subprocess.Popen | None = None

    @property
    def client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def http_url(self) -> str:
        return f"{self.client_host}:{self.ports['http']}"

    @property
    def grpc_url(self) -> str:
        return f"{self.client_host}:{self.ports['grpc']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.client_host}:{self.ports['metrics']}/metrics"

    def command(self, paths: TritonPaths) -> list[str]:
        """The tritonserver command line."""
        p = self.ports
        return [
            str(paths.binary), f"--model-repository={self.repo}",
            f"--backend-directory={paths.backends}", f"--cache-directory={paths.caches}",
            f"--http-address={self.host}", f"--grpc-address={self.host}", f"--metrics-address={self.host}",
            f"--http-port={p['http']}", f"--grpc-port={p['grpc']}", f"--metrics-port={p['metrics']}",
            "--allow-gpu-metrics=false", "--disable-auto-complete-config",
            "--pinned-memory-pool-byte-size=0", f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
            "--model-control-mode=explicit", f"--load-model={MODEL_NAME}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            "--backend-config=python,shm-default-byte-size=4194304",
            "--backend-config=python,shm-growth-byte-size=1048576",
        ]

    def start(self) -> TritonServer:
        """Check ports, launch, and wait until the model is ready; raise ServerError with the log tail."""
        paths = find_tritonserver()
        install_stub(paths)
        for name, port in self.ports.items():
            if port == 0:
                self.ports[name] = free_port(self.host or "0.0.0.0")
            else:
                check_port_free(self.host, port, f"--{name}-port")
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:  # a restart appends: the crash stays readable
            self.process = subprocess.Popen(
                _die_with_parent() + self.command(paths), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=self._env(paths), cwd=self.build_dir, start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _env(self, paths: TritonPaths) -> dict[str, str]:
        env = server_env(paths)
        if self.stats_path is not None:
            env["DELTAZIP_ENGINE_STATS"] = str(self.stats_path)
        return env

    def engine_stats(self) -> dict:
        """The engine's counters as of the last finished request (needs `stats_path`); {} before any."""
        if self.stats_path is None or not self.stats_path.is_file():
            return {}
        return json.loads(self.stats_path.read_text())

    def _wait_ready(self) -> None:
        url = f"http://{self.http_url}/v2/models/{MODEL_NAME}/ready"
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.process.returncode} before it was "
                                  f"ready; last log lines:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise ServerError(f"tritonserver not ready after {self.ready_timeout_s:.0f} s; last log lines:\n"
                          f"{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server log (for error messages)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def fault(self) -> str | None:
        """Why this server cannot answer requests any more (tritonserver exited, or the model's Python stub
        died), or None while both run. Cheap enough to poll every fraction of a second."""
        if self.process is None:
            return "tritonserver is not started"
        if self.process.poll() is not None:
            return f"tritonserver exited with code {self.process.returncode}"
        if not stub_pids(self.shm_prefix):
            return f"the Python stub process of {MODEL_NAME} died"
        return None

    def restart(self) -> TritonServer:
        """Kill this server at once (its in-flight requests get errors), then start it on the same ports."""
        self.stop(kill=True)
        self.process = None
        self.shm_prefix = f"{SHM_PREFIX}{os.getpid()}_{secrets.token_hex(3)}_"
        return self.start()

    def stop(self, kill: bool = False) -> int | None:
        """SIGINT, wait (then SIGKILL), then remove leftover shm regions and stubs of this server.
        kill=True: SIGKILL at once (a server whose stub died cannot shut down cleanly)."""
        if self.process is None:
            return None
        if self.process.poll() is None and kill:
            self.process.kill()
            self.process.wait()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=EXIT_TIMEOUT_S + 15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        deadline = time.monotonic() + 5
        while stub_pids(self.shm_prefix) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in stub_pids(self.shm_prefix):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for region in shm_regions(self.shm_prefix):
            region.unlink(missing_ok=True)
        return self.process.returncode

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def supervise(server: TritonServer, report: Callable[[str], None] = print, poll_s: float = 0.5,
              max_restarts: int = 3, window_s: float = 600.0) -> None:
    """Watch a started server until interrupted: when tritonserver or its model's stub dies, report one
    line and restart it on the same ports; raise ServerError after more than `max_restarts` restarts within
    `window_s` (or when a restart fails). Returns never; Ctrl-C (KeyboardInterrupt) ends it."""
    restarts: list[float] = []
    while True:
        time.sleep(poll_s)
        fault = server.fault()
        if fault is None:
            continue
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < window_s] + [now]
        if len(restarts) > max_restarts:
            server.stop(kill=True)
            raise ServerError(f"{fault}; {len(restarts) - 1} restarts in the last {window_s:.0f} s already, "
                              f"giving up; last log lines:\n{server.log_tail()}")
        report(f"{fault}: restarting tritonserver on the same ports (in-flight requests get an error; "
               f"log: {server.log_path})")
        started = time.monotonic()
        server.restart()
        report(f"{MODEL_NAME} is ready again after {time.monotonic() - started:.1f} s")
