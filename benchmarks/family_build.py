"""Claim: the tiny family builds in under 3 minutes on 2 cores, and each fine-tune beats the base on its task.

Builds a fresh family (no cache) into a temp dir, then records wall/CPU build time, the accuracy table
(every model × every task) and each fine-tune's relative delta norm ||Δ||/||W|| in benchmarks/RESULTS.md.
Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/family_build.py [--preset tiny] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import command_line, markdown_table, write_section  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from transformers.utils import logging as hf_logging

    from deltazip.family import TASKS, create_family
    from deltazip.family.report import accuracy_table

    hf_logging.disable_progress_bar()

    with tempfile.TemporaryDirectory(prefix="family-bench-") as tmp:
        wall_started, cpu_started = time.time(), time.process_time()
        family = create_family(Path(tmp) / "family", preset=args.preset, seed=args.seed)
        build_wall, build_cpu = time.time() - wall_started, time.process_time() - cpu_started
        eval_started = time.time()
        table = accuracy_table(family.root)
        eval_wall = time.time() - eval_started
        load_avg = os.getloadavg()[0]

    rows = [[model, *(table[model][task] for task in TASKS),
             family.stats["relative_delta_norm"].get(model, "-")] for model in table]
    table_md = markdown_table(["model", *TASKS, "‖Δ‖/‖W‖"], rows)
    notes = (f"Build (fresh, no cache): {build_wall:.1f} s wall, {build_cpu:.1f} s CPU (torch threads fixed "
             f"to 1 during training; 1-min load average at the end {load_avg:.1f} on a machine shared "
             f"with other "
             f"jobs). Accuracy table (exact match, {len(TASKS)} tasks × {len(table)} models): "
             f"{eval_wall:.1f} s wall. Rows are models, columns tasks.")
    path = write_section(f"Family build: {args.preset}, seed {args.seed}", command_line(), table_md, notes)
    print(table_md)
    print(notes)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
