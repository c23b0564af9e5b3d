"""Exploration for issue 15: where the bytes go, rate–distortion allocation, entropy coders, low-rank hybrids.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ratio_explore.py [--tasks reverse,sort,add]
        [--max-examples 100] [--stage bytes,alloc,entropy,hybrid] [--write]

Standalone: it drives the existing compressor (deltazip.compress.compress_model) and only swaps, inside this
process, the per-tensor solver call for one that can (a) solve every candidate layout of a tensor and record
its bytes (zstd, as stored) and its Hessian-weighted output error, or (b) apply a per-tensor plan. Quality is
greedy exact match (deltazip.family.exact_match) of base + decoded artifact on the task's held-out set.
Results go to stdout as markdown (and to benchmarks/RESULTS.md with --write).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks._results import command_line, markdown_table, write_section  # noqa: E402

# candidate layouts per tensor: label -> (bits, sparsity)
CANDIDATES = {
    "2b 2:4": (2, "2:4"), "3b 2:4": (3, "2:4"), "4b 2:4": (4, "2:4"),
    "2b u50": (2, "0.5"), "2b u75": (2, "0.75"), "2b u85": (2, "0.85"), "2b u90": (2, "0.9"),
    "2b u95": (2, "0.95"), "3b u75": (3, "0.75"), "3b u85": (3, "0.85"), "3b u90": (3, "0.9"),
}
DEFAULT = "2b 2:4"
PROBE = "2b u90"  # the layout whose end-to-end effect calibrates each tensor's sensitivity


# ------------------------------------------------------------------ solver hook

class Hook:
    """Replaces pipeline._Solver.__call__: profile every candidate, or apply a plan {param: label}."""

    def __init__(self) -> None:
        self.mode = "default"
        self.plan: dict[str, str] = {}
        # param -> label -> (bytes, err, delta energy)
        self.profile: dict[str, dict[str, tuple[int, float, float]]] = {}
        self.lowrank: dict[str, int] = {}  # param -> rank (hybrid stage; no tuning)
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.probe: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # param -> (delta, probe dequantized)

    def install(self) -> None:
        from deltazip.compress import pipeline

        hook = self

        def call(solver, name, delta, hessian):
            return hook.solve(solver.settings, name, delta, hessian)

        pipeline._Solver.__call__ = call

    def solve(self, s, name: str, delta: torch.Tensor, hessian: torch.Tensor | None):
        from deltazip.compress.obs import solve_delta

        def one(label: str, d: torch.Tensor):
            bits, sparsity = CANDIDATES[label]
            return solve_delta(d, hessian, bits, sparsity, s.group_size, s.damp, s.block_size)

        if self.mode == "profile":
            h = torch.eye(delta.shape[1]) if hessian is None else hessian.float()
            energy = float(((delta.float() @ h) * delta.float()).sum())
            rows = {}
            for label in CANDIDATES:
                packed = one(label, delta)
                diff = packed.dequantize() - delta.float()
                rows[label] = (stored_bytes(packed), float(((diff @ h) * diff).sum()), energy)
            self.profile[name] = rows
            self.probe[name] = (delta.float().clone(), one(PROBE, delta).dequantize())
            return one(DEFAULT, delta)
        label = self.plan.get(name, DEFAULT)
        rank = self.lowrank.get(name, 0)
        if rank:
            u, v = lowrank(delta.float(), hessian, rank)
            self.factors[name] = (u, v)
            packed = one(label, delta.float() - u @ v)
            return _Hybrid(packed, u @ v)
        return one(label, delta)


class _Hybrid:
    """A packed residual plus a dense low-rank part, duck-typed for the pipeline (tune_steps must be 0)."""

    def __init__(self, packed, low) -> None:
        self.packed, self.low = packed, low

    def dequantize(self, dtype=torch.float32):
        return (self.packed.dequantize() + self.low).to(dtype)

    def __getattr__(self, item):
        return getattr(self.packed, item)


def lowrank(delta: torch.Tensor, hessian: torch.Tensor | None, rank: int) -> tuple[torch.Tensor, ...]:
    """fp16-rounded factors of the best rank-r approximation of delta in the Hessian norm (SVD if None)."""
    if hessian is None:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        a, b = u[:, :rank] * s[:rank], vh[:rank]
    else:
        h = hessian.double() + 1e-2 * hessian.diag().mean().double() * torch.eye(hessian.shape[0],
                                                                               dtype=torch.float64)
        root = torch.linalg.cholesky(h)  # h = L Lᵀ: ‖E X‖² ∝ ‖E L‖²
        u, s, vh = torch.linalg.svd(delta.double() @ root, full_matrices=False)
        a = (u[:, :rank] * s[:rank])
        b = torch.linalg.solve_triangular(root.T, vh[:rank].T, upper=True).T  # vh · L⁻¹
    return a.half().float(), b.half().float()


def stored_bytes(packed) -> int:
    from deltazip.format.codec import encode_tensors

    _, entries = encode_tensors({"x": packed}, {}, "zstd")
    return sum(st for _, _, st in entries["x"]["streams"])


# ------------------------------------------------------------------ allocation

def allocate(profile: dict, budget: int, weight: str, gains: dict | None = None) -> dict[str, str]:
    """Lagrangian: each tensor takes argmin w·err + λ·bytes; bisect λ so Σ bytes ≤ budget."""
    gains = gains or {}

    def pick(lam):
        plan, total = {}, 0
        for name, rows in profile.items():
            g = gains.get(name, 1.0)
            best = min(rows, key=lambda lb: _w(rows[lb], weight, g) + lam * rows[lb][0])
            plan[name] = best
            total += rows[best][0]
        return plan, total

    lo, hi = 0.0, 1.0
    while pick(hi)[1] > budget and hi < 1e12:
        hi *= 4
    for _ in range(60):
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 1e6
        if pick(mid)[1] > budget:
            lo = mid
        else:
            hi = mid
    return pick(hi)[0]


def _w(row, weight, gain=1.0):
    nbytes, err, energy = row
    if weight == "relative":
        return err / max(energy, 1e-30)
    if weight == "measured":
        return gain * err
    return err


@torch.no_grad()
def sensitivities(family, task: str, hook: Hook, profile: dict, n_seq: int = 64) -> dict[str, float]:
    """Per tensor: KL(fine-tune ‖ fine-tune with only this tensor's delta at the probe layout) on calibration
    windows, divided by the probe's Hessian-weighted error: predicted KL per unit of error."""
    import torch.nn.functional as F

    from deltazip.compress.calibration import calibration_tokens
    from deltazip.hf import load_model

    model, _ = load_model(family.finetune_dirs[task])
    tokens = calibration_tokens(family.base_dir, family.calib_path, n_seq, 32)
    ref = F.log_softmax(model(input_ids=tokens).logits.float(), -1)
    params = dict(model.named_parameters())
    gains = {}
    for name, (delta, probe) in hook.probe.items():
        p = params[name]
        keep = p.data.clone()
        p.data += probe - delta
        logp = F.log_softmax(model(input_ids=tokens).logits.float(), -1)
        kl = float(F.kl_div(logp, ref, log_target=True, reduction="batchmean"))
        p.data.copy_(keep)
        gains[name] = kl / max(profile[name][PROBE][1], 1e-30)
    return gains


# ------------------------------------------------------------------ running

def compress(family, task: str, out: Path, hook: Hook, tune_steps: int | None = None) -> tuple[dict, float]:
    from deltazip.compress import compress_model
    from deltazip.config import CompressConfig

    settings = CompressConfig() if tune_steps is None else dataclasses.replace(CompressConfig(),
                                                                               tune_steps=tune_steps)
    start = time.perf_counter()
    compress_model(family.base_dir, family.finetune_dirs[task], out, settings, name=task,
                   calib=family.calib_path, overwrite=True)
    return json.loads((out / "manifest.json").read_text()), time.perf_counter() - start


_MODELS: dict = {}


def accuracy(family, task: str, delta: dict, n: int) -> float:
    from deltazip.family import exact_match, load_eval_set
    from deltazip.hf import add_delta, load_model

    model, tok = load_model(family.base_dir)
    add_delta(model, delta)
    examples = load_eval_set(family.eval_path(task))[:n]
    return exact_match(model, tok, examples)


def artifact_delta(path: Path) -> dict:
    from deltazip.format import decompress, load_delta

    return decompress(load_delta(path))


def finetune_acc(family, task, n):
    from deltazip.family import exact_match, load_eval_set
    from deltazip.hf import load_model

    key = (task, n)
    if key not in _MODELS:
        model, tok = load_model(family.finetune_dirs[task])
        _MODELS[key] = exact_match(model, tok, load_eval_set(family.eval_path(task))[:n])
    return _MODELS[key]


def byte_breakdown(manifest: dict) -> dict[str, int]:
    """Stored bytes by where they go: block linears' codes, embed, head, scales, exact, manifest."""
    out: dict[str, int] = {}
    for name, e in manifest["tensors"].items():
        for stream, _, stored in e["streams"]:
            if e["kind"] == "exact":
                key = "exact (norms)"
            elif stream in ("scales", "zeros"):
                key = f"{stream} (all linears)"
            elif name in ("model.embed_tokens", "lm_head"):
                key = f"{name} codes"
            else:
                key = "block linears codes+positions"
            out[key] = out.get(key, 0) + stored
    files = sum(f["bytes"] for f in manifest["files"].values())
    out["safetensors header"] = files - sum(out.values())
    out["manifest.json"] = manifest["stats"]["artifact_bytes"] - files
    return out


# ------------------------------------------------------------------ entropy study

def entropy_study(path: Path) -> list[list]:
    """Per artifact: zstd-19 (as stored) vs ideal order-0 / order-1 entropy and a real ANS coder."""
    import numpy as np

    from deltazip.format import load_delta
    from deltazip.format.codec import _encode, linear_streams

    art = load_delta(path)
    totals = {"zstd-19 (stored)": 0, "order-0 entropy (+table)": 0, "ANS order-0 (constriction)": 0,
              "order-1 ctx: previous symbol (+tables)": 0, "ctx: tensor row-class (+tables)": 0}
    for packed in art.linears.values():
        for stream, t in linear_streams(packed).items():
            raw = t.contiguous().view(torch.uint8).numpy().tobytes()
            totals["zstd-19 (stored)"] += len(_encode(raw, "zstd"))
            sym = np.frombuffer(raw, dtype=np.uint8)
            if stream in ("scales", "zeros"):  # fp16 values: no symbol model, counted as stored
                for k in list(totals)[1:]:
                    totals[k] += len(_encode(raw, "zstd"))
                continue
            h0, used = _entropy(sym)
            table = 2 * used
            totals["order-0 entropy (+table)"] += math.ceil(h0 * sym.size / 8) + table
            totals["ANS order-0 (constriction)"] += _ans_bytes(sym) + table
            prev = np.concatenate([[0], sym[:-1]])
            h1, used1 = _cond_entropy(sym, prev)
            totals["order-1 ctx: previous symbol (+tables)"] += math.ceil(h1 * sym.size / 8) + 2 * used1
            rows = packed.out_features
            row_ctx = (np.arange(sym.size) * rows // max(sym.size, 1)) * 4 // max(rows, 1)  # 4 row classes
            h2, used2 = _cond_entropy(sym, row_ctx)
            totals["ctx: tensor row-class (+tables)"] += math.ceil(h2 * sym.size / 8) + 2 * used2
    return [[k, v] for k, v in totals.items()]


def _entropy(sym):
    import numpy as np

    counts = np.bincount(sym, minlength=256).astype(np.float64)
    p = counts[counts > 0] / sym.size
    return float(-(p * np.log2(p)).sum()), int((counts > 0).sum())


def _cond_entropy(sym, ctx):
    import numpy as np

    total, used = 0.0, 0
    for c in np.unique(ctx):
        part = sym[ctx == c]
        h, u = _entropy(part)
        total += h * part.size
        used += u
    return total / sym.size, used


def _ans_bytes(sym) -> int:
    import numpy as np

    try:
        import constriction
    except ImportError:
        return -1
    counts = np.bincount(sym, minlength=256).astype(np.float64)
    probs = (counts / counts.sum()).astype(np.float32)
    model = constriction.stream.model.Categorical(probs, perfect=False)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(sym.astype(np.int32), model)
    return coder.num_bits() // 8


# ------------------------------------------------------------------ final: the integrated compressor

def final_budget(family, tasks: list[str], ratio: float, work: Path, max_examples: int | None) -> list[list]:
    """`compress --target-ratio R` (deltazip.compress, measured sensitivity) per task, with BitDelta and SVD
    at the same bytes (deltazip.eval.report.evaluate_artifact: full eval set unless max_examples)."""
    from deltazip.compress import compress_model
    from deltazip.config import CompressConfig
    from deltazip.eval.report import evaluate_artifact

    rows = []
    for task in tasks:
        out = work / f"{task}-r{ratio:g}.dz"
        start = time.perf_counter()
        compress_model(family.base_dir, family.finetune_dirs[task], out,
                       dataclasses.replace(CompressConfig(), target_ratio=ratio), name=task,
                       calib=family.calib_path, overwrite=True)
        seconds = time.perf_counter() - start
        report = evaluate_artifact(family.base_dir, out, family.root, task=task,
                                   baselines=("bitdelta", "svd"), max_examples=max_examples)
        full = report["rows"][1]["accuracy"]
        for row in report["rows"][1:]:
            method = f"deltazip --target-ratio {ratio:g}" if row is report["rows"][2] else row["method"]
            rows.append([task, method, row["size_bytes"], f"{row['ratio_vs_fp16']:.2f}x",
                         f"{100 * row['accuracy']:.1f}",
                         f"{100 * row['accuracy'] / full:.1f}%" if full else "-",
                         f"{seconds:.1f}" if row is report["rows"][2] else ""])
            print(" | ".join(map(str, rows[-1])), flush=True)
    return rows


def final_any_precision(family, tasks: list[str], work: Path, n: int | None) -> list[list]:
    """One `--bits 4 --any-precision` artifact read at b = 2, 3, 4 beside dedicated b-bit 2:4 artifacts."""
    from deltazip.compress import compress_model
    from deltazip.config import CompressConfig
    from deltazip.format import decompress, load_delta, read_manifest
    from deltazip.format.precision import precision_sizes

    rows = []
    for task in tasks:
        ft = finetune_acc(family, task, n)
        out = work / f"{task}-ap4.dz"
        start = time.perf_counter()
        compress_model(family.base_dir, family.finetune_dirs[task], out,
                       dataclasses.replace(CompressConfig(), bits=4, any_precision=True), name=task,
                       calib=family.calib_path, overwrite=True)
        ap_seconds = time.perf_counter() - start
        manifest = read_manifest(out)
        stored = sum(s[2] for e in manifest["tensors"].values() for s in e["streams"])
        fixed = manifest["stats"]["artifact_bytes"] - stored
        sizes = precision_sizes(manifest)
        fp16 = manifest["stats"]["fp16_bytes"]
        for bits in (2, 3, 4):
            ded = work / f"{task}-{bits}b.dz"
            start = time.perf_counter()
            compress_model(family.base_dir, family.finetune_dirs[task], ded,
                           dataclasses.replace(CompressConfig(), bits=bits), name=task,
                           calib=family.calib_path, overwrite=True)
            ded_seconds = time.perf_counter() - start
            ded_manifest = read_manifest(ded)
            ap_acc = accuracy(family, task, decompress(load_delta(out, precision=bits)), n)
            ded_acc = accuracy(family, task, artifact_delta(ded), n)
            ap_bytes = sizes[bits] + fixed
            rows.append([task, bits, ap_bytes, f"{fp16 / ap_bytes:.2f}x", f"{100 * ap_acc:.1f}",
                         ded_manifest["stats"]["artifact_bytes"], f"{ded_manifest['stats']['ratio']:.2f}x",
                         f"{100 * ded_acc:.1f}", f"{100 * (ap_acc - ded_acc):+.1f}", f"{100 * ft:.1f}",
                         manifest["stats"]["artifact_bytes"] if bits == 4 else "",
                         f"{ap_seconds:.1f} / {ded_seconds:.1f}"])
            print(" | ".join(map(str, rows[-1])), flush=True)
    return rows


# ------------------------------------------------------------------ main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="reverse,sort,add")
    parser.add_argument("--max-examples", type=int, default=100)
    parser.add_argument("--stage", default="bytes,alloc,entropy,hybrid")
    parser.add_argument("--ratios", default="12,16,20")
    parser.add_argument("--weights", default="absolute,relative,measured")
    parser.add_argument("--uniform", default="2b u75,2b u85,2b u90")
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--full-eval", action="store_true", help="final stages: every held-out example")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ratio_explore")
    args = parser.parse_args()

    from transformers.utils import logging as hf_logging

    from deltazip.family import create_family

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    family = create_family(REPO / ".deltazip" / "test-cache" / "family-tiny-s0", preset="tiny", seed=0)
    tasks = [t for t in args.tasks.split(",") if t]
    stages = set(args.stage.split(","))
    n = args.max_examples
    if stages & {"final-budget", "final-anyprec"}:
        args.work.mkdir(parents=True, exist_ok=True)
        full_n = None if args.full_eval else n
        if "final-budget" in stages:
            table = markdown_table(["task", "method", "bytes", "ratio vs fp16", "acc %", "retention",
                                    "compress s"], final_budget(family, tasks, 16.0, args.work, full_n))
            print(table)
            if args.write:
                write_section("Ratio: --target-ratio 16 vs BitDelta and SVD (tiny)", command_line(),
                              table, notes="Whole-artifact bytes. BitDelta's size is fixed by its 1-bit "
                                           "layout; SVD's rank is fitted to the deltazip artifact's bytes.")
        if "final-anyprec" in stages:
            table = markdown_table(
                ["task", "b", "any-precision bytes at b", "ratio", "any-precision acc %",
                 "dedicated b-bit bytes", "dedicated ratio", "dedicated acc %", "Δ acc (points)",
                 "fine-tune acc %",
                 "any-precision artifact bytes", "compress s (any / dedicated)"],
                final_any_precision(family, tasks, args.work, full_n))
            print(table)
            if args.write:
                write_section("Any-precision: one 4-bit artifact at b = 2, 3, 4 vs dedicated b-bit (tiny)",
                              command_line(), table,
                              notes="'bytes at b' = what installing at b reads: patterns, the top b "
                                    "planes, the b-bit scales/zeros, exact tensors, manifest and header. The "
                                    "whole any-precision artifact holds all planes (last column).")
        return
    hook = Hook()
    hook.install()
    args.work.mkdir(parents=True, exist_ok=True)
    command = command_line()
    rows: list[list] = []  # variant, task, bytes, ratio, acc, retention, seconds

    def record(variant, task, manifest_or_bytes, acc, seconds):
        if isinstance(manifest_or_bytes, dict):
            nbytes = manifest_or_bytes["stats"]["artifact_bytes"]
            fp16 = manifest_or_bytes["stats"]["fp16_bytes"]
        else:
            nbytes, fp16 = manifest_or_bytes
        ft = finetune_acc(family, task, n)
        row = [variant, task, nbytes, f"{fp16 / nbytes:.2f}x", f"{100 * acc:.1f}", f"{100 * ft:.1f}",
               f"{100 * acc / ft:.1f}%" if ft else "-", f"{seconds:.1f}"]
        rows.append(row)
        print(" | ".join(str(x) for x in row), flush=True)

    breakdown_rows = []
    for task in tasks:
        # profile: every candidate of every tensor (default layout written), also the baseline row
        hook.mode = "profile"
        hook.profile = {}
        out = args.work / f"{task}-default.dz"
        manifest, seconds = compress(family, task, out, hook)
        profile = hook.profile
        (args.work / f"{task}-profile.json").write_text(json.dumps(profile))
        record("2-bit 2:4 everywhere (current default)", task, manifest,
               accuracy(family, task, artifact_delta(out), n), seconds)
        if "bytes" in stages:
            for key, value in byte_breakdown(manifest).items():
                share = 100 * value / manifest["stats"]["artifact_bytes"]
                breakdown_rows.append([task, key, value, f"{share:.1f}%"])
        fp16 = manifest["stats"]["fp16_bytes"]
        linear_bytes = sum(st for name, e in manifest["tensors"].items() if e["kind"] == "linear"
                           for _, _, st in e["streams"])
        fixed = manifest["stats"]["artifact_bytes"] - linear_bytes
        hook.mode = "plan"
        gains = sensitivities(family, task, hook, profile) if "measured" in args.weights else {}
        if "alloc" in stages:
            for label in [u for u in args.uniform.split(",") if u]:  # uniform layouts
                hook.plan = {name: label for name in profile}
                out = args.work / f"{task}-uniform.dz"
                manifest, seconds = compress(family, task, out, hook)
                record(f"{label} everywhere", task, manifest, accuracy(family, task, artifact_delta(out), n),
                       seconds)
            for ratio in [float(r) for r in args.ratios.split(",")]:
                for weight in args.weights.split(","):
                    budget = int(fp16 / ratio) - fixed - 600  # 600: manifest growth margin
                    hook.plan = allocate(profile, budget, weight, gains)
                    out = args.work / f"{task}-alloc.dz"
                    manifest, seconds = compress(family, task, out, hook)
                    mix = {}
                    for label in hook.plan.values():
                        mix[label] = mix.get(label, 0) + 1
                    mix_text = ", ".join(f"{k}:{v}" for k, v in sorted(mix.items()))
                    record(f"RD alloc {weight} err, target {ratio:g}x ({mix_text})", task, manifest,
                           accuracy(family, task, artifact_delta(out), n), seconds)
                    if "entropy" in stages and ratio == 16 and weight == args.weights.split(",")[0]:
                        ent = entropy_study(out)
                        print(markdown_table(["coder", "linear stream bytes"], ent))
                        (args.work / f"{task}-entropy.json").write_text(json.dumps(ent))
        if "hybrid" in stages:
            for rank in (2, 4, 8):
                for label in ("2b 2:4", "2b u85"):
                    hook.plan = {name: label for name in profile}
                    hook.lowrank = {name: rank for name in profile if name.startswith("model.layers.")}
                    hook.factors = {}
                    out = args.work / f"{task}-hybrid.dz"
                    manifest, seconds = compress(family, task, out, hook, tune_steps=0)
                    delta = artifact_delta(out)
                    extra = 0
                    for name, (u, v) in hook.factors.items():
                        delta[name] = delta[name] + u @ v
                        extra += stored_bytes_dense(u) + stored_bytes_dense(v)
                    nbytes = manifest["stats"]["artifact_bytes"] + extra
                    record(f"low-rank r{rank} (fp16, H-weighted SVD) + {label} residual, no tuning", task,
                           (nbytes, fp16), accuracy(family, task, delta, n), seconds)
                hook.lowrank = {}
            for label in ("2b 2:4", "2b u85"):
                hook.plan = {name: label for name in profile}
                out = args.work / f"{task}-notune.dz"
                manifest, seconds = compress(family, task, out, hook, tune_steps=0)
                record(f"{label} everywhere, no tuning (hybrid reference)", task, manifest,
                       accuracy(family, task, artifact_delta(out), n), seconds)
    table = markdown_table(["variant", "task", "artifact bytes", "ratio vs fp16", "acc %", "fine-tune acc %",
                            "retention", "compress s"], rows)
    print(table)
    if breakdown_rows:
        print(markdown_table(["task", "where", "bytes", "share"], breakdown_rows))
    if args.write:
        write_section("Ratio exploration: variants tried (tiny)", command, table,
                      notes=f"{n} held-out examples per task. Every variant, winners and losers.")
        if breakdown_rows:
            write_section("Ratio exploration: where the bytes go (2-bit 2:4, tiny)", command,
                          markdown_table(["task", "where", "bytes", "share"], breakdown_rows))


def stored_bytes_dense(t: torch.Tensor) -> int:
    from deltazip.format.codec import _encode

    return len(_encode(t.half().contiguous().view(torch.uint8).numpy().tobytes(), "zstd"))


if __name__ == "__main__":
    main()
