"""Accuracy retention of compressed deltas on every tiny-family task: compress (CompressConfig defaults, or
key=value overrides), merge with apply_delta, exact match on the full eval set vs the fine-tune, ratio.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compress_retention.py [key=value ...] [--tasks a,b]
        [--write]

--write stores the table in benchmarks/RESULTS.md (section "Compression: retention per task (tiny)").
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
FAMILY = REPO / ".deltazip/test-cache/family-tiny-s0"  # the tests' cached family


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltazip.compress import compress_model
    from deltazip.config import CompressConfig
    from deltazip.family import create_family, exact_match, load_eval_set
    from deltazip.format import apply_delta, read_manifest

    parser = argparse.ArgumentParser()
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--tasks", default="reverse,sort,upper,caesar,add,copy")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    overrides = {}
    for kv in args.overrides:
        k, v = kv.split("=", 1)
        field_type = {f.name: f.type for f in dataclasses.fields(CompressConfig)}[k]
        overrides[k] = {"int": int, "float": float, "str": str}[str(field_type)](v)
    settings = dataclasses.replace(CompressConfig(), **overrides)
    family = create_family(FAMILY, "tiny", 0)
    tok = AutoTokenizer.from_pretrained(str(family.base_dir))
    work = Path(tempfile.mkdtemp(prefix="dz-retention-"))
    rows = []
    for task in args.tasks.split(","):
        examples = load_eval_set(family.eval_path(task))
        ft = AutoModelForCausalLM.from_pretrained(family.finetune_dirs[task]).eval()
        ft_em = exact_match(ft, tok, examples)
        out = work / f"{task}.dz"
        t0 = time.perf_counter()
        compress_model(family.base_dir, family.finetune_dirs[task], out, settings, name=task,
                       calib=family.calib_path)
        seconds = time.perf_counter() - t0
        merged_dir = work / f"{task}-merged"
        apply_delta(family.base_dir, out, merged_dir)
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
        em = exact_match(merged, tok, examples)
        shutil.rmtree(merged_dir)
        stats = read_manifest(out)["stats"]
        rows.append((task, ft_em, em, em / ft_em, stats["ratio"], stats["bits_per_weight"], seconds))
        print(f"{task:8s} ft {ft_em:.3f} dz {em:.3f} ret {em / ft_em:.3f} ratio {stats['ratio']:.2f} "
              f"bpw {stats['bits_per_weight']:.3f} {seconds:.1f}s", flush=True)
    shutil.rmtree(work)
    print(f"SUMMARY {overrides} min_retention {min(r[3] for r in rows):.3f} "
          f"mean_ratio {sum(r[4] for r in rows) / len(rows):.2f}", flush=True)
    if args.write:
        from benchmarks._results import command_line, markdown_table, write_section

        table = markdown_table(
            ["task", "fine-tune EM", "delta EM", "retention", "ratio vs fp16", "bits/weight", "seconds"],
            [[r[0], f"{r[1]:.3f}", f"{r[2]:.3f}", f"{r[3]:.3f}", f"{r[4]:.2f}x", f"{r[5]:.3f}", f"{r[6]:.1f}"]
             for r in rows])
        command = command_line()
        notes = f"settings: {dataclasses.asdict(settings)}; exact match on the full eval set of each task"
        write_section("Compression: retention per task (tiny)", command, table, notes)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
