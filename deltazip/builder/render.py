"""Render the top-level triton_repo/ template into a build's model repository."""

from __future__ import annotations

import json
import shutil
import string
from pathlib import Path

from deltazip.errors import DeltazipError

TEMPLATE_SUFFIX = ".template"
VARIANTS_DIR = "variants"  # triton_repo/variants/<backend>/: a backend's own model repository (e.g. trtllm)


def template_dir() -> Path:
    """The triton_repo/ template beside the package (the source checkout)."""
    root = Path(__file__).resolve().parent.parent.parent / "triton_repo"
    if not (root / "deltazip_llm").is_dir():
        raise DeltazipError(f"model repository template not found at {root} (run deltazip from a checkout)")
    return root


def pbtxt_string(value: str) -> str:
    """A protobuf text-format string literal (double quotes, backslash escapes)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def variant_template(backend: str) -> Path:
    """The model repository template of a backend: triton_repo/ for torch, triton_repo/variants/<backend>/."""
    root = template_dir()
    if backend == "torch":
        return root
    variant = root / VARIANTS_DIR / backend
    if not (variant / "deltazip_llm").is_dir():
        raise DeltazipError(f"model repository template for backend {backend!r} not found at {variant}")
    return variant


def template_files(template: Path) -> list[tuple[Path, Path]]:
    """(source, path relative to the rendered repository) of every template file; variants/ is skipped."""
    files = []
    for src in sorted(template.rglob("*")):
        rel = src.relative_to(template)
        if src.is_dir() or "__pycache__" in src.parts or rel.parts[0] == VARIANTS_DIR:
            continue
        if src.name.endswith(TEMPLATE_SUFFIX):
            rel = rel.with_name(src.name[: -len(TEMPLATE_SUFFIX)])
        files.append((src, rel))
    return files


def render_repo(out_repo: Path, values: dict[str, str], template: Path | None = None) -> list[Path]:
    """Copy the template into `out_repo`, filling `$name` placeholders of *.template files; returns files."""
    template = template or template_dir()
    written = []
    for src, rel in template_files(template):
        if src.name.endswith(TEMPLATE_SUFFIX):
            dst = out_repo / rel
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
