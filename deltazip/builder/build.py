"""`deltazip build`: validate deltas against the base → backend step → render triton_repo/ → build.json.

The whole build is written into a temp dir beside OUT and renamed into place, so OUT is never half-written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from deltazip.builder.render import (
    model_values,
    pbtxt_string,
    render_repo,
    template_files,
    variant_template,
)
from deltazip.config import RuntimeConfig
from deltazip.errors import DeltazipError
from deltazip.fsutil import atomic_dir

BACKENDS = ("torch", "trtllm")
BUILD_JSON = "build.json"
REPO_DIR = "triton_repo"


@dataclass(frozen=True)
class DeltaEntry:
    """One validated delta of the build."""

    name: str
    path: str
    manifest_sha256: str
    base_fingerprint: str


def find_artifacts(deltas_dir: Path) -> list[Path]:
    """The NAME.dz/ artifact directories in `deltas_dir`, sorted by name."""
    if not deltas_dir.is_dir():
        raise DeltazipError(f"deltas directory not found: {deltas_dir}")
    return sorted(p for p in deltas_dir.iterdir() if p.is_dir() and p.name.endswith(".dz"))


def validate_deltas(base_dir: Path, deltas_dir: Path, on_delta=None) -> tuple[str, list[DeltaEntry]]:
    """Load (with checksums) every artifact and check it was made against `base_dir`; nothing is written."""
    from deltazip.format import fingerprint_model, load_delta

    base_fingerprint = fingerprint_model(base_dir)
    entries = []
    for path in find_artifacts(deltas_dir):
        delta = load_delta(path, verify=True)
        name = path.name[: -len(".dz")]
        if delta.name != name:
            raise DeltazipError(f"{path}: artifact is named '{delta.name}' but its directory says '{name}'")
        if delta.base_fingerprint != base_fingerprint:
            raise DeltazipError(
                f"delta '{name}' ({path}) was made against another base: fingerprint "
                f"{delta.base_fingerprint[:16]}… ≠ {base_fingerprint[:16]}… of {base_dir}")
        manifest_sha = hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()
        entries.append(DeltaEntry(name, str(path), manifest_sha, delta.base_fingerprint))
        if on_delta is not None:
            on_delta(name)
    return base_fingerprint, entries


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("deltazip", "torch", "transformers", "nvidia-pytriton", "tritonclient"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


TRTLLM_DIR = "trtllm"  # the TensorRT-LLM stage's output inside a trtllm build (deltazip.builder.trtllm)


def planned_files(backend: str, delta_names: list[str], tp: int) -> list[str]:
    """Exactly the files a build writes, relative to OUT (what `deltazip build --dry-run` prints)."""
    repo = [f"{REPO_DIR}/{rel}" for _, rel in template_files(variant_template(backend))]
    files = [BUILD_JSON, *repo]
    if backend == "trtllm":
        from deltazip.builder.trtllm import planned_files as trtllm_files

        files += [f"{TRTLLM_DIR}/{rel}" for rel in trtllm_files(delta_names, tp)]
    return sorted(files)


def build(base_dir: Path, deltas_dir: Path, out: Path, runtime: RuntimeConfig, backend: str = "torch",
          base_name: str | None = None, tp: int = 1, on_delta=None, dry_run: bool = False) -> dict:
    """Run the build into `out`; returns the build.json content. `dry_run`: check every input, write nothing,
    and return the manifest with "files" = exactly the files the build would write (relative to `out`)."""
    if backend not in BACKENDS:
        raise DeltazipError(f"unknown backend '{backend}' (known: {', '.join(BACKENDS)})")
    if backend == "trtllm" and not dry_run:
        # The one backend switch. GPU only — not verified on this machine: without TensorRT-LLM 1.2.x
        # require_trtllm() raises a one-line DeltazipError before anything is read or written.
        from deltazip.builder.trtllm import require_trtllm

        require_trtllm()
    base_dir, deltas_dir, out = base_dir.resolve(), deltas_dir.resolve(), out.resolve()
    if not (base_dir / "config.json").is_file():
        raise DeltazipError(f"base model directory has no config.json: {base_dir}")
    if backend == "trtllm":
        from deltazip.converters.split import ModelShape, check_tp

        check_tp(ModelShape.from_model_dir(base_dir), tp)
    base_fingerprint, entries = validate_deltas(base_dir, deltas_dir, on_delta)

    gpu = backend == "trtllm" or runtime.device == "cuda" or (runtime.device == "auto" and _cuda_available())
    runtime_dict = dataclasses.asdict(runtime)
    manifest = {
        "format": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "inputs": {"base": base_name or str(base_dir), "base_dir": str(base_dir),
                   "deltas_dir": str(deltas_dir)},
        "settings": {"backend": backend, "tp": tp, "kind": "KIND_GPU" if gpu else "KIND_CPU",
                     "runtime": runtime_dict},
        "base_fingerprint": base_fingerprint,
        "deltas": [dataclasses.asdict(e) for e in entries],
        "versions": _versions(),
    }
    if dry_run:
        return {**manifest, "files": planned_files(backend, [e.name for e in entries], tp)}
    values = model_values(base_dir, deltas_dir, runtime_dict, gpu)
    with atomic_dir(out, overwrite=True) as tmp:
        if backend == "trtllm":
            from deltazip.builder.trtllm import build_trtllm

            manifest["trtllm"] = build_trtllm(base_dir, [Path(e.path) for e in entries], tmp / TRTLLM_DIR,
                                              tp=tp, delta_slots=runtime.delta_slots,
                                              max_batch_size=runtime.max_batch_size,
                                              max_input_len=runtime.max_context,
                                              max_seq_len=runtime.max_context)
            # the served model reads the stage from the final location (OUT/trtllm) after the rename
            values = {**values, "trtllm_dir": pbtxt_string(str(out / TRTLLM_DIR))}
        render_repo(tmp / REPO_DIR, values, variant_template(backend))
        (tmp / BUILD_JSON).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_build(build_dir: Path) -> dict:
    """Read BUILD/build.json (raises a clear error when `build_dir` is not a build)."""
    path = build_dir / BUILD_JSON
    if not path.is_file():
        raise DeltazipError(f"{build_dir} is not a build: {BUILD_JSON} is missing (run `deltazip build`)")
    return json.loads(path.read_text())
