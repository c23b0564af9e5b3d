"""Issue 11, artifacts: every fault the adversarial review found, each a clean one-line ArtifactError now.

Checksum bypass, uncaught exceptions (RecursionError, KeyError, ZeroDivisionError, OverflowError, TypeError,
RuntimeError, MemoryError), inspect's tracebacks and false "checksums ok", invalid names, loose types, store
entries misnamed or pointing out of the store, stale host copies, leftovers of killed writers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from factories import random_linear

from deltazip.cli import cli
from deltazip.errors import ArtifactError, ChecksumError, RequestError
from deltazip.format import load_delta, read_manifest, save_delta
from deltazip.format.schema import TABLE_KEY, max_json_depth, tensor_table_sha256
from deltazip.fsutil import atomic_dir, clean_stale
from deltazip.runtime.pool import DeltaPool

FP = "sha256:" + "ab" * 32
PAYLOAD, MANIFEST = "delta.safetensors", "manifest.json"


def _artifact(root: Path, name: str = "a") -> Path:
    return save_delta(root / f"{name}.dz", name, FP,
                      {"lm_head": random_linear(8, 64, 2, True, 64),
                       "model.up": random_linear(4, 32, 4, False, 16)},
                      {"model.norm.weight": torch.randn(64)})


def _edit(path: Path, change) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    change(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))


def _payload_header(path: Path) -> tuple[int, dict, bytes]:
    data = (path / PAYLOAD).read_bytes()
    length = int.from_bytes(data[:8], "little")
    return length, json.loads(data[8:8 + length]), data[8 + length:]


def _write_payload(path: Path, header: dict, body: bytes) -> None:
    text = json.dumps(header).encode()
    (path / PAYLOAD).write_bytes(len(text).to_bytes(8, "little") + text + body)


def _resign(path: Path, table: bool = False) -> None:
    """Recompute the payload checksum (and, with `table`, the payload's record of the tensor table), as a
    careful attacker would: the fault must then be caught by the schema or the decoder."""
    if table:
        _, header, body = _payload_header(path)
        tensors = json.loads((path / MANIFEST).read_text())["tensors"]
        header["__metadata__"][TABLE_KEY] = tensor_table_sha256(tensors)
        _write_payload(path, header, body)
    from deltazip.format.manifest import file_digest
    from deltazip.format.schema import checksum_key

    data = (path / PAYLOAD).read_bytes()
    digest = checksum_key(json.loads((path / MANIFEST).read_text())["version"])  # blake3 from version 4
    _edit(path, lambda m: m["files"].update({PAYLOAD: {digest: file_digest(path / PAYLOAD, digest),
                                                       "bytes": len(data)}}))


def _flip_payload_byte(path: Path) -> None:
    data = bytearray((path / PAYLOAD).read_bytes())
    data[-5] ^= 0x10
    (path / PAYLOAD).write_bytes(bytes(data))


# -- checksum bypass ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("files", [{}, {PAYLOAD: None}, {PAYLOAD: {}},
                                   {"other": {"sha256": "0" * 64, "bytes": 0}}])
def test_payload_must_be_listed_and_verified(tmp_path, files):
    path = _artifact(tmp_path)
    _flip_payload_byte(path)
    _edit(path, lambda m: m.update(files=files))
    with pytest.raises(ArtifactError, match="files"):
        load_delta(path)
    with pytest.raises(ArtifactError):
        load_delta(path, verify=False)


def test_inspect_shares_the_loader(tmp_path):
    """No 'checksums ok' for an artifact that cannot load; one error line, never a traceback."""
    path = _artifact(tmp_path)
    result = CliRunner().invoke(cli, ["inspect", str(path)])
    assert result.exit_code == 0 and "ok" in result.output
    _flip_payload_byte(path)
    _edit(path, lambda m: m.update(files={}))
    result = CliRunner().invoke(cli, ["inspect", str(path)])
    assert result.exit_code == 2 and "checksums" not in result.output and "files" in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    # checksums match but a stream does not decode (the payload was re-signed): still not "ok"
    path = _artifact(tmp_path, "b")
    _, header, body = _payload_header(path)
    name = "lm_head"
    begin, _ = header[name]["data_offsets"]
    body = body[:begin] + bytes(len(body[begin:begin + 8])) + body[begin + 8:]
    _write_payload(path, header, body)
    _resign(path)
    assert read_manifest(path)  # the manifest itself is fine
    result = CliRunner().invoke(cli, ["inspect", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output and "ok" not in result.output
    for stats in ({"ratio": "x"}, {"ratio": None}, {"num_parameters": [1]}):  # was a TypeError traceback
        path = _artifact(tmp_path, f"s{len(os.listdir(tmp_path))}")
        _edit(path, lambda m, s=stats: m["stats"].update(s))
        result = CliRunner().invoke(cli, ["inspect", str(path), "--no-verify"])
        assert result.exit_code == 2 and "stats." in result.output, result.output
        assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    path = _artifact(tmp_path, "markup")
    _edit(path, lambda m: m.update(target="[/bold] [red]x"))  # free text is never read as rich markup
    result = CliRunner().invoke(cli, ["inspect", str(path)])
    assert result.exit_code == 0 and "[/bold] [red]x" in result.output


# -- uncaught exceptions ------------------------------------------------------------------------------------
def test_deep_nesting_is_an_artifact_error(tmp_path):
    path = _artifact(tmp_path)
    (path / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)  # was RecursionError
    with pytest.raises(ArtifactError, match="nested"):
        load_delta(path)
    deep: object = 0
    for _ in range(200):
        deep = {"k": [deep]}
    _edit(_artifact(tmp_path, "b"), lambda m: m.update(quality=deep))
    with pytest.raises(ArtifactError, match="nested"):
        load_delta(tmp_path / "b.dz")
    assert max_json_depth(b'{"a": "[[[[\\"[[", "b": [[1]]}') == 3  # brackets inside strings do not count


@pytest.mark.parametrize("change, field", [
    (lambda m: m["tensors"]["lm_head"].pop("bits"), "bits"),  # was KeyError
    (lambda m: m["tensors"]["lm_head"].pop("streams"), "streams"),
    (lambda m: m["base"].pop("fingerprint"), "base.fingerprint"),
    (lambda m: m["files"][PAYLOAD].pop("blake3"), "blake3"),  # version 4; older versions: sha256
    (lambda m: m["tensors"]["lm_head"].update(group_size=0), "group_size"),  # was ZeroDivisionError
    (lambda m: m["tensors"]["lm_head"].update(group_size=-64), "group_size"),
    (lambda m: m["tensors"]["lm_head"].update(shape=[2**62, 2**62]), "shape"),  # was OverflowError
    (lambda m: m["tensors"]["lm_head"]["streams"][0].__setitem__(2, 2**64), "streams"),
    (lambda m: m["files"][PAYLOAD].update(bytes=2**70), "bytes"),
    (lambda m: m.update(tensors=[1, 2]), "tensors"),  # was TypeError
    (lambda m: m["tensors"]["lm_head"].update(streams={"a": 1}), "streams"),
    (lambda m: m["tensors"]["lm_head"].update(shape="8x64"), "shape"),
    (lambda m: m["files"].update({PAYLOAD: [1]}), "files"),
    (lambda m: m["tensors"]["lm_head"]["streams"].__setitem__(0, "nibbles"), "streams"),
    (lambda m: m["tensors"]["model.norm.weight"].update(dtype="float64"), "delta"),  # was RuntimeError
    (lambda m: m["tensors"]["model.norm.weight"].update(shape=[3, 5]), "delta"),
    (lambda m: m["tensors"]["lm_head"].update(shape=[8, 128]), "nibbles"),
    (lambda m: m["tensors"]["lm_head"].update(sparse24="false"), "sparse24"),  # was read as true
    (lambda m: m["tensors"]["lm_head"].update(sparse24=0), "sparse24"),
    (lambda m: m["tensors"]["lm_head"].update(bits=True), "bits"),
    (lambda m: m["tensors"]["lm_head"].update(bits=2.0), "bits"),
    (lambda m: m.update(version=True), "version"),
    (lambda m: m["stats"].update(ratio="9x"), "stats.ratio"),
])
def test_bad_fields_are_one_artifact_error_naming_the_field(tmp_path, change, field):
    path = _artifact(tmp_path)
    _edit(path, change)
    for resign_table in (False, True):  # also when the payload's record of the table was forged to match
        if resign_table:
            if field in ("sha256", "blake3", "bytes", "files"):
                continue  # re-signing would repair these
            try:
                _resign(path, table=True)
            except (KeyError, TypeError, AttributeError):
                continue
        with pytest.raises(ArtifactError, match=field) as info:
            load_delta(path)
        assert "\n" not in str(info.value)


def test_huge_offsets_in_the_payload_header(tmp_path):
    path = _artifact(tmp_path)
    _, header, body = _payload_header(path)
    for offsets in ([0, 2**64], [2**63, 2**63 + 4], [0, 1e300], [-1, 4], ["0", "4"]):  # was OverflowError
        header["lm_head"]["data_offsets"] = offsets
        _write_payload(path, header, body)
        _resign(path)
        with pytest.raises(ArtifactError, match="cannot read"):
            load_delta(path)


def test_sparse_terabyte_payload_is_refused_before_allocation(tmp_path):
    path = _artifact(tmp_path)
    os.truncate(path / PAYLOAD, 1 << 40)  # sparse: costs nothing on disk; was a MemoryError (1 TiB buffer)
    start = time.perf_counter()
    with pytest.raises(ChecksumError, match="size"):
        load_delta(path)
    _edit(path, lambda m: m["files"][PAYLOAD].update(bytes=1 << 40))  # the listed size agrees now
    for verify in (True, False):
        with pytest.raises(ArtifactError, match="cannot hold"):
            load_delta(path, verify=verify)
    assert time.perf_counter() - start < 5


# -- accepted although invalid ------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["name", "tensor", "file"])
@pytest.mark.parametrize("bad", ["../../etc/passwd", "", "a\x00b", "/abs/path", "..", ".hidden", "x" * 5000])
def test_names_inside_the_manifest(tmp_path, where, bad):
    path = _artifact(tmp_path)
    if where == "name":
        _edit(path, lambda m: m.update(name=bad))
    elif where == "tensor":
        _edit(path, lambda m: m["tensors"].update({bad: m["tensors"].pop("lm_head")}))
    else:
        _edit(path, lambda m: m["files"].update({bad: {"sha256": "0" * 64, "bytes": 0}}))
    with pytest.raises(ArtifactError):
        load_delta(path)


def test_manifest_edits_are_detected_by_the_payloads_table_record(tmp_path):
    """A manifest edit that still makes sense (an exact tensor reshaped) would load other tensors: the
    payload records the table's sha256, so it is caught (older artifacts without the record still load)."""
    path = _artifact(tmp_path)
    _edit(path, lambda m: m["tensors"]["model.norm.weight"].update(shape=[2, 32]))
    with pytest.raises(ChecksumError, match="tensor table"):
        load_delta(path)
    _, header, body = _payload_header(path)
    del header["__metadata__"][TABLE_KEY]
    _write_payload(path, header, body)
    _resign(path)
    assert load_delta(path).exact["model.norm.weight"].shape == (2, 32)


def test_duplicate_keys_and_non_regular_files(tmp_path):
    path = _artifact(tmp_path)
    text = (path / MANIFEST).read_text()
    (path / MANIFEST).write_text(text.replace('"tensors":{', '"tensors":{"lm_head":{},', 1))
    with pytest.raises(ArtifactError, match="duplicate"):
        load_delta(path)
    path = _artifact(tmp_path, "b")
    (path / PAYLOAD).unlink()
    os.mkfifo(path / PAYLOAD)  # never blocks the reader
    with pytest.raises(ArtifactError):
        load_delta(path)
    (path / PAYLOAD).unlink()
    (path / PAYLOAD).symlink_to("/dev/zero")
    with pytest.raises(ArtifactError):
        load_delta(path)
    (path / MANIFEST).unlink()
    (path / MANIFEST).symlink_to("/dev/zero")
    with pytest.raises(ArtifactError, match="not a delta artifact"):
        load_delta(path)


def test_version_1_layout_still_loads(tmp_path):
    import importlib.util

    script = Path(__file__).parent.parent / "benchmarks" / "fuzz_artifacts.py"
    spec = importlib.util.spec_from_file_location("fuzz_artifacts", script)
    fuzz = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fuzz)
    v2 = _artifact(tmp_path)
    v1 = fuzz._as_version_1(v2, tmp_path / "v1.dz")
    manifest = read_manifest(v1)
    assert manifest["version"] == 1 and manifest["tensors"]["lm_head"]["streams"][0][0] == "groups"
    assert fuzz.fingerprint_of(load_delta(v1)) == fuzz.fingerprint_of(load_delta(v2))


