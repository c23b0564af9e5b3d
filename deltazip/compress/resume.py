"""Resumable compression: one checkpoint file per finished decoder block, beside the artifact.

`.NAME.dz.partial/` (hidden, next to the artifact directory) holds `run.json` (the settings and inputs of
the run) and `block-00007.safetensors` for each finished block: its packed deltas, its exact deltas, the
running norms. `deltazip compress --resume` loads the finished blocks and replays them (forward passes
only: the compressed stream through base + Δ̂, the teacher stream through the fine-tune), so the run
continues from the first unfinished block with the same hidden states, and the final artifact is identical
to an uninterrupted run on the same machine and thread count. Each checkpoint is written to a temporary
file and renamed, so a kill leaves whole files only. The directory is removed once the artifact is saved.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from deltazip.errors import DeltazipError
from deltazip.packed import PACKED_KEYS, PackedLinear

log = logging.getLogger(__name__)
RUN_FILE = "run.json"
VERSION = 1


def _flat(run: dict, prefix: str = "") -> dict:
    """{"settings": {"bits": 2}} → {"settings.bits": 2} (so an error names the one setting that changed)."""
    out = {}
    for key, value in run.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def partial_dir(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.partial"


class Checkpoints:
    """Per-block checkpoints of one compression run (see the module docstring)."""

    def __init__(self, out_dir: Path, run: dict, resume: bool) -> None:
        self.dir = partial_dir(Path(out_dir))
        self.run = {"version": VERSION, **run}
        if resume:
            self._check_resumable()
        elif self.dir.exists():
            log.info("discarding the checkpoints of an earlier run in %s (no --resume)", self.dir)
            shutil.rmtree(self.dir)
        self.finished = self._finished() if resume else set()
        self.tune_steps: int | None = None  # set by load(0): the step count fixed by block 0
        if resume:
            log.info("resuming: %d finished block(s) in %s", len(self.finished), self.dir)

    def _check_resumable(self) -> None:
        run_file = self.dir / RUN_FILE
        if not run_file.is_file():
            raise DeltazipError(f"--resume: no interrupted run to resume ({self.dir} does not exist); "
                                "run without --resume")
        try:
            saved = json.loads(run_file.read_text())
        except (OSError, json.JSONDecodeError):
            raise DeltazipError(f"--resume: {run_file} is unreadable; run without --resume") from None
        then, now = _flat(saved), _flat(self.run)
        for key in sorted(set(then) | set(now)):
            if then.get(key) != now.get(key):
                raise DeltazipError(f"--resume: the interrupted run used different settings ({key}: "
                                    f"{then.get(key)!r} then, {now.get(key)!r} now); pass the same "
                                    "settings, or run without --resume to start over")

    def _finished(self) -> set[int]:
        done = set()
        for path in self.dir.glob("block-*.safetensors"):
            try:
                done.add(int(path.stem.split("-", 1)[1]))
            except ValueError:
                continue
        return done

    def _path(self, index: int) -> Path:
        return self.dir / f"block-{index:05d}.safetensors"

    def has(self, index: int) -> bool:
        return index in self.finished

    def save(self, index: int, linears: dict[str, PackedLinear], exact: dict[str, torch.Tensor],
             norms: list[float], tune_steps: int | None = None) -> None:
        """Write block `index`'s results atomically (tmp file + rename); block 0 also records the tuning
        step count the time budget gave (`tune_steps`, reused by every later block and by a resumed run)."""
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        run_file = self.dir / RUN_FILE
        if not run_file.exists():
            tmp = run_file.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(self.run, sort_keys=True, indent=1))
            os.replace(tmp, run_file)
        tensors, layouts = {}, {}
        for name, packed in linears.items():
            if not isinstance(packed, PackedLinear):
                raise DeltazipError(f"--resume cannot checkpoint {type(packed).__name__} ({name})")
            layouts[name] = [packed.out_features, packed.in_features, packed.bits, packed.group_size,
                             packed.sparse24]
            for key in PACKED_KEYS:
                value = getattr(packed, key)
                if value is not None:
                    tensors[f"linear:{name}:{key}"] = value.contiguous()
        for name, value in exact.items():
            tensors[f"exact:{name}"] = value.contiguous()
        meta = {"layouts": json.dumps(layouts), "norms": json.dumps(list(norms))}
        if tune_steps is not None:
            meta["tune_steps"] = str(int(tune_steps))
        path = self._path(index)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
        self.finished.add(index)

    def load(self, index: int) -> tuple[dict[str, PackedLinear], dict[str, torch.Tensor], list[float]]:
        from safetensors import safe_open

        path = self._path(index)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            layouts, norms = json.loads(meta["layouts"]), json.loads(meta["norms"])
            if "tune_steps" in meta:
                self.tune_steps = int(meta["tune_steps"])
        except (OSError, KeyError, ValueError) as e:
            raise DeltazipError(f"--resume: checkpoint {path} is unreadable ({e}); run without "
                                "--resume") from None
        linears = {}
        for name, (n, k, bits, group, sparse24) in layouts.items():
            parts = {key: tensors.get(f"linear:{name}:{key}") for key in PACKED_KEYS}
            linears[name] = PackedLinear(n, k, bits, group, sparse24, **parts)
        exact = {k.split(":", 1)[1]: v for k, v in tensors.items() if k.startswith("exact:")}
        return linears, exact, norms

    def finish(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
