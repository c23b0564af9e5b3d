"""Variants on a live server: the store operations behind `deltazip variants add|remove|list`.

The store (a directory of NAME.dz entries) stays the one source of truth: a restarted server serves exactly
what it holds. An added variant is copied into an immutable version directory `.versions/NAME@SHA.dz`
(SHA: the first 16 hex digits of its manifest's sha256), verified there (every checksum, the base
fingerprint, its name), and only then made visible by atomically pointing the symlink `NAME.dz` at it
(a new symlink renamed over the old one). Replacing a variant is the same swap: requests already running
keep the version they pinned (the engine's pool keys every tier by the version's real path), new ones get
the new version. Old version directories are deleted only after the model has retired them
(`control(..., "refresh")` returns once no load of an old version is in flight).

The model is told about changes with *control requests*: a request to deltazip_llm with the reserved
input `control` (JSON: {"op": "stats" | "refresh" | "drain", "name": ..., "timeout_s": ...}). Triton binds
loopback by default; whoever can reach its gRPC port can send them (as they can load models).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from deltazip.errors import DeltazipError
from deltazip.runtime.pool import ARTIFACT_SUFFIX, NAME_PATTERN

VERSIONS_DIR = ".versions"
CONTROL_INPUT = "control"
CONTROL_OPS = ("stats", "refresh", "drain")


class VariantError(DeltazipError):
    """A variant operation was refused: bad name, corrupt / wrong-base / misnamed artifact, unknown or busy
    variant. `status` is the HTTP status the OpenAI front answers with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class VariantInfo:
    """One variant of the store, as `variants list` and GET /v1/models show it."""

    name: str
    path: str  # the version directory the store points at
    version: str  # manifest sha256, first 16 hex digits
    bits: int | None
    sparsity: str | None
    ratio: float | None
    bytes: int  # artifact bytes on disk
    created: int  # unix seconds (the version directory's mtime)

    def to_dict(self) -> dict:
        return asdict(self)


def check_variant_name(name: str, reserved: tuple[str, ...] = ()) -> str:
    """A variant name: letters, digits, '.', '_' or '-' (no path separators), not a reserved model id."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        raise VariantError(f"invalid variant name {name!r}: use letters, digits, '.', '_' or '-' (no paths)")
    if name in reserved:
        raise VariantError(f"variant name '{name}' is taken by the base model")
    return name


def manifest_version(artifact_dir: Path) -> str:
    return hashlib.sha256((artifact_dir / "manifest.json").read_bytes()).hexdigest()[:16]


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def variant_info(store: Path, name: str) -> VariantInfo:
    """Read NAME's manifest in `store` (no decode); VariantError(404) when it is not there."""
    entry = store / f"{name}{ARTIFACT_SUFFIX}"
    manifest_path = entry / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        real = Path(os.path.realpath(entry))
        created = int(real.stat().st_mtime)
    except (OSError, ValueError):
        raise VariantError(f"unknown variant '{name}'", status=404) from None
    settings = manifest.get("settings") or {}
    stats = manifest.get("stats") or {}
    bits = settings.get("bits")
    return VariantInfo(name=name, path=str(real), version=manifest_version(real),
                       bits=int(bits) if isinstance(bits, int | float) else None,
                       sparsity=str(settings["sparsity"]) if "sparsity" in settings else None,
                       ratio=float(stats["ratio"]) if isinstance(stats.get("ratio"), int | float) else None,
                       bytes=_dir_bytes(real), created=created)


def list_variants(store: Path) -> list[VariantInfo]:
    """Every variant of the store, sorted by name (entries whose manifest cannot be read are skipped)."""
    if not store.is_dir():
        return []
    out = []
    for entry in sorted(store.glob(f"*{ARTIFACT_SUFFIX}")):
        if entry.name.startswith("."):
            continue
        try:
            out.append(variant_info(store, entry.name[: -len(ARTIFACT_SUFFIX)]))
        except VariantError:
            continue
    return out


def _verify(path: Path, name: str, base_fingerprint: str) -> None:
    """Checksums (a full load), the base fingerprint and the artifact's own name; VariantError on a fault."""
    from deltazip.format import load_delta

    try:
        artifact = load_delta(path, verify=True)
    except DeltazipError as e:
        raise VariantError(f"artifact refused: {e}") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise VariantError(f"artifact refused: cannot read it ({type(e).__name__}: {e})") from None
    if artifact.name != name:
        raise VariantError(f"artifact refused: it is named '{artifact.name}', not '{name}' (add it as "
                           f"'{artifact.name}', or compress it again with --name {name})")
    if artifact.base_fingerprint != base_fingerprint:
        raise VariantError(f"artifact refused: it was made against another base (fingerprint "
                           f"{str(artifact.base_fingerprint)[:20]}…, this server's base is "
                           f"{base_fingerprint[:20]}…)")


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> None:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(a))