# -- the store ----------------------------------------------------------------------------------------------
def _pool(store: Path, host_cache_bytes: int = 1 << 30) -> DeltaPool:
    return DeltaPool(store, FP, 2, host_cache_bytes, install=lambda slot, art: None,
                     uninstall=lambda slot: None)


def test_store_entry_must_match_its_manifest_name(tmp_path):
    store = tmp_path / "store"
    _artifact(store, "a")
    os.rename(store / "a.dz", store / "b.dz")  # was served as 'b'
    pool = _pool(store)
    with pytest.raises(ArtifactError, match="names it 'a'"):
        pool.acquire("b")
    pool.close()


def test_store_entry_symlinked_outside_the_store_is_refused(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    outside = _artifact(tmp_path / "elsewhere", "x")
    (store / "x.dz").symlink_to(outside)
    versions = store / ".versions"
    inside = _artifact(versions, "y")
    (store / "y.dz").symlink_to(os.path.relpath(inside, store))  # what `variants add` makes: allowed
    pool = _pool(store)
    assert pool.names() == ["y"]
    with pytest.raises(RequestError, match="outside the store"):
        pool.acquire("x")
    assert pool.acquire("y") == 0
    pool.close()


def test_changed_or_deleted_artifact_is_noticed_despite_the_host_cache(tmp_path):
    """Decision (docs/FORMAT.md, "Serving from a store"): the pool keys its tiers by the files' identity, so
    a payload rewritten or removed on disk is loaded (and verified) again by the next request."""
    store = tmp_path / "store"
    path = _artifact(store, "a")
    pool = _pool(store)
    first = pool.prefetch("a").result()
    assert pool.prefetch("a").result() is first  # served from the host tier
    time.sleep(0.01)
    _flip_payload_byte(path)
    with pytest.raises(ChecksumError):
        pool.prefetch("a").result()
    assert "a" not in pool.host_resident()  # the stale copy was dropped
    (path / PAYLOAD).unlink()
    with pytest.raises(ArtifactError, match="missing"):
        pool.prefetch("a").result()
    (path / MANIFEST).unlink()
    with pytest.raises(RequestError):
        pool.prefetch("a")
    pool.close()


# -- leftovers of killed writers ----------------------------------------------------------------------------
def test_stale_temp_dirs_are_cleaned_up(tmp_path):
    old = time.time() - 3600
    stale_tmp = tmp_path / ".a.dz.tmp-0123abcd"
    stale_old = tmp_path / ".b.dz.old-89abcdef"
    orphan_old = tmp_path / ".c.dz.old-00000000"  # a replace killed between its renames: c.dz is missing
    for d in (stale_tmp, stale_old, orphan_old):
        d.mkdir()
        (d / "f").write_text("x")
        os.utime(d, (old, old))
    (tmp_path / "b.dz").mkdir()
    live = tmp_path / ".d.dz.tmp-11112222"  # a writer still working holds its lock
    live.mkdir()
    os.utime(live, (old, old))
    import fcntl

    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with atomic_dir(tmp_path / "new.dz") as tmp:
            (tmp / "f").write_text("1")
    finally:
        os.close(fd)
    assert sorted(os.listdir(tmp_path)) == [".d.dz.tmp-11112222", "b.dz", "c.dz", "new.dz"]
    assert (tmp_path / "c.dz" / "f").is_file()
    assert clean_stale(tmp_path, min_age_s=0) == [live]  # unlocked now


def test_killed_save_leaves_nothing_behind_at_the_next_start(tmp_path):
    store = tmp_path / "store"
    code = ("import os\nfrom deltazip.fsutil import atomic_dir\n"
            f"with atomic_dir({str(store / 'k.dz')!r}) as tmp:\n"
            "    (tmp / 'part').write_bytes(b'x' * 1000)\n    os.kill(os.getpid(), 9)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -9
    leftovers = [p for p in os.listdir(store) if ".tmp-" in p]
    assert len(leftovers) == 1
    old = time.time() - 60
    os.utime(store / leftovers[0], (old, old))
    _pool(store).close()  # opening the store cleans up
    assert os.listdir(store) == []
    _artifact(store, "a")
    (store / ".a.dz.old-abcdef01").mkdir()
    os.utime(store / ".a.dz.old-abcdef01", (old, old))
    save_delta(store / "a.dz", "a", FP, {"lm_head": random_linear(8, 64, 2, True, 64)}, {}, overwrite=True)
    assert os.listdir(store) == ["a.dz"]  # the next write cleans up too; the replace left nothing
