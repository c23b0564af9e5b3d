"""Multi-tenant serving through a real tritonserver: deltazip vs full-model swapping, side by side in one run.

Systems (the same Triton model, the same Engine and Llama executor; deltazip/runtime/full_swap.py):
  (a) deltazip   — the base plus V compressed deltas in device slots, mixed-delta batches;
  (b) full-swap  — the merged fp16 fine-tunes, at most k loaded within the SAME memory budget as (a)
                   (k = floor((base + delta-slot bytes of (a)) / bytes of one full model in the runtime
                   dtype), at least 1: the whole budget goes to fine-tunes, as the trace never asks for the
                   bare base — the engine's own base copy is outside the comparison), LRU swap from disk on
                   a miss, one model per forward pass;
  (c) all-resident — every merged model loaded (k = V): the upper bound, run where this machine's memory
                   allows it (V x full model bytes <= --resident-limit-bytes).
(b) is a fair stand-in for what users run without deltazip: one full checkpoint per fine-tune, as many as
fit in the budget, the least recently used one replaced by reading the whole checkpoint (what Triton
explicit model control or one vLLM process per model do); it shares every other part of the stack with (a)
(continuous batching, KV budget, tokenizer, sampling, gRPC front), so the difference is the weights alone.
Its one simplification favours it: requests of the k resident models share engine iterations (one forward
pass per model), where a real per-model server would not batch across models at all.

Workload: variants derived from one base of the chosen preset's shape (synthetic random weights, fp16 on
disk, the family's character tokenizer) — `--distinct` random 2-bit 2:4 deltas replicated under V names
(the replicas' payloads and merged checkpoints are hard links: the same bytes, different names, so every
variant is a separate slot / full model). Popularity uniform or Zipf(α) over the V names (rank 1 = d00);
Poisson arrivals at each offered rate for --duration seconds; prompt "<task> <word>=" with a word of 4–12
random letters (9–17 tokens); max_tokens uniform in [8, 24] (random weights rarely emit EOS; generated
tokens are counted from the responses), greedy. Each (V, popularity, rate) trace is drawn from --seed and
replayed identically against every system. Before the measured traces every variant is requested once
(warm-up). Page cache (--page-cache): warm — artifacts and checkpoints were just written and are not dropped
(the most favourable case for full-model swapping); cold — during each measured trace a thread drops every
artifact and checkpoint file from the page cache every 20 ms, so each swap-in reads the disk, as on a server
whose page cache cannot hold V full checkpoints (V x 13-26 GB at 7B/13B).

Load generator: a small asyncio replayer on tritonclient.grpc.aio (one bidirectional stream, each request
sent at its trace time, token responses streamed back). perf_analyzer was checked first: --request-intervals
gives the Poisson schedule and --input-data can hold one entry per request, but perf_analyzer hands data
entries to its worker threads independently of the interval schedule (each thread steps through the data on
its own), so the variant of the i-th arrival is not the trace's, and its reports are aggregates (no per-
request TTFT/E2E, no per-system swap counters). The replayer records, per request: send time, first token,
final response, completion tokens.

Metrics per system and rate: achieved throughput (completed req/s, generated tokens/s), TTFT and end-to-end
latency (mean, p50, p99 over completed requests), SLO attainment (end-to-end <= --slo-s; a request that did
not finish within the drain window counts as a miss), swap-ins (disk -> device loads) and bytes moved.
Throughput at the SLO = the highest achieved req/s among the offered rates whose attainment is >= 90%.
Once a system fails to drain a rate, its higher rates are skipped (saturated).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/multitenant.py          # the full sweep (<= 15 min)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import shutil
import statistics
import string
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import command_line, markdown_table, write_section  # noqa: E402

SHAPES = {  # benchmarks/runtime.py's presets
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2),
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2),
}
SYSTEMS = ("deltazip", "full-swap", "all-resident")
PAGE_CACHE_NOTE = {
    "warm": "Page cache warm for every system (files just written, not dropped).",
    "cold": "Page cache cold for every system: during each measured trace a thread drops every artifact "
            "and checkpoint file from the page cache every 20 ms (posix_fadvise DONTNEED), so every swap-in "
            "reads the disk — the state at 7B/13B scale, where V full checkpoints outgrow the page cache.",
}
TASKS = ("reverse", "sort", "upper", "count", "copy", "rotate")


# -- variants ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Variants:
    base: Path
    store: Path  # NAME.dz artifacts
    full: Path  # NAME/ merged checkpoints
    names: list[str]


def synthetic_base(out: Path, preset: str) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from deltazip.family.tokenizer import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, **SHAPES[preset])
    LlamaForCausalLM(cfg).to(torch.float16).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def random_artifacts(base: Path, store: Path, count: int) -> list[Path]:
    """`count` random 2-bit 2:4 deltas (every linear, embedding and lm_head packed; norms exact)."""
    from safetensors.torch import load_file

    from deltazip.format import fingerprint_model, save_delta
    from deltazip.kernels.synthetic import random_packed

    fingerprint = fingerprint_model(base)
    params = sorted(load_file(base / "model.safetensors").items())
    gen = torch.Generator().manual_seed(1)
    out = []
    for i in range(count):
        linears, exact = {}, {}
        for name, p in params:
            if p.dim() == 2:
                linears[name.removesuffix(".weight")] = random_packed(*p.shape, 2, p.shape[1], True, gen)
            else:
                exact[name] = torch.randn(p.shape, generator=gen) * 1e-3
        out.append(save_delta(store / f".src{i}.dz", f"src{i}", fingerprint, linears, exact))
    return out


def replicate(sources: list[Path], store: Path, names: list[str]) -> None:
    """NAME.dz for each name: the payload hard-linked from a source, the manifest renamed (the pool serves an
    entry only under its manifest's name; the payload checksum does not cover the name)."""
    for i, name in enumerate(names):
        src, dst = sources[i % len(sources)], store / f"{name}.dz"
        dst.mkdir()
        os.link(src / "delta.safetensors", dst / "delta.safetensors")
        manifest = json.loads((src / "manifest.json").read_text())
        manifest["name"] = name
        (dst / "manifest.json").write_text(json.dumps(manifest, separators=(",", ":")))


def merged_checkpoints(base: Path, sources: list[Path], full: Path, names: list[str]) -> None:
    """NAME/ for each name: the merged fp16 fine-tune of its source delta (apply_delta), hard-linked."""
    from deltazip.format import apply_delta

    merged = [apply_delta(base, src, full / f".merged{i}") for i, src in enumerate(sources)]
    for i, name in enumerate(names):
        src, dst = merged[i % len(merged)], full / name
        dst.mkdir()
        for f in src.iterdir():
            os.link(f, dst / f.name)


def synthetic_variants(root: Path, preset: str, count: int, distinct: int) -> Variants:
    base = synthetic_base(root / "base", preset)
    store, full = root / "deltas", root / "full"
    store.mkdir()
    full.mkdir()
    names = [f"d{i:02d}" for i in range(count)]
    sources = random_artifacts(base, root / "sources", min(distinct, count))
    replicate(sources, store, names)
    merged_checkpoints(base, sources, full, names)
    return Variants(base, store, full, names)


def family_variants(root: Path, base: Path, artifacts: list[Path]) -> Variants:
    """Real deltas (the tiny family's): a store of links to them and their merged checkpoints."""
    store, full = root / "deltas", root / "full"
    store.mkdir(parents=True)
    full.mkdir(parents=True)
    names = [json.loads((a / "manifest.json").read_text())["name"] for a in artifacts]
    for name, art in zip(names, artifacts, strict=True):
        (store / f"{name}.dz").mkdir()
        for f in art.iterdir():
            os.link(f, store / f"{name}.dz" / f.name)
    merged_checkpoints(base, artifacts, full, names)
    for i in range(len(artifacts)):  # the hard-linked names stay; the sources go
        shutil.rmtree(full / f".merged{i}")
    return Variants(base, store, full, names)


# -- memory budget -------------------------------------------------------------------------------------------
def budget(v: Variants, dtype: str) -> dict:
    """Resident bytes of (a) with one slot per variant, of one full model, and the k that fits (b)."""
    from deltazip.format import load_delta
    from deltazip.runtime.delta_linear import enable_deltas, resident_delta_bytes, set_model_delta
    from deltazip.runtime.full_swap import model_nbytes
    from deltazip.runtime.model import load_llama

    model = load_llama(v.base, dtype)
    base_bytes = model_nbytes(model)
    enable_deltas(model, len(v.names), "torch")
    art = load_delta(v.store / f"{v.names[0]}.dz")
    for slot in range(len(v.names)):
        set_model_delta(model, slot, art.linears, art.exact)
    delta_bytes = resident_delta_bytes(model)
    # full-swap spends the whole budget on fine-tunes: its trace never asks for the bare base
    k = max(1, (base_bytes + delta_bytes) // base_bytes)
    return {"base_bytes": base_bytes, "delta_slot_bytes": delta_bytes,
            "budget_bytes": base_bytes + delta_bytes, "full_model_bytes": base_bytes, "k": int(k),
            "artifact_bytes": sum(f.stat().st_size for f in (v.store / f"{v.names[0]}.dz").iterdir()),
            "checkpoint_bytes": sum(f.stat().st_size for f in (v.full / v.names[0]).glob("*.safetensors"))}


def runtime_config(system: str, v: Variants, k: int, max_batch: int, max_context: int):
    from deltazip.config import RuntimeConfig

    common = dict(device="cpu", dtype="float32", max_batch_size=max_batch, max_context=max_context,
                  kv_budget_tokens=max_batch * max_context, threads=int(os.environ.get("OMP_NUM_THREADS", 0)))
    if system == "deltazip":
        return RuntimeConfig(**common, delta_slots=len(v.names), host_cache_bytes=1 << 31)
    return RuntimeConfig(**common, delta_slots=1, mode="full_swap", full_models=str(v.full),
                         full_resident=k if system == "full-swap" else len(v.names))


# -- traces --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Request:
    at: float
    variant: str
    prompt: str
    max_tokens: int


def popularity(names: list[str], alpha: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, len(names) + 1) ** alpha
    return weights / weights.sum()


def make_trace(names: list[str], alpha: float, rate: float, duration: float, seed: int) -> list[Request]:
    rng = np.random.default_rng([seed, len(names), int(alpha * 100), int(rate * 1000)])
    out, t = [], 0.0
    p = popularity(names, alpha)
    while True:
        t += rng.exponential(1.0 / rate)
        if t > duration:
            return out
        word = "".join(rng.choice(list(string.ascii_lowercase), int(rng.integers(4, 13))))
        out.append(Request(t, str(rng.choice(names, p=p)), f"{TASKS[int(rng.integers(len(TASKS)))]} {word}=",
                           int(rng.integers(8, 25))))


async def _replay(url: str, trace: list[Request], drain_s: float) -> list[dict]:
    import tritonclient.grpc.aio as grpcaio

    from deltazip.serving.client import grpc_inputs
    from deltazip.serving.protocol import MODEL_NAME

    records = [{"sent": None, "first": None, "end": None, "tokens": 0, "error": None} for _ in trace]
    errors: list[str] = []
    remaining = len(trace)
    all_done = asyncio.Event()
    if not trace:
        return records
    client = grpcaio.InferenceServerClient(url)
    start = time.perf_counter() + 0.1

    async def requests():
        for i, req in enumerate(trace):
            delay = start + req.at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            records[i]["sent"] = time.perf_counter()
            yield {"model_name": MODEL_NAME, "request_id": str(i), "enable_empty_final_response": True,
                   "inputs": grpc_inputs(req.prompt, req.variant, True,
                                         {"max_tokens": req.max_tokens, "temperature": 0.0})}
        await all_done.wait()

    async def consume():
        nonlocal remaining
        async for result, error in client.stream_infer(requests()):
            now = time.perf_counter()
            if error is not None:  # an error response ends its request; it counts as not completed
                errors.append(str(error)[:200])
                remaining -= 1
                if remaining <= 0:
                    all_done.set()
                    return
                continue
            response = result.get_response()
            rec = records[int(response.id)]
            text = result.as_numpy("text_output")
            if text is not None and text.size and text.reshape(-1)[0] and rec["first"] is None:
                rec["first"] = now
            tokens = result.as_numpy("completion_tokens")
            if tokens is not None and tokens.size:
                rec["tokens"] = max(rec["tokens"], int(tokens.reshape(-1)[0]))
            if response.parameters["triton_final_response"].bool_param:
                rec["end"] = now
                rec["first"] = rec["first"] or now
                remaining -= 1
                if remaining <= 0:
                    all_done.set()
                    return

    try:
        await asyncio.wait_for(consume(), timeout=trace[-1].at + drain_s + 1.0)
    except TimeoutError:
        pass
    finally:
        all_done.set()
        await client.close()
    if errors:
        records[0]["errors"] = errors
    return records


def replay(url: str, trace: list[Request], drain_s: float) -> list[dict]:
    return asyncio.run(_replay(url, trace, drain_s))


def summarize(trace: list[Request], records: list[dict], slo_s: float, rate: float, before: dict,
              after: dict, bytes_per_load: int) -> dict:
    done = [r for r in records if r["end"] is not None]
    e2e = [r["end"] - r["sent"] for r in done]
    ttft = [r["first"] - r["sent"] for r in done]
    first_sent = min((r["sent"] for r in records if r["sent"]), default=0.0)
    span = max((r["end"] for r in done), default=first_sent) - first_sent
    loads = after.get("pool", {}).get("disk_loads", 0) - before.get("pool", {}).get("disk_loads", 0)
    slot_loads = after.get("pool", {}).get("slot_loads", 0) - before.get("pool", {}).get("slot_loads", 0)

    def pct(xs, q):
        return float(np.percentile(xs, q)) if xs else math.nan

    return {"rate": rate, "offered": len(trace), "completed": len(done),
            "errors": len(records[0].get("errors", [])) if records else 0,
            "req_s": len(done) / span if span > 0 else math.nan,
            "tok_s": sum(r["tokens"] for r in done) / span if span > 0 else math.nan,
            "ttft_mean": statistics.fmean(ttft) if ttft else math.nan, "ttft_p50": pct(ttft, 50),
            "ttft_p99": pct(ttft, 99), "e2e_mean": statistics.fmean(e2e) if e2e else math.nan,
            "e2e_p50": pct(e2e, 50), "e2e_p99": pct(e2e, 99),
            "slo": sum(x <= slo_s for x in e2e) / max(len(trace), 1),
            "swap_ins": slot_loads, "disk_loads": loads, "bytes_moved": loads * bytes_per_load}


# -- one system ----------------------------------------------------------------------------------------------
def run_system(system: str, v: Variants, work: Path, cfg, plan: list[tuple], args, log,
               spot: list[tuple[str, str]] | None = None, answers: dict | None = None) -> list[dict]:
    """Build, serve, warm up, replay every (alpha, rate) trace of `plan`; rows of results. `spot`: (variant,
    prompt) pairs asked greedily after the warm-up, their answers stored in answers[system]."""
    from deltazip.builder.build import build

    out = work / f"build-{system}"
    build(v.base, v.store, out, cfg)
    stats = work / f"stats-{system}.json"
    bytes_per_load = (budget_cache["artifact_bytes"] if system == "deltazip" else
                      budget_cache["checkpoint_bytes"])
    rows = []
    server = _start_server(out, stats, work / f"triton-{system}.log")
    try:
        replay(server.grpc_url, [Request(0.05 * i, n, "reverse abc=", 2) for i, n in enumerate(v.names)],
               args.drain)
        if spot:
            from deltazip.serving.client import generate_grpc

            answers[system] = [generate_grpc(server.grpc_url, prompt, variant, stream=False, max_tokens=16,
                                             temperature=0.0).text for variant, prompt in spot]
        saturated: set[tuple] = set()
        for alpha, rate in plan:
            if (alpha,) in saturated:
                continue
            trace = make_trace(v.names, alpha, rate, args.duration, args.seed)
            _wait_idle(server)
            before = server.engine_stats()
            cold = args.page_cache == "cold"
            with PageCacheEvictor([v.store, v.full]) if cold else contextlib.nullcontext():
                records = replay(server.grpc_url, trace, args.drain)
            _wait_idle(server, 5.0)
            row = summarize(trace, records, args.slo_s, rate, before, server.engine_stats(), bytes_per_load)
            row.update(system=system, V=len(v.names), alpha=alpha)
            rows.append(row)
            log(f"  {system:12s} V={len(v.names):2d} alpha={alpha:<4} rate={rate:<5} done "
                f"{row['completed']}/{row['offered']} req/s {row['req_s']:.2f} "
                f"e2e mean {row['e2e_mean']:.2f}s slo {row['slo']:.2f} swaps {row['swap_ins']} "
                f"(load {os.getloadavg()[0]:.1f})")
            if row["errors"]:
                log(f"    {row['errors']} error responses, e.g. {records[0]['errors'][0]}")
            if row["completed"] + row["errors"] < row["offered"]:  # did not drain: saturated
                saturated.add((alpha,))
    finally:
        server.stop()
    return rows


budget_cache: dict = {}


class PageCacheEvictor:
    """Keeps the given files out of the page cache (posix_fadvise DONTNEED every `period_s`): the state of a
    server whose page cache cannot hold V full checkpoints, as at 7B/13B scale (V x 13-26 GB)."""

    def __init__(self, roots: list[Path], period_s: float = 0.02) -> None:
        self.files = [f for root in roots for f in root.rglob("*") if f.is_file()]
        self.period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def evict(self) -> None:
        for f in self.files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.evict()

    def __enter__(self) -> PageCacheEvictor:
        self.evict()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _start_server(out: Path, stats: Path, log_path: Path, attempts: int = 3):
    """A started TritonServer; retried on a start failure (free ports are picked by binding port 0, and on a
    machine shared with other servers two picks can collide)."""
    from deltazip.serving.server import ServerError, TritonServer

    for attempt in range(attempts):
        try:
            return TritonServer(out, stats_path=stats, log_path=log_path).start()
        except ServerError:
            if attempt == attempts - 1:
                raise
            time.sleep(1.0)


def _wait_idle(server, timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        s = server.engine_stats()
        if not s or (s.get("running", 0) == 0 and s.get("waiting", 0) == 0):
            return
        time.sleep(0.1)


def slo_throughput(rows: list[dict]) -> float:
    ok = [r["req_s"] for r in rows if r["slo"] >= 0.9 and not math.isnan(r["req_s"])]
    return max(ok, default=0.0)


def run_matrix(v_all: Variants, counts: list[int], alphas: list[float], rates: list[float], args, work: Path,
               log=print, systems=SYSTEMS, spot=None, answers=None) -> tuple[list[dict], dict]:
    """Every system for every V (the first V names of v_all), popularity and rate; rows and budgets."""
    rows, budgets = [], {}
    for count in counts:
        v = dataclasses.replace(v_all, names=v_all.names[:count])
        if count < len(v_all.names):  # a store holding exactly these names
            v = _subset(v, work / f"V{count}")
        b = budget(v, "float32")
        budget_cache.clear()
        budget_cache.update(b)
        budgets[count] = b
        log(f"V={count}: budget {b['budget_bytes']} B (base {b['base_bytes']} + {count} delta slots "
            f"{b['delta_slot_bytes']}); one full model {b['full_model_bytes']} B -> k = {b['k']}")
        plan = [(a, r) for a in alphas for r in rates]
        for system in systems:
            if system == "all-resident" and count * b["full_model_bytes"] > args.resident_limit_bytes:
                log(f"  all-resident skipped: {count} x {b['full_model_bytes']} B > --resident-limit-bytes")
                continue
            cfg = runtime_config(system, v, b["k"], args.max_batch, args.max_context)
            rows += run_system(system, v, work / f"V{count}", cfg, plan, args, log, spot, answers)
    return rows, budgets


def _subset(v: Variants, root: Path) -> Variants:
    store, full = root / "deltas", root / "full"
    store.mkdir(parents=True)
    full.mkdir(parents=True)
    for name in v.names:  # hard links: the pool refuses store entries that resolve outside the store
        for src, dst in ((v.store / f"{name}.dz", store / f"{name}.dz"), (v.full / name, full / name)):
            dst.mkdir()
            for f in src.iterdir():
                os.link(f, dst / f.name)
    return dataclasses.replace(v, store=store, full=full)


# -- output --------------------------------------------------------------------------------------------------
def plot(rows: list[dict], out_dir: Path, slo_s: float, suffix: str = "") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    combos = sorted({(r["V"], r["alpha"]) for r in rows})
    fig, axes = plt.subplots(1, len(combos), figsize=(4 * len(combos), 3.4), squeeze=False)
    for ax, (count, alpha) in zip(axes[0], combos, strict=True):
        for system in SYSTEMS:
            sel = sorted((r for r in rows if (r["V"], r["alpha"], r["system"]) == (count, alpha, system)),
                         key=lambda r: r["rate"])
            if sel:
                ax.plot([r["rate"] for r in sel], [r["e2e_mean"] for r in sel], marker="o", label=system)
        ax.axhline(slo_s, color="grey", ls=":", lw=1)
        ax.set_yscale("log")
        ax.set_title(f"V={count}, {'uniform' if alpha == 0 else f'Zipf {alpha:g}'}", fontsize=9)
        ax.set_xlabel("offered rate (req/s)")
    axes[0][0].set_ylabel("mean end-to-end latency (s)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / f"multitenant_latency{suffix}.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(1.2 * len(combos) + 3, 3.4))
    width = 0.8 / len(SYSTEMS)
    for i, system in enumerate(SYSTEMS):
        values = [slo_throughput([r for r in rows if (r["V"], r["alpha"], r["system"]) == (*c, system)])
                  for c in combos]
        ax.bar(np.arange(len(combos)) + i * width, values, width, label=system)
    ax.set_xticks(np.arange(len(combos)) + width, [f"V={c}\n{'unif' if a == 0 else f'Z{a:g}'}"
                                                   for c, a in combos], fontsize=8)
    ax.set_ylabel(f"req/s at SLO (e2e <= {slo_s:g} s, 90%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / f"multitenant_slo_throughput{suffix}.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def tables(rows: list[dict], budgets: dict) -> tuple[str, str]:
    cols = ["V", "popularity", "system", "offered req/s", "done/sent", "req/s", "tok/s", "TTFT mean s",
            "TTFT p50", "TTFT p99", "E2E mean s", "E2E p50", "E2E p99", "SLO att.", "swap-ins", "MB moved"]
    body = [[r["V"], "uniform" if r["alpha"] == 0 else f"Zipf {r['alpha']:g}", r["system"], r["rate"],
             f"{r['completed']}/{r['offered']}", r["req_s"], r["tok_s"], r["ttft_mean"], r["ttft_p50"],
             r["ttft_p99"], r["e2e_mean"], r["e2e_p50"], r["e2e_p99"], r["slo"], r["swap_ins"],
             r["bytes_moved"] / 1e6] for r in rows]
    summary = []
    for (count, alpha) in sorted({(r["V"], r["alpha"]) for r in rows}):
        sel = {s: [r for r in rows if (r["V"], r["alpha"], r["system"]) == (count, alpha, s)]
               for s in SYSTEMS}
        dz, fs = slo_throughput(sel["deltazip"]), slo_throughput(sel["full-swap"])
        common = sorted({r["rate"] for r in sel["deltazip"]} & {r["rate"] for r in sel["full-swap"]})
        lat = {s: statistics.fmean([r["e2e_mean"] for r in sel[s] if r["rate"] in common] or [math.nan])
               for s in ("deltazip", "full-swap")}
        b = budgets[count]
        summary.append([count, "uniform" if alpha == 0 else f"Zipf {alpha:g}", b["budget_bytes"], b["k"], dz,
                        fs, slo_throughput(sel["all-resident"]) if sel["all-resident"] else "-",
                        dz / fs if fs else math.inf, lat["full-swap"] / lat["deltazip"]])
    summary_md = markdown_table(["V", "popularity", "budget bytes", "k full models", "deltazip req/s at SLO",
                                 "full-swap req/s at SLO", "all-resident req/s at SLO",
                                 "throughput ratio", "mean-latency ratio (full-swap / deltazip)"], summary)
    return summary_md, markdown_table(cols, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(SHAPES), default="small")
    parser.add_argument("--variants", default="8,32", help="V values (comma separated)")
    parser.add_argument("--alphas", default="0,1.0,1.5", help="Zipf exponents (0 = uniform)")
    parser.add_argument("--rates", default="2,6,12", help="offered rates, req/s")
    parser.add_argument("--distinct", type=int, default=4, help="distinct random deltas behind the V names")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds of arrivals per trace")
    parser.add_argument("--drain", type=float, default=8.0, help="seconds allowed after the last arrival")
    parser.add_argument("--slo-s", type=float, default=4.0, help="end-to-end latency SLO (seconds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-context", type=int, default=64)
    parser.add_argument("--resident-limit-bytes", type=int, default=4 << 30)
    parser.add_argument("--page-cache", choices=("warm", "cold"), default="warm",
                        help="cold: every artifact and checkpoint file is dropped from the page cache every "
                             "20 ms during the measured traces (warm-up excluded)")
    parser.add_argument("--no-write", action="store_true", help="print only (no RESULTS.md, no plots)")
    args = parser.parse_args()
    counts = [int(x) for x in args.variants.split(",")]
    alphas = [float(x) for x in args.alphas.split(",")]
    rates = [float(x) for x in args.rates.split(",")]
    started = time.time()
    root = Path(tempfile.mkdtemp(prefix="deltazip-multitenant-"))
    try:
        v = synthetic_variants(root, args.preset, max(counts), args.distinct)
        print(f"variants ready in {time.time() - started:.0f} s (load {os.getloadavg()[0]:.1f})", flush=True)
        rows, budgets = run_matrix(v, counts, alphas, rates, args, root,
                                   log=lambda s: print(s, flush=True))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    wall = time.time() - started
    summary_md, detail_md = tables(rows, budgets)
    print(summary_md, detail_md, sep="\n\n")
    if args.no_write:
        return
    suffix = "" if args.page_cache == "warm" else "_cold"
    pngs = plot(rows, Path(__file__).resolve().parent, args.slo_s, suffix)
    notes = (f"Synthetic {args.preset}-shaped base (random weights, fp16 on disk, fp32 compute on CPU), "
             f"{args.distinct} distinct random 2-bit 2:4 deltas replicated under V names; merged checkpoints "
             f"fp16. Seed {args.seed}; Poisson arrivals, {args.duration:g} s per rate, drain window "
             f"{args.drain:g} s; prompts 9–17 tokens, max_tokens uniform 8–24, greedy; SLO: end-to-end <= "
             f"{args.slo_s:g} s (attainment over all sent requests; 'req/s at SLO' = highest achieved req/s "
             f"with >= 90% attainment). Memory budget = base + V delta slots of (a) in bytes (column 'budget "
             f"bytes'); full-swap holds k full models in that budget beside the base; all-resident holds V. "
             f"{PAGE_CACHE_NOTE[args.page_cache]} One tritonserver per "
             f"system and V, torch runtime, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
             f"whole run {wall / 60:.1f} min, load average {os.getloadavg()[0]:.1f} at the end (2 cores "
             f"shared with other jobs). Plots: {', '.join(p.name for p in pngs)}. Definitions and why "
             f"full-swap is a fair stand-in: the docstring of benchmarks/multitenant.py.")
    cache = "" if args.page_cache == "warm" else ", page cache cold"
    write_section(f"Multi-tenant serving: deltazip vs full-model swapping ({args.preset}-shaped{cache})",
                  command_line(), summary_md + "\n\n" + detail_md, notes)


if __name__ == "__main__":
    main()
