"""`deltazip demo`: family → compressed deltas → build → tritonserver → every variant over gRPC and HTTP."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import click

from deltazip.commands.context import get_config

# short headers: the table fits an 80-column terminal (7 columns of tiny-family rows ≈ 75 characters)
DEMO_COLUMNS = ["variant", "prompt", "answer", "ok", "ratio", "swap ms", "gRPC/HTTP ms"]


def _reusable(path: Path, base_fingerprint: str, settings: dict) -> bool:
    """An existing artifact is kept when it loads (checksums verified) and its base and settings match."""
    from deltazip.errors import DeltazipError
    from deltazip.format import load_delta

    try:
        manifest = load_delta(path, verify=True).manifest
    except DeltazipError:
        return False
    stored = {k: v for k, v in manifest.get("settings", {}).items() if k != "calib"}
    wanted = {k: v for k, v in settings.items() if k != "calib"}
    return manifest["base"]["fingerprint"] == base_fingerprint and stored == wanted


def _load_seconds(stats: dict) -> float:
    pool = stats.get("pool", {})
    return pool.get("disk_load_s", 0.0) + pool.get("slot_load_s", 0.0)


def _timed(generate, *args, **kwargs):
    started = time.perf_counter()
    done = generate(*args, **kwargs)
    return done, (time.perf_counter() - started) * 1e3


@click.command()
@click.option("--tasks", default=None, help="Comma-separated fine-tunes to serve (default: all).")
@click.option("--max-tokens", type=int, default=16, show_default=True, help="Most new tokens per answer.")
@click.option("--host", default=None, help="Address to bind ([serve].host); ports are picked free.")
@click.pass_context
def demo(ctx: click.Context, tasks: str | None, max_tokens: int, host: str | None) -> None:
    """Create/reuse the tiny family, compress its fine-tunes, build, serve, query each variant, stop."""
    import json

    from deltazip.builder.build import build
    from deltazip.compress import compress_model
    from deltazip.errors import DeltazipError
    from deltazip.family import create_family, load_eval_set
    from deltazip.format import fingerprint_model
    from deltazip.serving.client import generate_grpc, generate_http
    from deltazip.serving.server import TritonServer
    from deltazip.ui import console, print_table, progress

    config = get_config(ctx)
    from deltazip.threads import configure_threads

    configure_threads(config.runtime.threads)  # the CPUs this process may use, or [runtime] threads
    family_dir = config.path(config.family.dir)
    console.print(f"[1/5] family: creating or reusing {family_dir} (preset {config.family.preset}) …")
    family = create_family(family_dir, preset=config.family.preset, seed=config.family.seed)
    chosen = [t.strip() for t in tasks.split(",")] if tasks else list(family.tasks)
    unknown = sorted(set(chosen) - set(family.tasks))
    if unknown:
        known = ", ".join(family.tasks)
        raise DeltazipError(f"unknown task(s) {', '.join(unknown)} (the family has: {known})")

    store = config.path(config.store.deltas)
    store.mkdir(parents=True, exist_ok=True)
    console.print(f"[2/5] compress: {len(chosen)} fine-tune(s) into {store} …")
    base_fingerprint = fingerprint_model(family.base_dir)
    settings = dataclasses.asdict(config.compress)
    for task in progress(chosen, desc="compress"):
        path = store / f"{task}.dz"
        if _reusable(path, base_fingerprint, settings):
            console.print(f"  reuse     {task}")
            continue
        started = time.perf_counter()
        compress_model(family.base_dir, family.finetune_dirs[task], path, config.compress, name=task,
                       calib=family.calib_path, overwrite=True)
        console.print(f"  compressed {task} ({time.perf_counter() - started:.1f} s)")

    out = config.path(config.build.out)
    console.print(f"[3/5] build: {out} …")
    # The build serves every artifact of the store; a demo restricted by --tasks builds from a subset view.
    build_store = store
    if set(p.name[:-3] for p in store.glob("*.dz")) != set(chosen):
        build_store = out.parent / f".{out.name}-store"
        import shutil

        from deltazip.fsutil import link_tree

        shutil.rmtree(build_store, ignore_errors=True)
        build_store.mkdir(parents=True)
        for task in chosen:  # hard links, not symlinks: the pool refuses entries pointing out of its store
            link_tree(store / f"{task}.dz", build_store / f"{task}.dz")
    manifest = build(family.base_dir, build_store, out, config.runtime, base_name=str(family.base_dir))

    console.print("[4/5] serve: starting tritonserver on free ports …")
    server = TritonServer(out, host=host or config.serve.host, stats_path=out / "engine-stats.json")
    rows = []
    with server:
        console.print(f"  ready: HTTP {server.http_url}, gRPC {server.grpc_url}")
        console.print("[5/5] query: each variant over gRPC (streaming) and HTTP …")
        ratios = {d["name"]: json.loads((Path(d["path"]) / "manifest.json").read_text())["stats"]["ratio"]
                  for d in manifest["deltas"]}
        for variant in progress(["", *chosen], desc="query"):
            example = load_eval_set(family.eval_path(variant or chosen[0]))[0]
            load_s_before = _load_seconds(server.engine_stats())
            cold, cold_ms = _timed(generate_grpc, server.grpc_url, example["prompt"], variant, stream=True,
                                   max_tokens=max_tokens)
            swap_in_ms = (_load_seconds(server.engine_stats()) - load_s_before) * 1e3
            http, http_ms = _timed(generate_http, server.http_url, example["prompt"], variant,
                                   max_tokens=max_tokens)
            answer = repr(cold.text) if http.text == cold.text else f"{cold.text!r} (HTTP: {http.text!r})"
            rows.append((variant or "base", example["prompt"], answer,
                         "yes" if cold.text.strip() == example["answer"] else "no",
                         f"{ratios[variant]:.1f}x" if variant else "-",
                         f"{swap_in_ms:.1f}" if variant else "-", f"{cold_ms:.0f}/{http_ms:.0f}"))
    print_table("deltazip demo: one tritonserver, the base and every fine-tune", DEMO_COLUMNS, rows)
    console.print("answer: gRPC streamed text (HTTP's shown only where it differs); ok: the task's answer; "
                  "ratio: fp16 bytes / artifact bytes; swap ms: the engine's disk → host → slot load time "
                  "for the delta's first request; gRPC/HTTP ms: one request each. Server stopped.")
