"""Variants added, replaced and removed on a live server: the store operations, the engine's version keys
(a replaced variant's running requests finish on the old version), and the HTTP/CLI lifecycle against a
real tritonserver + OpenAI front."""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from deltazip.family import load_eval_set
from deltazip.serving.variants import VariantError, install_variant, list_variants, unlink_variant


def artifact_copy(src: Path, dst: Path, name: str | None = None, fingerprint: str | None = None,
                  corrupt: bool = False) -> Path:
    """A copy of artifact `src` at `dst`, renamed / re-based / corrupted as asked."""
    shutil.copytree(src, dst)
    manifest_path = dst / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if name is not None:
        manifest["name"] = name
    if fingerprint is not None:
        manifest["base"]["fingerprint"] = fingerprint
    manifest_path.write_text(json.dumps(manifest, indent=2))
    if corrupt:
        payload = next(p for p in dst.iterdir() if p.name != "manifest.json")
        data = bytearray(payload.read_bytes())
        data[len(data) // 2] ^= 0xFF
        payload.write_bytes(bytes(data))
    return dst


def _fingerprint(artifact: Path) -> str:
    return json.loads((artifact / "manifest.json").read_text())["base"]["fingerprint"]


def test_install_verifies_before_anything_is_visible(tiny_deltas, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    src = tiny_deltas["reverse"]
    base = _fingerprint(src)
    bad = {
        "corrupt": artifact_copy(src, tmp_path / "c.dz", name="x", corrupt=True),
        "wrong base": artifact_copy(src, tmp_path / "w.dz", name="x", fingerprint="sha256:" + "0" * 64),
        "misnamed": artifact_copy(src, tmp_path / "m.dz", name="other"),
    }
    for why, path in bad.items():
        with pytest.raises(VariantError, match="artifact refused") as info:
            install_variant(store, "x", path, base)
        assert "\n" not in str(info.value), why
    with pytest.raises(VariantError, match="invalid variant name"):
        install_variant(store, "../x", src, base)
    with pytest.raises(VariantError, match="taken by the base"):
        install_variant(store, "reverse", src, base, reserved=("reverse",))
    with pytest.raises(VariantError, match="not a delta artifact"):
        install_variant(store, "x", tmp_path, base)
    assert list_variants(store) == [] and not [p for p in (store / ".versions").iterdir()]  # no leftovers

    info, old = install_variant(store, "reverse", src, base)
    assert old == [] and (store / "reverse.dz").is_symlink() and info.bits == 2
    first = info.version
    # a replacement by a legacy real directory entry and by a new version: both atomic swaps
    info2, old2 = install_variant(store, "reverse", artifact_copy(tiny_deltas["sort"], tmp_path / "s.dz",
                                                                  name="reverse"), base)
    assert info2.version != first and [p.name for p in old2] == [f"reverse@{first}.dz"]
    legacy = store / "sort.dz"
    shutil.copytree(tiny_deltas["sort"], legacy)  # a plain directory, as `deltazip compress` writes
    _, old3 = install_variant(store, "sort", tiny_deltas["sort"], base)
    assert legacy.is_symlink() and len(old3) == 1 and old3[0].is_dir()
    for path in old2 + old3:
        shutil.rmtree(path)
    assert [v.name for v in list_variants(store)] == ["reverse", "sort"]
    assert [v.version for v in list_variants(store)][0] == info2.version
    for leftover in unlink_variant(store, "sort"):
        shutil.rmtree(leftover)
    assert [v.name for v in list_variants(store)] == ["reverse"]
    with pytest.raises(VariantError, match="unknown variant"):
        unlink_variant(store, "sort")


def test_replace_keeps_running_requests_on_the_old_version(tiny_family, tiny_deltas, tmp_path):
    """In-process engine: a request running when its variant is replaced finishes on the old version;
    the next request gets the new one; the old version's slot and host copy are dropped afterwards."""
    from deltazip.config import RuntimeConfig
    from deltazip.runtime import Engine, GenerationRequest, SamplingParams

    store = tmp_path / "store"
    store.mkdir()
    base = _fingerprint(tiny_deltas["reverse"])
    v1 = artifact_copy(tiny_deltas["reverse"], tmp_path / "v1.dz", name="swap")
    v2 = artifact_copy(tiny_deltas["sort"], tmp_path / "v2.dz", name="swap")
    install_variant(store, "swap", v1, base)
    prompt = load_eval_set(tiny_family.eval_path("reverse"))[0]["prompt"].replace("reverse", "sort", 1)
    engine = Engine.from_dirs(tiny_family.base_dir, store, RuntimeConfig(max_context=128, delta_slots=2))
    engine.start()
    try:
        params = SamplingParams(max_tokens=12)
        old_answer = engine.generate(GenerationRequest(prompt, "swap", params)).text
        replaced = threading.Event()
        leftovers: list[Path] = []

        def on_token(piece: str) -> None:  # runs on the engine thread, mid-request
            if not replaced.is_set():
                _, old = install_variant(store, "swap", v2, base)
                engine.pool.retire("swap")
                leftovers.extend(old)
                replaced.set()

        running = engine.submit(GenerationRequest(prompt, "swap", params), on_token=on_token)
        assert running.result(timeout=120).text == old_answer and replaced.is_set()
        new_answer = engine.generate(GenerationRequest(prompt, "swap", params)).text
        reference = Engine.from_dirs(tiny_family.base_dir, tiny_deltas["sort"].parent,
                                     RuntimeConfig(max_context=128, delta_slots=2))
        try:
            assert new_answer == reference.generate(GenerationRequest(prompt, "sort", params)).text
        finally:
            reference.stop()
        assert new_answer != old_answer
        held = engine.pool.variant_bytes()["swap"]
        assert held["device"] == held["host"] > 0  # exactly one version left, not two
        for path in leftovers:
            shutil.rmtree(path)
    finally:
        engine.stop()


# -- against a live server ---------------------------------------------------------------------------------
def _complete(url: str, model: str, prompt: str, max_tokens: int = 8, **extra) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", timeout=120,
                      json={"model": model, "prompt": prompt, "max_tokens": max_tokens, **extra})


@pytest.mark.slow
def test_live_add_replace_remove(live_server, tiny_deltas, tmp_path):
    url = live_server.front.url
    prompt = load_eval_set(live_server.family.eval_path("upper"))[0]["prompt"]
    want = _complete(url, "upper", prompt).json()["choices"][0]["text"]
    assert _complete(url, "shout", prompt).status_code == 404

    # add: a new variant answers its first request within 1 s of the add returning
    art = artifact_copy(tiny_deltas["upper"], tmp_path / "shout.dz", name="shout")
    response = httpx.post(f"{url}/v1/variants/load", json={"name": "shout", "path": str(art)}, timeout=120)
    assert response.status_code == 200, response.text
    added_at = time.perf_counter()
    first = _complete(url, "shout", prompt)
    first_s = time.perf_counter() - added_at
    assert first.status_code == 200 and first.json()["choices"][0]["text"] == want
    assert first_s < 1.0, f"first request after add took {first_s:.2f} s"
    assert "shout" in {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}

    # bad adds: one clear error each, nothing changes
    for path, name, status, match in (
            (artifact_copy(art, tmp_path / "c.dz", corrupt=True), "shout", 400, "refused"),
            (artifact_copy(art, tmp_path / "w.dz", fingerprint="sha256:" + "1" * 64), "shout", 400,
             "another base"),
            (art, "other", 400, "named 'shout'"),
            (art, "a/b", 400, "invalid variant name"),
            (art, "base", 400, "taken by the base"),
            (tmp_path / "missing.dz", "shout", 400, "not a delta artifact")):
        response = httpx.post(f"{url}/v1/variants/load", json={"name": name, "path": str(path)}, timeout=120)
        assert response.status_code == status and match in response.json()["error"]["message"], response.text
    assert _complete(url, "shout", prompt).json()["choices"][0]["text"] == want

    # replace in place (the vLLM-style alias): new requests get the new version
    art2 = artifact_copy(tiny_deltas["reverse"], tmp_path / "shout2.dz", name="shout")
    response = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "shout", "lora_path": str(art2)},
                          timeout=120)
    assert response.status_code == 200, response.text
    rev = load_eval_set(live_server.family.eval_path("reverse"))[0]["prompt"]
    assert (_complete(url, "shout", rev).json()["choices"][0]["text"]
            == _complete(url, "reverse", rev).json()["choices"][0]["text"])
    assert len([p for p in (live_server.store / ".versions").glob("shout@*")]) == 1  # old version deleted

    # remove while in use: with no wait it is refused (409); with a wait it drains, then frees everything
    with ThreadPoolExecutor(max_workers=12) as pool:
        busy = [pool.submit(_complete, url, "shout", "reverse abcdefgh=", 100, temperature=2.0, seed=i)
                for i in range(12)]
        # all twelve must have reached the server before the unload starts (one that arrives after it is,
        # rightly, refused as an unknown variant): wait for the in-flight count to settle above zero
        deadline, seen, settled_at = time.monotonic() + 30, 0, time.monotonic()
        while time.monotonic() < deadline and (seen == 0 or time.monotonic() - settled_at < 0.3):
            now = _inflight(live_server, "shout")
            if now > seen:
                seen, settled_at = now, time.monotonic()
            time.sleep(0.01)
        refused = httpx.post(f"{url}/v1/variants/unload", json={"name": "shout", "timeout_s": 0}, timeout=60)
        if refused.status_code == 409:  # the usual case: requests were still running
            assert "in use" in refused.json()["error"]["message"]
            removed = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "shout"}, timeout=120)
            assert removed.status_code == 200, removed.text
        else:  # all twelve had finished between the poll and the call: removed at once
            assert refused.status_code == 200, refused.text
        failed = [f.result().text for f in busy if f.result().status_code != 200]
        assert not failed, failed  # in-flight requests finished normally
    assert _complete(url, "shout", prompt).status_code == 404
    assert not (live_server.store / "shout.dz").exists()
    assert not list((live_server.store / ".versions").glob("shout@*"))
    stats = httpx.get(f"{url}/v1/variants").json()["data"]
    assert "shout" not in {v["name"] for v in stats}
    response = httpx.post(f"{url}/v1/variants/unload", json={"name": "shout"}, timeout=60)
    assert response.status_code == 404
    assert _complete(url, "upper", prompt).json()["choices"][0]["text"] == want  # still serving

    # the store is the source of truth: a build of it (what a restart serves) validates every variant
    from deltazip.builder.build import validate_deltas

    _, entries = validate_deltas(live_server.family.base_dir, live_server.store)
    assert {e.name for e in entries} == {"reverse", "sort", "upper"}


