"""Render the top-level triton_repo/ template into a build's model repository."""

from __future__ import annotations

import json
import shutil
import string
from pathlib import Path

from deltazip.errors import DeltazipError

TEMPLATE_SUFFIX = ".template"


def template_dir() -> Path:
    """The triton_repo/ template beside the package (the source checkout)."""
    root = Path(__file__).resolve().parent.parent.parent / "triton_repo"
    if not (root / "deltazip_llm").is_dir():
        raise DeltazipError(f"model repository template not found at {root} (run deltazip from a checkout)")
    return root


def pbtxt_string(value: str) -> str:
    """A protobuf text-format string literal (double quotes, backslash escapes)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def render_repo(out_repo: Path, values: dict[str, str], template: Path | None = None) -> list[Path]:
    """Copy the template into `out_repo`, filling `$name` placeholders of *.template files; returns files."""
    template = template or template_dir()
    written = []
    for src in sorted(template.rglob("*")):
        if src.is_dir() or "__pycache__" in src.parts:
            continue
        rel = src.relative_to(template)
        if src.name.endswith(TEMPLATE_SUFFIX):
            dst = out_repo / rel.with_name(src.name[: -len(TEMPLATE_SUFFIX)])
            try:
                text = string.Template(src.read_text()).substitute(values)
            except KeyError as e:
                raise DeltazipError(f"template {src} uses ${e.args[0]}, not set by the build") from None
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(text)
        else:
            dst = out_repo / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        written.append(dst)
    return written


def model_values(base_dir: Path, deltas_dir: Path, runtime: dict, gpu: bool) -> dict[str, str]:
    """Placeholder values of deltazip_llm/config.pbtxt.template."""
    return {
        "kind": "KIND_GPU" if gpu else "KIND_CPU",
        "base_dir": pbtxt_string(str(base_dir)),
        "deltas_dir": pbtxt_string(str(deltas_dir)),
        "runtime_config": pbtxt_string(json.dumps(runtime, sort_keys=True)),
    }
