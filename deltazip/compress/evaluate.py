"""Quality report: exact-match accuracy and perplexity of base, fine-tune, compressed delta and baselines.

Every candidate goes through one path: the base model is loaded with transformers, then the candidate's
weights (a full state dict, a dense delta, or a ready nn.Module such as a fake-quantized one) are applied.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from deltazip.errors import DeltazipError

if TYPE_CHECKING:
    import torch
    from torch import nn

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


def load_model(model_dir: str | Path) -> tuple[nn.Module, object]:
    """An HF causal LM (fp32, eval mode, CPU) and its tokenizer from a model directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise DeltazipError(f"not a model directory (no config.json): {model_dir}")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model.eval(), tokenizer


def fp16_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters stored as fp16 (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters()) * 2


def replace_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Overwrite the named parameters of `model` in place with absolute weights from `state`."""
    import torch

    params = dict(model.named_parameters(remove_duplicate=False))
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise DeltazipError(f"weights do not match the model: unknown parameter '{unknown[0]}'")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].dtype))
    return model


def add_delta(model: nn.Module, delta: dict[str, torch.Tensor]) -> nn.Module:
    """Add a dense delta (param name → Δ) to `model`'s weights in place; tied weights get it once."""
    import torch

    params = dict(model.named_parameters(remove_duplicate=False))
    done: set[int] = set()
    with torch.no_grad():
        for name, value in delta.items():
            if name not in params:
                raise DeltazipError(f"delta does not match the base: unknown parameter '{name}'")
            param = params[name]
            if id(param) in done:
                continue
            if tuple(param.shape) != tuple(value.shape):
                raise DeltazipError(
                    f"delta '{name}' has shape {tuple(value.shape)}, base has {tuple(param.shape)}")
            param.add_(value.to(param.dtype))
            done.add(id(param))
    return model


def heldout_texts(examples: list[dict]) -> list[str]:
    """The held-out texts perplexity is measured on: each example's prompt followed by its answer."""
    return [ex["prompt"] + ex["answer"] for ex in examples]


def perplexity(model: nn.Module, tokenizer, texts: list[str], context_lens: list[int] | None = None,
               batch_size: int = 16, max_len: int = 256) -> float:
    """exp(mean next-token NLL) over `texts` + EOS, right-padded batches, padding ignored.

    The first context_lens[i] tokens of text i are context only (not scored).
    """
    import torch
    import torch.nn.functional as F

    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(texts), batch_size):
        ids = [(tokenizer(t)["input_ids"] + eos)[:max_len] for t in texts[start:start + batch_size]]
        width = max(len(x) for x in ids)
        input_ids = torch.zeros(len(ids), width, dtype=torch.long)
        scored = torch.zeros(len(ids), width, dtype=torch.bool)  # tokens whose NLL counts
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
            first = max(1, context_lens[start + row]) if context_lens else 1
            scored[row, first:len(seq)] = True
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
        labels = input_ids[:, 1:].masked_fill(~scored[:, 1:], -100)
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                              ignore_index=-100, reduction="sum")
        total_nll += nll.item()
        total_tokens += int((labels != -100).sum())
    if total_tokens == 0:
        raise DeltazipError("perplexity needs at least one scored token")
    return math.exp(total_nll / total_tokens)


def answer_perplexity(model: nn.Module, tokenizer, examples: list[dict]) -> float:
    """Perplexity of each answer + EOS given its prompt (the prompt tokens are context, not scored)."""
    context_lens = [len(tokenizer(ex["prompt"])["input_ids"]) for ex in examples]
    return perplexity(model, tokenizer, heldout_texts(examples), context_lens)


def score(model: nn.Module, tokenizer, examples: list[dict], max_new_tokens: int = 16) -> tuple[float, float]:
    """(exact-match accuracy, answer perplexity) of `model` on one task's held-out examples."""
    from deltazip.family import exact_match

    accuracy = exact_match(model, tokenizer, examples, max_new_tokens=max_new_tokens)
    return float(accuracy), answer_perplexity(model, tokenizer, examples)


def candidate_model(base_dir: Path, weights: dict | nn.Module | None = None,
                    delta: dict | None = None) -> nn.Module:
    """The model to score: a ready module as is, else the base with `weights` set and/or `delta` added."""
    from torch import nn

    if isinstance(weights, nn.Module):
        return weights.eval()
    model, _ = load_model(base_dir)
    if weights:
        replace_weights(model, weights)
    if delta:
        add_delta(model, delta)
    return model


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
            json.dump(manifest, f, indent=1)  # same layout as artifact.save_delta
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
                      seq_len: int = 64, lm_eval_tasks: tuple[Path, ...] = (), store: bool = True) -> dict:
    """Score base, full fine-tune, base + decompress(artifact) and the named baselines on the artifact's task.

    The report (see make_report) is stored under "quality" in the artifact's manifest unless `store` is False.
    """
    from deltazip.artifact import decompress, fingerprint_model, load_delta
    from deltazip.compress.baselines import calib_ids, read_calib_texts, run_baseline
    from deltazip.family import load_eval_set, load_family
    from deltazip.ui import progress

    artifact_dir = Path(artifact_dir)
    if not (artifact_dir / "manifest.json").is_file():
        raise DeltazipError(f"delta artifact not found (no manifest.json): {artifact_dir}")
    if lm_eval_tasks:
        lm_eval_scores(None, None, [])  # fail fast when lm-eval is missing, before any heavy work
    delta = load_delta(artifact_dir, verify=True)
    if fingerprint_model(base_dir) != delta.base_fingerprint:
        from deltazip.artifact import FingerprintError

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


def lm_eval_scores(model: nn.Module | None, tokenizer, task_files: list[Path], batch_size: int = 8) -> dict:
    """lm-eval-harness scores on local task YAML files only (no hub); lm-eval is not in the dev venv."""
    try:
        import lm_eval
    except ImportError:
        raise DeltazipError(
            "lm-eval is not installed: install deltazip[eval] to use --lm-eval-tasks") from None
    try:
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise DeltazipError(f"lm-eval's HF backend cannot load ({e}): install deltazip[eval]") from None
    if model is None:
        return {}
    names = []
    for path in task_files:
        path = Path(path)
        if not path.is_file():
            raise DeltazipError(f"lm-eval task file not found: {path}")
        name = next((line.split(":", 1)[1].strip() for line in path.read_text().splitlines()
                     if line.startswith("task:")), None)
        if not name:
            raise DeltazipError(f"lm-eval task file has no 'task:' line: {path}")
        names.append(name)
    manager = TaskManager(include_path=sorted({str(Path(p).resolve().parent) for p in task_files}),
                          include_defaults=False)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager)
    return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            for task, metrics in results["results"].items()}