def _inflight(live_server, name: str) -> int:
    from deltazip.serving.variants import control

    return control(live_server.triton.grpc_url, "stats")["inflight"].get(name, 0)


@pytest.mark.slow
def test_variants_cli(live_server, tiny_deltas, tmp_path):
    from deltazip.cli import cli

    runner = CliRunner()
    url = live_server.front.url
    art = artifact_copy(tiny_deltas["sort"], tmp_path / "cli.dz", name="cli-sort")
    result = runner.invoke(cli, ["variants", "add", "cli-sort", str(art), "--url", url],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "added cli-sort" in result.output, result.output
    result = runner.invoke(cli, ["variants", "list", "--url", url], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "cli-sort" in result.output and "reverse" in result.output
    result = runner.invoke(cli, ["variants", "add", "nope", str(art), "--url", url])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "named 'cli-sort'" in result.output
    result = runner.invoke(cli, ["variants", "remove", "cli-sort", "--url", url])
    assert result.exit_code == 0 and "removed cli-sort" in result.output
    result = runner.invoke(cli, ["variants", "remove", "cli-sort", "--url", url])
    assert result.exit_code == 2 and "unknown variant 'cli-sort'" in result.output
    result = runner.invoke(cli, ["variants", "list", "--url", "http://127.0.0.1:9"])
    assert result.exit_code == 2 and "cannot reach" in result.output


@pytest.mark.slow
def test_a_restarted_server_serves_what_was_added(live_server, tiny_deltas, tmp_path):
    """The store is the source of truth: a second tritonserver started on the same build (what a restart
    serves) answers for a variant added live, exactly as the live server does."""
    from deltazip.serving.client import generate_grpc
    from deltazip.serving.server import TritonServer

    url = live_server.front.url
    art = artifact_copy(tiny_deltas["sort"], tmp_path / "kept.dz", name="kept")
    assert httpx.post(f"{url}/v1/variants/load", json={"name": "kept", "path": str(art)},
                      timeout=120).status_code == 200
    prompt = load_eval_set(live_server.family.eval_path("sort"))[0]["prompt"]
    want = generate_grpc(live_server.triton.grpc_url, prompt, "kept", stream=False, max_tokens=8)
    try:
        with TritonServer(live_server.build_dir) as restarted:
            got = generate_grpc(restarted.grpc_url, prompt, "kept", stream=False, max_tokens=8)
        assert (got.text, got.completion_tokens) == (want.text, want.completion_tokens)
    finally:
        assert httpx.post(f"{url}/v1/variants/unload", json={"name": "kept"}, timeout=120).status_code == 200
