"""Soak: a real tritonserver under concurrency 16 for minutes, over more variants than device slots (every
few requests evicts a delta), with a slice of bad requests mixed in. Counts good requests that failed,
answers that differ from the same request sent alone (greedy, before the soak), bad requests that were
accepted, and the server's RSS (tritonserver + its Python stub) after a warm-up at full load and at the end.
Targets: 0 good requests failed or changed; RSS growth < 5 %.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/soak.py [--minutes 10] [--concurrency 16] [--slots 2]
        [--bad-every 8] [--max-tokens 16] [--no-write]

Every `bad-every`-th request is bad, cycling through the kinds in BAD (unsamplable temperatures, a 1 MB
prompt, unknown and oversized delta names, out-of-range parameters, too many stop strings) over gRPC and
HTTP; good requests alternate gRPC streaming, gRPC whole-answer and HTTP.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import command_line, markdown_table, write_section  # noqa: E402

TITLE = "Soak: concurrency 16, more variants than slots, bad requests mixed in (tiny, CPU)"
REPO = Path(__file__).resolve().parent.parent

# (label, protocol, generate kwargs that override the good request's, error text expected)
BAD = [
    ("temperature=1e-40", "grpc", {"temperature": 1e-40}, "temperature must be"),
    ("1 MB prompt", "grpc", {"prompt": "reverse " + "a" * 1_000_000 + "="}, "context holds"),
    ("unknown delta", "http", {"model": "no-such-delta"}, "unknown delta"),
    ("1 KB delta name", "grpc", {"model": "n" * 1024}, "invalid delta name"),
    ("temperature=1e9", "http", {"temperature": 1e9}, "temperature must be"),
    ("max_tokens=-1", "grpc", {"max_tokens": -1}, "max_tokens must be"),
    ("top_p=0", "http", {"top_p": 0.0}, "top_p must be"),
    ("17 stop strings", "grpc", {"stop": [f"s{i}" for i in range(17)]}, "stop strings"),
    ("path as delta", "http", {"model": "../reverse"}, "invalid delta name"),
]


def server_rss_mb(server) -> float:
    """Resident memory of tritonserver and its Python stub processes (MiB)."""
    from deltazip.serving.server import stub_pids

    total_kb = 0
    for pid in [server.process.pid, *stub_pids(server.shm_prefix)]:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except OSError:
            pass
    return total_kb / 1024


def _good(server, job, i: int, max_tokens: int) -> tuple[str, str]:
    from deltazip.serving.client import generate_grpc, generate_http

    variant, prompt = job
    if i % 3 == 2:
        done = generate_http(server.http_url, prompt, variant, stream=i % 2 == 0, max_tokens=max_tokens)
    else:
        done = generate_grpc(server.grpc_url, prompt, variant, stream=i % 3 == 0, max_tokens=max_tokens)
    return done.text, done.finish_reason


def _bad(server, kind: tuple, max_tokens: int) -> str | None:
    """Send one bad request; the error text, or None when it was (wrongly) answered."""
    from deltazip.serving.client import ClientError, generate_grpc, generate_http

    _, protocol, overrides, _ = kind
    kwargs = {"prompt": "reverse abcdef=", "model": "reverse", "max_tokens": max_tokens, **overrides}
    prompt, model = kwargs.pop("prompt"), kwargs.pop("model")
    try:
        if protocol == "http":
            generate_http(server.http_url, prompt, model, **kwargs)
        else:
            generate_grpc(server.grpc_url, prompt, model, **kwargs)
    except ClientError as e:
        return str(e)
    return None


def run_soak(server, jobs: list[tuple[str, str]], expected: dict, seconds: float, concurrency: int = 16,
             bad_every: int = 8, max_tokens: int = 16, warmup_s: float = 0.0,
             progress=None) -> dict:
    """Load `server` from `concurrency` threads for `seconds` (after `warmup_s` at the same load, whose
    requests count too); every `bad_every`-th request is bad. `expected[job]` = (text, finish_reason) of the
    job sent alone. Returns counters, latencies, RSS (MiB) and up to 10 examples of anything wrong."""
    counter = itertools.count()
    lock = threading.Lock()
    stats = {"good": 0, "bad": 0, "good_failed": 0, "good_changed": 0, "bad_accepted": 0,
             "bad_wrong_error": 0, "examples": [], "latencies": []}
    rss = {"before": server_rss_mb(server)}
    start = time.monotonic()
    deadline = start + warmup_s + seconds

    def note(key: str, example: str) -> None:
        with lock:
            stats[key] += 1
            if len(stats["examples"]) < 10:
                stats["examples"].append(f"{key}: {example[:300]}")

    def worker() -> None:
        from deltazip.serving.client import ClientError

        while time.monotonic() < deadline:
            n = next(counter)
            if n % bad_every == bad_every - 1:
                kind = BAD[(n // bad_every) % len(BAD)]
                error = _bad(server, kind, max_tokens)
                with lock:
                    stats["bad"] += 1
                if error is None:
                    note("bad_accepted", kind[0])
                elif kind[3] not in error:
                    note("bad_wrong_error", f"{kind[0]}: {error}")
                continue
            job = jobs[n % len(jobs)]
            began = time.perf_counter()
            try:
                answer = _good(server, job, n, max_tokens)
            except ClientError as e:
                note("good_failed", f"{job}: {e}")
                continue
            with lock:
                stats["good"] += 1
                stats["latencies"].append(time.perf_counter() - began)
            if answer != expected[job]:
                note("good_changed", f"{job}: {answer} != {expected[job]}")

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    if warmup_s:
        time.sleep(warmup_s)
    rss["start"] = server_rss_mb(server)
    peak, printed = rss["start"], time.monotonic()
    while any(t.is_alive() for t in threads):
        time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
        peak = max(peak, server_rss_mb(server))
        if progress is not None and time.monotonic() - printed >= 30:
            printed = time.monotonic()
            with lock:
                progress(printed - start, dict(stats), peak)
        if time.monotonic() > deadline + 300:
            raise RuntimeError("soak workers did not finish 300 s after the deadline")
    rss["end"] = server_rss_mb(server)
    latencies = sorted(stats.pop("latencies"))
    stats.update(
        seconds=time.monotonic() - start, rss_before_mb=rss["before"], rss_start_mb=rss["start"],
        rss_end_mb=rss["end"], rss_peak_mb=max(peak, rss["end"]),
        rss_growth=(rss["end"] - rss["start"]) / rss["start"] if rss["start"] else float("nan"),
        p50_s=statistics.median(latencies) if latencies else float("nan"),
        p99_s=latencies[int(0.99 * (len(latencies) - 1))] if latencies else float("nan"))
    return stats


def _store(family, root: Path) -> Path:
    """Every fine-tune of the family compressed with the default settings into one store (cached)."""
    from deltazip.compress import compress_model
    from deltazip.config import CompressConfig
    from deltazip.format import load_delta

    store = root / f"soak-deltas-{family.content_hash[:12]}"
    store.mkdir(parents=True, exist_ok=True)
    for task in family.tasks:
        out = store / f"{task}.dz"
        try:
            load_delta(out)
            continue
        except Exception:  # noqa: BLE001 - missing or stale: compress it again
            shutil.rmtree(out, ignore_errors=True)
        print(f"compressing {task} …", flush=True)
        compress_model(family.base_dir, family.finetune_dirs[task], out, CompressConfig(), name=task,
                       calib=family.calib_path)
    return store


def _uptime() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--slots", type=int, default=2, help="device slots (fewer than the variants)")
    parser.add_argument("--bad-every", type=int, default=8, help="every N-th request is a bad one")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--warmup-s", type=float, default=60.0, help="full load before RSS 'start'")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()

    import tempfile

    from deltazip.builder.build import build
    from deltazip.config import RuntimeConfig
    from deltazip.family import create_family, load_eval_set
    from deltazip.serving.client import generate_grpc
    from deltazip.serving.server import TritonServer
    from deltazip.serving.variants import control

    cache = Path(os.environ.get("DELTAZIP_TEST_CACHE", REPO / ".deltazip" / "test-cache"))
    family = create_family(cache / "family-tiny-s0", preset="tiny", seed=0)
    store = _store(family, cache)
    variants = sorted(p.name[:-3] for p in store.glob("*.dz"))
    assert len(variants) > args.slots, "the soak needs more variants than device slots"
    jobs = []
    for variant in ["", *variants]:
        examples = load_eval_set(family.eval_path(variant or "copy"))[:2]
        jobs += [(variant, e["prompt"]) for e in examples]
    load_start = _uptime()
    with tempfile.TemporaryDirectory(prefix="deltazip-soak-") as tmp:
        out = Path(tmp) / "build"
        runtime = RuntimeConfig(max_context=128, max_batch_size=16, delta_slots=args.slots)
        build(family.base_dir, store, out, runtime)
        with TritonServer(out) as server:
            expected = {}
            for variant, prompt in jobs:  # the reference: each job alone, greedy
                done = generate_grpc(server.grpc_url, prompt, variant, stream=False,
                                     max_tokens=args.max_tokens)
                expected[variant, prompt] = (done.text, done.finish_reason)

            def progress(elapsed: float, s: dict, peak: float) -> None:
                print(f"{elapsed:6.0f} s  good {s['good']}  bad {s['bad']}  failed {s['good_failed']}  "
                      f"changed {s['good_changed']}  accepted-bad {s['bad_accepted']}  "
                      f"rss peak {peak:.0f} MiB", flush=True)

            stats = run_soak(server, jobs, expected, seconds=args.minutes * 60, concurrency=args.concurrency,
                             bad_every=args.bad_every, max_tokens=args.max_tokens, warmup_s=args.warmup_s,
                             progress=progress)
            engine = control(server.grpc_url, "stats")["engine"]
    load_end = _uptime()
    pool = engine["pool"]
    rows = [
        ["duration (s, incl. warm-up)", f"{stats['seconds']:.0f}"],
        ["variants / device slots", f"{len(variants)} + base / {args.slots}"],
        ["good requests", stats["good"]],
        [f"bad requests (1 in {args.bad_every}, {len(BAD)} kinds)", stats["bad"]],
        ["good failed", stats["good_failed"]],
        ["good answers ≠ sequential greedy", stats["good_changed"]],
        ["bad accepted / wrong error", f"{stats['bad_accepted']} / {stats['bad_wrong_error']}"],
        ["good latency p50 / p99 (s)", f"{stats['p50_s']:.3f} / {stats['p99_s']:.3f}"],
        ["slot evictions / loads", f"{pool['evictions']} / {pool['slot_loads']}"],
        ["engine errors (bad requests that reached it)", engine["errors"]],
        ["RSS before load (MiB)", f"{stats['rss_before_mb']:.0f}"],
        ["RSS after warm-up → end (MiB)", f"{stats['rss_start_mb']:.0f} → {stats['rss_end_mb']:.0f}"],
        ["RSS growth (target < 5 %)", f"{100 * stats['rss_growth']:+.2f} %"],
        ["RSS peak (MiB)", f"{stats['rss_peak_mb']:.0f}"],
        ["load average at start / end (1, 5, 15 min)", f"{load_start} / {load_end}"],
    ]
    table = markdown_table(["measure", "value"], rows)
    print(table)
    for example in stats["examples"]:
        print(" ", example)
    if not args.no_write:
        notes = (f"Concurrency {args.concurrency}, max_tokens {args.max_tokens}, warm-up "
                 f"{args.warmup_s:.0f} s at full load before the RSS 'start' sample; RSS = tritonserver + "
                 "Python stub (VmRSS). "
                 "Sequential greedy = each request sent alone before the soak. The machine is shared with "
                 "other jobs (load averages above).")
        if stats["examples"]:
            notes += "\n\nExamples: " + "; ".join(stats["examples"])
        write_section(TITLE, command_line(), table, notes)


if __name__ == "__main__":
    main()
