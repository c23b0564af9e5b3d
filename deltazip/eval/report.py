"""Quality report: exact-match accuracy and perplexity of base, fine-tune, compressed delta and baselines.

`evaluate_artifact` scores every candidate on the artifact's family task and stores the report under
"quality" in the artifact's manifest.json.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from deltazip.errors import DeltazipError
from deltazip.eval.scoring import candidate_model, lm_eval_scores, score
from deltazip.hf import fp16_bytes, load_model

QUALITY_KEY = "quality"


@dataclass
class QualityRow:
    """One line of the quality table: a method, its stored size and its scores on one task."""

    method: str
    size_bytes: int | None  # None for the base (it is shared, not stored per fine-tune)
    ratio_vs_fp16: float | None  # fp16 fine-tune bytes / size_bytes
    accuracy: float  # exact match on the task's held-out set, 0..1
    perplexity: float  # of the held-out answers (+EOS) given their prompts
    note: str = ""


def artifact_task(manifest: dict, tasks: list[str]) -> str:
    """The family task an artifact was compressed from (its manifest's target, else its name)."""
    target = manifest.get("target")
    candidates = [target.get("name"), target.get("path")] if isinstance(target, dict) else [target]
    candidates += [manifest.get("target_name"), manifest.get("name")]
    for value in candidates:
        if isinstance(value, str) and value:
            for candidate in (value, Path(value.rstrip("/")).name):
                if candidate in tasks:
                    return candidate
    raise DeltazipError(
        f"cannot tell which family task artifact '{manifest.get('name')}' belongs to "
        f"(tasks: {', '.join(tasks)}); pass --task"
    )


def artifact_bytes(artifact_dir: Path) -> int:
    """Whole-artifact bytes as the artifact records them (stats.artifact_bytes), else the files on disk."""
    manifest = json.loads((Path(artifact_dir) / "manifest.json").read_text())
    recorded = manifest.get("stats", {}).get("artifact_bytes")
    if isinstance(recorded, int):
        return recorded
    return sum(p.stat().st_size for p in Path(artifact_dir).rglob("*") if p.is_file())


def store_quality(artifact_dir: Path, report: dict) -> None:
    """Write `report` under "quality" in the artifact's manifest.json, atomically.

    manifest.json is not in its own per-file checksum list, so the other files' checksums stay valid.
    """
    manifest_path = Path(artifact_dir) / "manifest.json"
    if not manifest_path.is_file():
        raise DeltazipError(f"not a delta artifact (no manifest.json): {artifact_dir}")
    manifest = json.loads(manifest_path.read_text())
    manifest[QUALITY_KEY] = report
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", suffix=".json", dir=artifact_dir)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(manifest, f, indent=1)  # same layout as save_delta
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, manifest_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_report(task: str, rows: list[QualityRow], n_examples: int, extra: dict | None = None) -> dict:
    """The JSON-ready quality report stored in the manifest (rows + accuracy retention vs the fine-tune)."""
    by_method = {r.method: r for r in rows}
    full = by_method.get("full fine-tune")
    retention = {
        r.method: (r.accuracy / full.accuracy if full and full.accuracy > 0 else None)
        for r in rows if r.method not in ("base", "full fine-tune")
    }
    report = {"task": task, "n_examples": n_examples, "rows": [asdict(r) for r in rows],
              "accuracy_retention": retention}
    if extra:
        report.update(extra)
    return report


def artifact_label(manifest: dict) -> str:
    """A short method name for the artifact's row, e.g. "deltazip 2-bit 2:4"."""
    settings = manifest.get("settings") or manifest.get("compression") or {}
    bits, sparsity = settings.get("bits"), settings.get("sparsity")
    return "deltazip" + (f" {bits}-bit" if bits else "") + (f" {sparsity}" if sparsity else "")


def evaluate_artifact(base_dir: Path, artifact_dir: Path, family_dir: Path, task: str | None = None,
                      baselines: tuple[str, ...] = (), max_examples: int | None = None, n_samples: int = 64,
                      seq_len: int = 64, lm_eval_tasks: tuple[Path, ...] = (), store: bool = True,
                      device: str = "cpu") -> dict:
    """Score base, full fine-tune, base + decompress(artifact) and the named baselines on the artifact's task.

    Scoring runs on `device` (auto | cpu | cuda[:N]; CUDA unverified); baselines are built on the CPU.

    The report (see make_report) is stored under "quality" in the artifact's manifest unless `store` is False.
    """
    from deltazip.compress.calibration import calib_ids, read_calib_texts
    from deltazip.compress.device import resolve_device
    from deltazip.eval.baselines import run_baseline
    from deltazip.family import load_eval_set, load_family
    from deltazip.format import FingerprintError, decompress, fingerprint_model, load_delta
    from deltazip.ui import progress

    torch_device = resolve_device(device)
    artifact_dir = Path(artifact_dir)
    if not (artifact_dir / "manifest.json").is_file():
        raise DeltazipError(f"delta artifact not found (no manifest.json): {artifact_dir}")
    if lm_eval_tasks:
        lm_eval_scores(None, None, [])  # fail fast when lm-eval is missing, before any heavy work
    delta = load_delta(artifact_dir, verify=True)
    if fingerprint_model(base_dir) != delta.base_fingerprint:
        raise FingerprintError(f"{artifact_dir} was not compressed against the base {base_dir}")
    family = load_family(family_dir)
    task = task or artifact_task(delta.manifest, list(family.tasks))
    if task not in family.tasks:
        raise DeltazipError(f"unknown task '{task}' (family tasks: {', '.join(family.tasks)})")
    examples = load_eval_set(family.eval_path(task))[:max_examples]
    finetune_dir = Path(family.finetune_dirs[task])
    dz_bytes = artifact_bytes(artifact_dir)
    base_model, tokenizer = load_model(base_dir)
    finetune_model, _ = load_model(finetune_dir)
    full_bytes = fp16_bytes(finetune_model)
    calib = None
    if baselines:
        calib = calib_ids(tokenizer, read_calib_texts(family.calib_path), n_samples, seq_len)

    def build(kind: str):
        if kind == "base":
            return "base", base_model, None, "shared base"
        if kind == "full":
            return "full fine-tune", finetune_model, full_bytes, "fp16 reference"
        if kind == "deltazip":
            model = candidate_model(base_dir, delta=decompress(delta))
            return artifact_label(delta.manifest), model, dz_bytes, "whole artifact"
        result = run_baseline(kind, Path(base_dir), finetune_dir, calib, dz_bytes)
        return result.method, candidate_model(base_dir, result.weights), result.size_bytes, result.note

    rows, lm_eval = [], {}
    kinds = ["base", "full", "deltazip", *baselines]
    for kind in progress(kinds, desc=f"eval {task}"):
        method, model, size, note = build(kind)
        model = model.to(torch_device)
        accuracy, ppl = score(model, tokenizer, examples)
        rows.append(QualityRow(method, size, full_bytes / size if size else None, accuracy, ppl, note))
        if lm_eval_tasks:
            lm_eval[method] = lm_eval_scores(model, tokenizer, list(lm_eval_tasks))
    extra = {"fp16_bytes": full_bytes, "artifact_bytes": dz_bytes, "eval_set": f"eval/{task}.jsonl",
             "perplexity_on": "answer tokens + EOS of the eval set, prompt as context"}
    if lm_eval:
        extra["lm_eval"] = lm_eval
    report = make_report(task, rows, len(examples), extra)
    if store:
        store_quality(artifact_dir, report)
    return report
