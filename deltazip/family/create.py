"""create_family / load_family: build in a temp dir beside OUT (fsutil.atomic_dir), reuse by content hash."""

from __future__ import annotations

import fcntl
import hashlib
import json
import random
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from deltazip.errors import DeltazipError
from deltazip.family.tasks import (
    PRETRAIN_GENERATORS,
    TASK_GENERATORS,
    TASKS,
    TASKS_VERSION,
    make_eval_set,
    sample_examples,
    task_seed,
)
from deltazip.fsutil import atomic_dir

# Bump when the training code changes in a way that changes the tensors: part of the content hash.
FAMILY_VERSION = 1
FAMILY_JSON = "family.json"


@dataclass(frozen=True)
class Family:
    """A family directory on disk: the base, one fine-tune per task, eval sets and calibration text."""

    root: Path
    preset: str
    seed: int
    content_hash: str
    tasks: tuple[str, ...]
    models: dict[str, str]
    stats: dict

    @property
    def base_dir(self) -> Path:
        return self.root / self.models["base"]

    @property
    def finetune_dirs(self) -> dict[str, Path]:
        return {task: self.root / self.models[task] for task in self.tasks}

    def eval_path(self, task: str) -> Path:
        return self.root / "eval" / f"{task}.jsonl"

    @property
    def calib_path(self) -> Path:
        return self.root / "calib.jsonl"


def load_family(root: str | Path) -> Family:
    """Open a family directory written by create_family."""
    root = Path(root)
    meta_path = root / FAMILY_JSON
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise DeltazipError(
            f"{root} is not a model family (no {FAMILY_JSON}); run `deltazip family create`") from None
    except (OSError, json.JSONDecodeError) as e:
        raise DeltazipError(f"cannot read {meta_path}: {e}") from None
    try:
        return Family(root=root, preset=meta["preset"], seed=meta["seed"], content_hash=meta["content_hash"],
                      tasks=tuple(meta["tasks"]), models=dict(meta["models"]), stats=meta.get("stats", {}))
    except KeyError as e:
        raise DeltazipError(f"{meta_path}: missing key {e}") from None


def content_hash(preset, seed: int) -> str:
    """sha256 over everything that determines the family's bytes."""
    recipe = {"preset": asdict(preset), "seed": seed, "family_version": FAMILY_VERSION,
              "tasks_version": TASKS_VERSION, "tasks": list(TASKS)}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def _is_current(out: Path, wanted_hash: str) -> bool:
    try:
        family = load_family(out)
    except DeltazipError:
        return False
    return family.content_hash == wanted_hash and all(
        (out / d / "config.json").is_file() for d in family.models.values())


@contextmanager
def _build_lock(out: Path) -> Iterator[None]:
    """Serialise concurrent builds of the same OUT (several test sessions share one cache)."""
    lock_path = out.parent / f".{out.name}.lock"
    with open(lock_path, "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _prepare_parent(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DeltazipError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / FAMILY_JSON).is_file():
        raise DeltazipError(f"output {out} is a non-empty directory but not a model family; not replacing it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.probe-")
        probe.close()
    except OSError as e:
        raise DeltazipError(f"cannot write to {out.parent}: {e.strerror}") from None


def create_family(out: str | Path, preset: str = "tiny", seed: int = 0, _steps_scale: float = 1.0) -> Family:
    """Build (or reuse, when OUT holds the same content hash) the family of `preset` and `seed` in OUT."""
    from deltazip.family.train import PRESETS

    if preset not in PRESETS:
        raise DeltazipError(f"unknown family preset '{preset}' (known: {', '.join(sorted(PRESETS))})")
    spec = PRESETS[preset] if _steps_scale == 1.0 else PRESETS[preset].scaled(_steps_scale)
    out = Path(out).expanduser().absolute()
    wanted_hash = content_hash(spec, seed)
    if _is_current(out, wanted_hash):
        return load_family(out)
    _prepare_parent(out)
    with _build_lock(out):
        if _is_current(out, wanted_hash):  # another process built it while we waited
            return load_family(out)
        with atomic_dir(out, overwrite=True) as tmp:  # _prepare_parent refused anything but a family
            tmp.chmod(0o755)  # the family is ordinary shared data, whatever the umask
            _write_family(tmp, spec, seed, wanted_hash)
    return load_family(out)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _save_model(model, tokenizer, model_dir: Path) -> None:
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=16)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # our own bars show the build; one per saved shard is noise
    try:
        model.save_pretrained(model_dir)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(model_dir)


