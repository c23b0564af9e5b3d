"""Session-wide fixtures: the tiny family and its compressed deltas, built once and cached on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The Triton interpreter must be chosen before any module defining @triton.jit kernels is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("DELTAZIP_TEST_CACHE", REPO / ".deltazip" / "test-cache"))

# The deltas the runtime and serving tests share (a subset keeps the suite fast).
SHARED_DELTA_TASKS = ("reverse", "sort", "upper")


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    return CACHE


@pytest.fixture(scope="session")
def tiny_family(cache_dir: Path):
    """The tiny preset family (seed 0); reused across runs by content hash."""
    from deltazip.family import create_family

    return create_family(cache_dir / "family-tiny-s0", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_deltas(tiny_family, cache_dir: Path) -> dict[str, Path]:
    """Default-setting (2-bit 2:4) artifacts of a few fine-tunes, keyed by task; in one store directory."""
    from deltazip.compress import compress_model
    from deltazip.config import CompressConfig

    store = cache_dir / f"deltas-tiny-s0-{tiny_family.content_hash[:12]}"  # a rebuilt family gets new deltas
    store.mkdir(exist_ok=True)
    settings = CompressConfig()
    out = {}
    for task in SHARED_DELTA_TASKS:
        path = store / f"{task}.dz"
        if not _usable_artifact(path, tiny_family.base_dir, settings):
            compress_model(tiny_family.base_dir, tiny_family.finetune_dirs[task], path, settings,
                           name=task, calib=tiny_family.calib_path)
        out[task] = path
    return out


def _usable_artifact(path: Path, base_dir: Path, settings=None) -> bool:
    """A cached artifact is reused only if it loads (current format), matches the current base and, when
    given, was made with the current compression `settings` (defaults change as the solver improves)."""
    import dataclasses
    import shutil

    from deltazip.errors import DeltazipError
    from deltazip.format import fingerprint_model, load_delta

    if not (path / "manifest.json").is_file():
        return False
    try:
        delta = load_delta(path)
        ok = delta.base_fingerprint == fingerprint_model(base_dir)
        if settings is not None:
            made_with = {k: v for k, v in delta.manifest.get("settings", {}).items() if k != "calib"}
            ok = ok and made_with == {k: v for k, v in dataclasses.asdict(settings).items() if k != "calib"}
    except (DeltazipError, KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        shutil.rmtree(path)
    return ok


# -- a live server for the outside-client tests (OpenAI front, variants, metrics) ----------------------------
@pytest.fixture(scope="session")
def live_store(tiny_deltas, tmp_path_factory) -> Path:
    """A private copy of the shared store: the variant lifecycle tests add to and remove from it."""
    import shutil

    store = tmp_path_factory.mktemp("live") / "deltas"
    shutil.copytree(next(iter(tiny_deltas.values())).parent, store)
    return store


@pytest.fixture(scope="session")
def live_server(tiny_family, live_store, tmp_path_factory):
    """tritonserver + the OpenAI front on free loopback ports, over `live_store`; torn down at session end.
    Yields an object with .triton (TritonServer), .front (OpenAIFront), .store, .family, .build_dir."""
    from types import SimpleNamespace

    from deltazip.builder.build import build
    from deltazip.config import RuntimeConfig
    from deltazip.serving.openai_api import FrontSettings, OpenAIFront
    from deltazip.serving.server import TritonServer

    out = tmp_path_factory.mktemp("live-build") / "build"
    build(tiny_family.base_dir, live_store, out, RuntimeConfig(max_context=128, max_batch_size=16,
                                                              delta_slots=4))
    with TritonServer(out) as triton:
        with OpenAIFront(FrontSettings.from_build(out, triton.grpc_url)) as front:
            yield SimpleNamespace(triton=triton, front=front, store=live_store, family=tiny_family,
                                  build_dir=out)


# -- private servers for the fault tests (they kill processes and change artifacts) ------------------------
@pytest.fixture(scope="session")
def private_build(tiny_family, tiny_deltas, tmp_path_factory):
    """Factory: `private_build(runtime, name)` → (build_dir, store): a build over a private copy of the
    shared store, so a test may change or remove its artifacts. Start servers on it with TritonServer (a
    context manager: always torn down) or `deltazip serve`."""
    import shutil

    from deltazip.builder.build import build

    def make(runtime, name: str = "private") -> tuple[Path, Path]:
        root = tmp_path_factory.mktemp(name)
        store = root / "deltas"
        shutil.copytree(next(iter(tiny_deltas.values())).parent, store)
        out = root / "build"
        build(tiny_family.base_dir, store, out, runtime)
        return out, store

    return make
