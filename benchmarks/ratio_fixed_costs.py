"""Issue 15 follow-up: budget recovered from fixed costs (format version 5) at --target-ratio 16 (tiny).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ratio_fixed_costs.py run TASK (--ratio R | --budget-bytes B)
        --tag TAG [--log FILE.jsonl] [--distill-steps N] [--calib FILE.jsonl | --task-calib LINES
        [--plus-family-calib]] [--n-samples N]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ratio_fixed_costs.py write [--log FILE.jsonl]
        [--notes-file NOTES] [--title TITLE]

`run` compresses one family task with a byte budget (deltazip.compress.compress_model, the shipped allocator),
evaluates base + decoded artifact by greedy exact match on the task's full held-out set (200 examples) and
appends one JSON line (bytes, ratio, accuracy, where the bytes go, compression seconds) to the log. `write`
turns the log into the RESULTS.md section (benchmarks/_results.py). One process per row keeps runs apart on a
shared machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
FAMILY = REPO / ".deltazip/test-cache/family-tiny-s0"
# fine-tune exact match on the full held-out sets (RESULTS.md, "Ratio: --target-ratio 16 vs BitDelta and SVD")
FINE_TUNE_ACC = {"reverse": 0.965, "sort": 0.95, "upper": 1.0, "caesar": 1.0, "add": 0.925, "copy": 1.0}
TITLE = "Ratio: fixed costs recovered at 16x (format version 5, tiny)"


def where_bytes(path: Path) -> dict[str, int]:
    """Stored bytes by kind: linear codes (+2:4 positions), scales (+zeros), exact tensors, payload header,
    manifest."""
    from deltazip.format import read_manifest

    manifest, out = read_manifest(path), {"codes": 0, "scales": 0, "exact": 0}
    for entry in manifest["tensors"].values():
        for stream, _, stored in entry["streams"]:
            scale = stream in ("scales", "zeros", "scale0", "lscales") or stream.startswith("ratio")
            key = "exact" if entry["kind"] == "exact" else "scales" if scale else "codes"
            out[key] += stored
    out["header"] = (path / "delta.safetensors").stat().st_size - sum(out.values())
    out["manifest"] = (path / "manifest.json").stat().st_size
    return out


def task_calibration(family, task: str, lines: int, plus_family: bool) -> Path:
    """A calibration jsonl of `lines` lines of the fine-tune's own task (no held-out prompt), after the
    family's calib.jsonl when `plus_family`."""
    from deltazip.family import TASKS, load_eval_set
    from deltazip.family.create import calibration_lines

    held_out = {e["prompt"] for t in TASKS for e in load_eval_set(family.eval_path(t))}
    text = family.calib_path.read_text() if plus_family else ""
    text += "".join(json.dumps(line) + "\n" for line in calibration_lines(0, lines, held_out, task))
    path = Path(tempfile.mkdtemp(prefix="dz-calib-")) / f"{task}.jsonl"
    path.write_text(text)
    return path


def run(task: str, ratio: float, budget: int, tag: str, log: Path, distill_steps: int | None = None,
        calib: Path | None = None, n_samples: int | None = None, task_calib: int = 0,
        plus_family: bool = False) -> None:
    from transformers.utils import logging as hf_logging

    from deltazip.compress import compress_model
    from deltazip.config import CompressConfig
    from deltazip.family import create_family, exact_match, load_eval_set
    from deltazip.format import decompress, load_delta, read_manifest
    from deltazip.hf import add_delta, load_model

    hf_logging.disable_progress_bar()
    family = create_family(FAMILY, preset="tiny", seed=0)
    out = Path(tempfile.mkdtemp(prefix="dz-fixed-")) / f"{task}.dz"
    if task_calib:
        calib = task_calibration(family, task, task_calib, plus_family)
    settings = dataclasses.replace(CompressConfig(), target_ratio=ratio, budget_bytes=budget)
    if distill_steps is not None:  # default: CompressConfig's
        settings = dataclasses.replace(settings, distill_steps=distill_steps)
    if n_samples is not None:
        settings = dataclasses.replace(settings, n_samples=n_samples)
    start = time.perf_counter()
    compress_model(family.base_dir, family.finetune_dirs[task], out, settings, name=task,
                   calib=calib or family.calib_path, overwrite=True)
    seconds = time.perf_counter() - start
    manifest = read_manifest(out)
    model, tok = load_model(family.base_dir)
    add_delta(model, decompress(load_delta(out)))
    acc = exact_match(model, tok, load_eval_set(family.eval_path(task)))
    stats = manifest["stats"]
    row = {"task": task, "tag": tag, "version": manifest["version"], "bytes": stats["artifact_bytes"],
           "ratio": stats["ratio"], "acc": acc, "seconds": round(seconds, 1), **where_bytes(out)}
    with log.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def retention_cells(task: str, acc: float) -> list[str]:
    """acc %, the fine-tune's acc % and the retention, as the RESULTS tables show them."""
    ft = FINE_TUNE_ACC[task]
    return [f"{100 * acc:.1f}", f"{100 * ft:.1f}", f"{100 * acc / ft:.1f}%"]


def write(log: Path, notes: str, title: str = TITLE) -> None:
    from benchmarks._results import markdown_table, write_section

    rows = []
    for line in log.read_text().splitlines():
        r = json.loads(line)
        rows.append([r["tag"], r["task"], r["version"], r["bytes"], f"{r['ratio']:.2f}x",
                     *retention_cells(r["task"], r["acc"]), r["codes"], r["scales"], r["exact"], r["header"],
                     r["manifest"], r["seconds"]])
    table = markdown_table(["variant", "task", "format", "artifact bytes", "ratio vs fp16", "acc %",
                            "fine-tune acc %", "retention", "codes B", "scales B", "exact B", "header B",
                            "manifest B", "compress s"], rows)
    command = ("OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ratio_fixed_costs.py run TASK (--ratio R | "
               "--budget-bytes B) --tag TAG, one per row; then ... write --notes-file NOTES")
    write_section(title, command, table, notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("run", "write"))
    parser.add_argument("task", nargs="?")
    parser.add_argument("--ratio", type=float, default=0.0)
    parser.add_argument("--budget-bytes", type=int, default=0)
    parser.add_argument("--tag", default="")
    parser.add_argument("--log", type=Path, default=Path(tempfile.gettempdir()) / "ratio_fixed_costs.jsonl")
    parser.add_argument("--notes-file", type=Path, help="text under the table")
    parser.add_argument("--distill-steps", type=int, help="distillation steps (default: CompressConfig)")
    parser.add_argument("--calib", type=Path, help="calibration jsonl (default: the family's calib.jsonl)")
    parser.add_argument("--task-calib", type=int, default=0,
                        help="calibrate on this many lines of the fine-tune's own task (4 examples a line)")
    parser.add_argument("--plus-family-calib", action="store_true",
                        help="with --task-calib: the family's calib.jsonl first, then the task's lines")
    parser.add_argument("--n-samples", type=int, help="calibration windows (default: CompressConfig)")
    parser.add_argument("--title", default=TITLE, help="the RESULTS.md section to write")
    args = parser.parse_args()
    if args.mode == "run":
        run(args.task, args.ratio, args.budget_bytes, args.tag, args.log, args.distill_steps, args.calib,
            args.n_samples, args.task_calib, args.plus_family_calib)
    else:
        write(args.log, args.notes_file.read_text() if args.notes_file else "", args.title)


if __name__ == "__main__":
    main()
