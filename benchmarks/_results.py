"""Shared writer for benchmarks/RESULTS.md: one section per claim, replaced in place when re-run."""

from __future__ import annotations

import datetime
import os
import platform
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = "# deltazip benchmark results\n\nEvery figure below comes with the command that produced it.\n"


def machine() -> str:
    """One line describing where the figures were measured."""
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"{platform.machine()}, {os.cpu_count()} cores, {gpu}"


def command_line(extra: list[str] | None = None) -> str:
    """The command that is running now, as a user would retype it (thread setting included)."""
    import sys

    threads = os.environ.get("OMP_NUM_THREADS")
    prefix = f"OMP_NUM_THREADS={threads} " if threads else ""
    script = Path(sys.argv[0]).resolve().relative_to(RESULTS.parent.parent)
    return " ".join([f"{prefix}.venv/bin/python {script}", *sys.argv[1:], *(extra or [])])


def write_section(title: str, command: str, table_md: str, notes: str = "") -> Path:
    """Replace (or append) the `## title` section of RESULTS.md with the table, its command and machine."""
    date = datetime.date.today().isoformat()
    body = f"## {title}\n\nCommand: `{command}`  \nMachine: {machine()}; date: {date}\n\n{table_md.strip()}\n"
    if notes:
        body += f"\n{notes.strip()}\n"
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: body + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + body
    tmp = RESULTS.with_suffix(".md.tmp")
    tmp.write_text(text.rstrip("\n") + "\n")
    tmp.replace(RESULTS)
    return RESULTS


def markdown_table(columns: list[str], rows: list[list[object]]) -> str:
    """Rows as a GitHub markdown table (floats to 4 significant digits)."""
    def fmt(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