def _relative_delta_norm(base_state: dict, state: dict) -> float:
    delta_sq = sum(float((state[k] - base_state[k]).double().pow(2).sum()) for k in base_state)
    weight_sq = sum(float(v.double().pow(2).sum()) for v in base_state.values())
    return (delta_sq / weight_sq) ** 0.5


def _write_family(root: Path, spec, seed: int, family_hash: str) -> None:
    """Train and write every file of the family under `root`."""
    import torch
    from transformers import LlamaForCausalLM

    from deltazip.family.tokenizer import build_tokenizer
    from deltazip.family.train import train
    from deltazip.threads import fixed_threads

    started, cpu_started = time.time(), time.process_time()
    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab()
    eval_sets = {task: make_eval_set(task, seed, spec.eval_examples) for task in TASKS}
    held_out = {prompt for examples in eval_sets.values() for prompt, _ in examples}
    (root / "eval").mkdir()
    for task, examples in eval_sets.items():
        _write_jsonl(root / "eval" / f"{task}.jsonl", [{"prompt": p, "answer": a} for p, a in examples])
    _write_jsonl(root / "calib.jsonl", calibration_lines(seed, spec.calib_lines, held_out))

    stats: dict = {"final_loss": {}, "relative_delta_norm": {}}
    with fixed_threads(spec.train_threads):
        torch.manual_seed(task_seed(seed, "init"))
        model = LlamaForCausalLM(spec.llama_config())
        stats["final_loss"]["base"] = train(
            model, PRETRAIN_GENERATORS, held_out, vocab, spec.base_steps, spec.base_lr, spec.warmup_steps,
            spec.batch_size, task_seed(seed, "base"), answer_only=True, desc="pretrain base")
        _save_model(model, tokenizer, root / "base")
        base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for task in TASKS:
            model.load_state_dict(base_state)
            stats["final_loss"][task] = train(
                model, {task: TASK_GENERATORS[task]}, held_out, vocab, spec.finetune_steps, spec.finetune_lr,
                spec.warmup_steps, spec.batch_size, task_seed(seed, "finetune", task), answer_only=True,
                desc=f"fine-tune {task}")
            _save_model(model, tokenizer, root / task)
            stats["relative_delta_norm"][task] = _relative_delta_norm(base_state, model.state_dict())
    stats["build_seconds"] = round(time.time() - started, 1)
    stats["build_cpu_seconds"] = round(time.process_time() - cpu_started, 1)
    meta = {"preset": spec.name, "seed": seed, "content_hash": family_hash, "tasks": list(TASKS),
            "models": {"base": "base", **{task: task for task in TASKS}}, "stats": stats}
    (root / FAMILY_JSON).write_text(json.dumps(meta, indent=2) + "\n")


def calibration_lines(seed: int, n_lines: int, held_out: set[str], task: str | None = None) -> list[dict]:
    """Task-mixture text: each line joins a few full examples of the six tasks (never eval prompts); with
    `task`, examples of that task only (a fine-tune's own data)."""
    rng = random.Random(task_seed(seed, "calib", *([task] if task else [])))
    generators = {task: TASK_GENERATORS[task]} if task else TASK_GENERATORS
    lines = []
    for _ in range(n_lines):
        examples = sample_examples(generators, rng, 4, held_out)
        lines.append({"text": "\n".join(prompt + answer for prompt, answer in examples)})
    return lines
