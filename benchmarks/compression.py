"""Compression benchmark: ratio, bits/weight, lossless gain, accuracy retention, speed, and the baselines.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/compression.py [--preset tiny|small] [--tasks a,b]

Writes two sections of benchmarks/RESULTS.md and benchmarks/compression.png (accuracy vs bytes per method).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks._results import command_line, markdown_table, write_section  # noqa: E402

SETTINGS = {"2-bit 2:4": {"bits": 2, "sparsity": "2:4"}, "4-bit 2:4": {"bits": 4, "sparsity": "2:4"}}
TARGET_RATIO = 12.0
TARGET_RETENTION = 0.99
TARGET_SECONDS = 60.0


def compress_one(base_dir: Path, target_dir: Path, out: Path, overrides: dict, task: str, calib: Path):
    """Compress one fine-tune into `out` (replacing a previous run); returns (wall s, CPU s, stats)."""
    import json

    from deltazip.compress import compress_model
    from deltazip.config import CompressConfig

    settings = dataclasses.replace(CompressConfig(), **overrides)
    if out.exists():
        shutil.rmtree(out)
    start, start_cpu = time.perf_counter(), time.process_time()
    compress_model(base_dir, target_dir, out, settings, name=task, calib=calib)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    return seconds, cpu_seconds, json.loads((out / "manifest.json").read_text()).get("stats", {})


def plot(points: dict[str, list[tuple[int, float, float]]], path: Path, preset: str) -> None:
    """Mean accuracy and mean perplexity over tasks vs stored bytes, one marker per method (legend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4.5))
    markers = "osD^v<>PX*"
    for i, (method, pts) in enumerate(points.items()):
        size = sum(p[0] for p in pts) / len(pts)
        acc = 100 * sum(p[1] for p in pts) / len(pts)
        ppl = sum(p[2] for p in pts) / len(pts)
        ax_acc.scatter([size], [acc], s=60, marker=markers[i % len(markers)], label=method)
        ax_ppl.scatter([size], [ppl], s=60, marker=markers[i % len(markers)], label=method)
    for ax, label in ((ax_acc, "exact match, mean over tasks (%)"), (ax_ppl, "perplexity, mean over tasks")):
        ax.set_xscale("log")
        ax.set_xlabel("stored bytes per fine-tune (log)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    ax_ppl.legend(fontsize=8, loc="best")
    fig.suptitle(f"deltazip vs baselines, {preset} family")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--tasks", default="", help="comma list (default: every family task)")
    parser.add_argument("--family", type=Path, default=None, help="family dir (default: the test cache's)")
    parser.add_argument("--work", type=Path, default=REPO / ".deltazip" / "bench-compression")
    parser.add_argument("--baselines", default="sparsegpt,awq,bitdelta,svd")
    parser.add_argument("--max-examples", type=int, default=None)
    args = parser.parse_args()

    from transformers.utils import logging as hf_logging

    from deltazip.eval.report import evaluate_artifact
    from deltazip.family import create_family
    from deltazip.ui import progress

    hf_logging.disable_progress_bar()
    family_dir = args.family or REPO / ".deltazip" / "test-cache" / f"family-{args.preset}-s0"
    family = create_family(family_dir, preset=args.preset, seed=0)
    tasks = [t for t in args.tasks.split(",") if t] or list(family.tasks)
    baselines = tuple(b for b in args.baselines.split(",") if b)
    command = command_line()

    comp_rows, reports = [], {}
    jobs = [(task, label) for task in tasks for label in SETTINGS]
    for task, label in progress(jobs, desc="compress + eval", total=len(jobs)):
        out = args.work / args.preset / label.replace(" ", "_").replace(":", "") / f"{task}.dz"
        seconds, cpu_seconds, stats = compress_one(family.base_dir, family.finetune_dirs[task], out,
                                                   SETTINGS[label], task, family.calib_path)
        use_baselines = baselines if label == "2-bit 2:4" else ()
        report = evaluate_artifact(family.base_dir, out, family.root, task=task, baselines=use_baselines,
                                   max_examples=args.max_examples)
        reports[(task, label)] = report
        rows = report["rows"]
        full, dz = rows[1], rows[2]
        retention = dz["accuracy"] / full["accuracy"] if full["accuracy"] else float("nan")
        n_params = stats.get("num_parameters", 0)
        comp_rows.append([args.preset, task, label, dz["size_bytes"], f"{dz['ratio_vs_fp16']:.2f}x",
                          f"{8 * dz['size_bytes'] / n_params:.3f}" if n_params else "?",
                          f"{stats.get('lossless_gain', float('nan')):.2f}x",
                          f"{100 * full['accuracy']:.1f}", f"{100 * dz['accuracy']:.1f}",
                          f"{100 * retention:.1f}%", f"{full['perplexity']:.3f}", f"{dz['perplexity']:.3f}",
                          f"{seconds:.1f}", f"{cpu_seconds:.1f}", f"{n_params / seconds:,.0f}"])

    retention_by_setting = {}
    for label in SETTINGS:
        values = []
        for task in tasks:
            rows = reports[(task, label)]["rows"]
            values.append(rows[2]["accuracy"] / rows[1]["accuracy"] if rows[1]["accuracy"] else 0.0)
        retention_by_setting[label] = min(values)
    times = [float(r[12]) for r in comp_rows]
    cpu_times = [float(r[13]) for r in comp_rows]
    ratios_2bit = [float(r[4][:-1]) for r in comp_rows if r[2] == "2-bit 2:4"]
    verdict = (
        f"Targets: ratio ≥ {TARGET_RATIO:g}x at 2-bit 2:4: min {min(ratios_2bit):.2f}x "
        f"({'met' if min(ratios_2bit) >= TARGET_RATIO else 'NOT met'}); "
        f"accuracy ≥ {100 * TARGET_RETENTION:g}% of the fine-tune on every task: min retention "
        + ", ".join(f"{k} {100 * v:.1f}%" for k, v in retention_by_setting.items())
        + f" ({'met' if retention_by_setting['2-bit 2:4'] >= TARGET_RETENTION else 'NOT met'} at 2-bit); "
        f"< {TARGET_SECONDS:g} s per fine-tune: max {max(times):.1f} s "
        f"({'met' if max(times) < TARGET_SECONDS else 'NOT met'} in wall time; "
        f"max CPU time {max(cpu_times):.1f} s)."
    )
    columns = ["preset", "task", "setting", "artifact bytes", "ratio vs fp16", "bits/weight", "lossless gain",
               "fine-tune acc %", "deltazip acc %", "retention", "fine-tune ppl", "deltazip ppl",
               "compress wall s", "compress CPU s", "params/s (wall)"]
    write_section(f"Compression ({args.preset} preset)", command, markdown_table(columns, comp_rows),
                  notes="Ratio and bits/weight are over the whole artifact (manifest included) vs the fp16 "
                        "fine-tune. Accuracy: greedy exact match on the task's held-out eval set.\n\n"
                        + verdict)

    # baseline comparison: one row per method, accuracy per task (2-bit artifacts carry the baselines)
    methods: dict[str, dict] = {}
    points: dict[str, list[tuple[int, float, float]]] = {}
    for task in tasks:
        for label in SETTINGS:
            for i, row in enumerate(reports[(task, label)]["rows"]):
                if label != "2-bit 2:4" and i != 2:
                    continue
                key = f"deltazip {label}" if i == 2 else row["method"]
                key = key.split(" rank ")[0] if key.startswith("SVD") else key
                entry = methods.setdefault(key, {"bytes": [], "acc": {}, "ppl": [], "note": row["note"]})
                entry["bytes"].append(row["size_bytes"])
                entry["ppl"].append(row["perplexity"])
                entry["acc"][task] = row["accuracy"]
                if row["size_bytes"]:
                    points.setdefault(key, []).append((row["size_bytes"], row["accuracy"], row["perplexity"]))
    full_acc = methods["full fine-tune"]["acc"]
    base_rows = []
    for method, entry in methods.items():
        sizes = [b for b in entry["bytes"] if b]
        size = round(sum(sizes) / len(sizes)) if sizes else None
        fp16 = methods["full fine-tune"]["bytes"][0]
        min_ret = min((entry["acc"][t] / full_acc[t] if full_acc[t] else 0.0) for t in tasks)
        base_rows.append([method, size if size else "(shared)", f"{fp16 / size:.2f}x" if size else "-",
                          *(f"{100 * entry['acc'][t]:.1f}" for t in tasks), f"{100 * min_ret:.1f}%",
                          f"{sum(entry['ppl']) / len(entry['ppl']):.3f}",
                          entry["note"]])
    dz = methods["deltazip 2-bit 2:4"]
    dz_size = max(dz["bytes"])
    beaten, lost = [], []
    for method, entry in methods.items():
        if method.startswith("deltazip") or method in ("base", "full fine-tune"):
            continue
        if max(entry["bytes"]) > dz_size:
            continue  # larger than the deltazip artifact: not an equal-size comparison
        wins = all(dz["acc"][t] >= entry["acc"][t] for t in tasks)
        (beaten if wins else lost).append(method)
    dominance = ("At equal or smaller size than deltazip 2-bit 2:4, deltazip is at least as accurate "
                 f"on every task as {', '.join(beaten) or 'none'}; "
                 f"not on every task vs {', '.join(lost) or 'none'}. "
                 "Larger baselines are listed for reference.")
    columns = ["method", "bytes (mean)", "ratio vs fp16", *(f"{t} %" for t in tasks), "min retention",
               "perplexity (mean)", "note"]
    write_section(f"Baselines ({args.preset} preset)", command, markdown_table(columns, base_rows),
                  notes="Baselines on the same held-out sets. SparseGPT and AWQ act on the FULL fine-tuned "
                        "weights; BitDelta and SVD on the delta. SVD rank is chosen so its fp16 factors fit "
                        "the 2-bit deltazip artifact's bytes. Plot: benchmarks/compression.png.\n\n"
                        + dominance)
    plot(points, Path(__file__).resolve().parent / "compression.png", args.preset)
    print(verdict)
    print(dominance)


if __name__ == "__main__":
    main()