def _point(store: Path, name: str, target: Path) -> Path | None:
    """Make store/NAME.dz a symlink to `target` in one atomic step; returns a displaced real directory
    (a store entry that was not a symlink), now renamed aside for deletion, else None."""
    entry = store / f"{name}{ARTIFACT_SUFFIX}"
    link = store / f".{name}.link-{uuid.uuid4().hex[:8]}"
    os.symlink(os.path.relpath(target, store), link)
    try:
        if entry.is_dir() and not entry.is_symlink():
            _exchange(link, entry)  # entry is now the symlink; `link` holds the old directory
            aside = store / VERSIONS_DIR / f".old-{name}-{uuid.uuid4().hex[:8]}"
            os.rename(link, aside)
            return aside
        os.replace(link, entry)
        return None
    except BaseException:
        if link.is_symlink():
            link.unlink()
        raise


def install_variant(store: Path, name: str, source: Path, base_fingerprint: str,
                    reserved: tuple[str, ...] = ()) -> tuple[VariantInfo, list[Path]]:
    """Verify `source` and make it variant NAME of `store` (new or replacing); nothing is visible until it
    has passed. Returns the new info and the old version directories to delete once the model retired them."""
    check_variant_name(name, reserved)
    source = Path(source)
    if not (source / "manifest.json").is_file():
        raise VariantError(f"artifact refused: {source} is not a delta artifact (no manifest.json)")
    versions = store / VERSIONS_DIR
    versions.mkdir(parents=True, exist_ok=True)
    tmp = versions / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(source, tmp, symlinks=False)
        _verify(tmp, name, base_fingerprint)  # what is verified is exactly what gets installed
        target = versions / f"{name}@{manifest_version(tmp)}{ARTIFACT_SUFFIX}"
        if target.is_dir():
            shutil.rmtree(tmp)  # the same bytes are installed already
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    displaced = _point(store, name, target)
    old = old_versions(store, name)  # every version but the one just pointed at
    if displaced is not None:
        old.append(displaced)
    return variant_info(store, name), old


def old_versions(store: Path, name: str) -> list[Path]:
    """Version directories of NAME that the store entry does not point at (safe to delete once retired)."""
    versions = store / VERSIONS_DIR
    if not versions.is_dir():
        return []
    current = os.path.realpath(store / f"{name}{ARTIFACT_SUFFIX}")
    return [p for p in versions.glob(f"{name}@*{ARTIFACT_SUFFIX}") if os.path.realpath(p) != current]


def unlink_variant(store: Path, name: str) -> list[Path]:
    """Make NAME invisible in the store (atomic); returns the directories to delete afterwards."""
    entry = store / f"{name}{ARTIFACT_SUFFIX}"
    old = old_versions(store, name)
    if entry.is_symlink():
        target = Path(os.path.realpath(entry))
        entry.unlink()
        return [target, *old]
    if entry.is_dir():
        aside = store / f".{name}.removed-{uuid.uuid4().hex[:8]}"
        os.rename(entry, aside)
        return [aside, *old]
    raise VariantError(f"unknown variant '{name}'", status=404)


def delete_dirs(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


# -- control requests to the model ---------------------------------------------------------------------------
def control_inputs(op: str, **args) -> list:
    """gRPC InferInputs of one control request (text_input is required by the model config: empty)."""
    import tritonclient.grpc as grpcclient

    body = json.dumps({"op": op, **args}).encode()
    inputs = []
    for input_name, value in (("text_input", b""), (CONTROL_INPUT, body)):
        t = grpcclient.InferInput(input_name, [1], "BYTES")
        t.set_data_from_numpy(np.array([value], dtype=np.object_))
        inputs.append(t)
    return inputs


def control(grpc_url: str, op: str, wait_s: float = 60.0, **args) -> dict:
    """Send one control request to deltazip_llm at `grpc_url` (waiting up to `wait_s` for the answer) and
    return its JSON answer; `args` go into the request (name, timeout_s)."""
    from deltazip.serving.client import stream_request

    done = stream_request(grpc_url, control_inputs(op, **args), timeout_s=wait_s)
    return json.loads(done.text or "{}")
