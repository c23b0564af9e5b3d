"""Full-model swapping: the baseline deltazip is measured against (benchmarks/multitenant.py).

What a user without deltazip runs: one full model per fine-tune, as many loaded as the memory budget holds,
the least recently used one replaced from disk when a request needs another (Triton explicit model control
or a vLLM-style server per model do the same: load the whole checkpoint, serve it, unload it). Realised as a
runtime mode of the same Engine (`[runtime] mode = "full_swap"`, rendered into the same Triton model), so
everything but the weights is identical: the Llama executor, continuous batching, KV budget, sampling,
tokenizer, Triton front. Differences, by design:

- `full_resident` (k) model slots, each a whole Llama in the runtime dtype; a slot is filled by reading the
  merged fine-tune's safetensors (fp16 on disk) into it. Loads run on the engine thread — like a
  single-device server that copies weights onto its only device, serving stalls during a swap;
- one model per forward pass: the running batch is split by model and each group runs on its own weights
  (requests of the k resident models still share engine iterations: the most favourable reading of "one
  model per batch");
- a model pinned by a running request is never evicted; a request whose model cannot get a slot waits.

The base model stays loaded for requests without a variant (as in deltazip mode).
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from pathlib import Path

import torch

from deltazip.config import RuntimeConfig
from deltazip.errors import DeltazipError, RequestError, shorten
from deltazip.runtime.engine import Engine
from deltazip.runtime.model import DTYPES, Llama, load_llama

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def model_nbytes(model: Llama) -> int:
    """Bytes of a model's parameters (tied weights counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


class FullModelPool:
    """k slots of whole models ← disk (a directory of NAME/ HF model dirs); the DeltaPool interface the
    Engine and the Triton model use (check_name, prefetch, acquire, release, stats, ...)."""

    def __init__(self, store_dir: str | Path, base_dir: str | Path, num_slots: int, dtype: str,
                 device: str) -> None:
        self.store_dir = Path(store_dir)
        self.num_slots = num_slots
        # the budget is allocated up front: k models of the base's shape, filled on demand
        self.models = [load_llama(base_dir, dtype, device) for _ in range(num_slots)]
        self.slot_bytes = model_nbytes(self.models[0]) if self.models else 0
        self._lock = threading.Lock()
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # resident names, least recently used first
        self._pins: dict[str, int] = {}
        self._blocked: set[str] = set()
        self.counters = {"hits": 0, "misses": 0, "evictions": 0, "disk_loads": 0, "disk_load_s": 0.0,
                         "disk_bytes": 0, "slot_loads": 0, "slot_load_s": 0.0, "load_errors": 0}
        self.per_variant: dict[str, dict] = {}

    def names(self) -> list[str]:
        if not self.store_dir.is_dir():
            return []
        return sorted(p.name for p in self.store_dir.iterdir()
                      if not p.name.startswith(".") and (p / "config.json").is_file())

    def check_name(self, name: str) -> None:
        if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
            raise RequestError(f"invalid delta name {shorten(name)}")
        if name in self._blocked or not (self.store_dir / name / "config.json").is_file():
            raise RequestError(f"unknown delta '{name}': the store has no such variant")

    def prefetch(self, name: str) -> Future:
        """Nothing to stage: a full model is read from disk straight into its slot by acquire."""
        self.check_name(name)
        done: Future = Future()
        done.set_result(name)
        return done

    def ready(self, name: str) -> bool:
        return True

    def acquire(self, name: str, artifact: object | None = None) -> int | None:
        """Pin `name` into a model slot (loading it from disk on a miss, LRU victim); None when all are
        pinned by other models."""
        with self._lock:
            variant = self._variant(name)
            variant["requests"] += 1
            if name in self._slot_of:
                self.counters["hits"] += 1
                self._slot_of.move_to_end(name)
                self._pins[name] = self._pins.get(name, 0) + 1
                return self._slot_of[name]
            used = set(self._slot_of.values())
            free = [s for s in range(self.num_slots) if s not in used]
            if free:
                slot = free[0]
            else:
                victim = next((n for n in self._slot_of if self._pins.get(n, 0) == 0), None)
                if victim is None:
                    return None
                slot = self._slot_of.pop(victim)
                self._pins.pop(victim, None)
                self.counters["evictions"] += 1
            self.counters["misses"] += 1
            start = time.perf_counter()
            try:
                nbytes = self._load(name, self.models[slot])
            except Exception:
                self.counters["load_errors"] += 1
                raise
            seconds = time.perf_counter() - start
            self._slot_of[name] = slot
            self._pins[name] = 1
            for key in ("disk_loads", "slot_loads"):
                self.counters[key] += 1
            self.counters["disk_load_s"] += seconds
            self.counters["slot_load_s"] += seconds
            self.counters["disk_bytes"] += nbytes
            variant["swap_ins"] += 1
            variant["swap_in_s"] += seconds
            return slot

    def _load(self, name: str, model: Llama) -> int:
        """Read NAME/*.safetensors into `model`'s parameters; the bytes read."""
        from safetensors.torch import load_file

        files = sorted((self.store_dir / name).glob("*.safetensors"))
        if not files:
            raise DeltazipError(f"full model '{name}' has no safetensors files")
        params = dict(model.named_parameters())
        nbytes = 0
        with torch.no_grad():
            for f in files:
                nbytes += f.stat().st_size
                for key, tensor in load_file(f).items():
                    if key in params:
                        params[key].copy_(tensor)
        return nbytes

    def model(self, slot: int) -> Llama:
        return self.models[slot]

    def release(self, name: str, slot: int | None = None) -> None:
        with self._lock:
            if self._pins.get(name, 0) > 0:
                self._pins[name] -= 1

    def _variant(self, name: str) -> dict:
        return self.per_variant.setdefault(name, {"swap_ins": 0, "swap_in_s": 0.0, "requests": 0})

    def evict(self, name: str) -> bool:
        with self._lock:
            if self._pins.get(name, 0) > 0:
                return False
            self._slot_of.pop(name, None)
            return True

    def retire(self, name: str, timeout_s: float = 30.0) -> int:
        return int(self.evict(name))

    def block(self, name: str) -> None:
        self._blocked.add(name)

    def unblock(self, name: str) -> None:
        self._blocked.discard(name)

    def pinned(self, name: str) -> int:
        return self._pins.get(name, 0)

    def resident(self) -> dict[str, int]:
        with self._lock:
            return dict(self._slot_of)

    def host_resident(self) -> list[str]:
        return []

    def variant_bytes(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {n: {"device": self.slot_bytes, "host": 0} for n in self._slot_of}

    def stats(self) -> dict:
        with self._lock:
            return {**self.counters, "slots_used": len(self._slot_of), "slots": self.num_slots,
                    "slot_bytes": self.slot_bytes, "host_bytes": 0, "host_cache_bytes": 0, "host_entries": 0,
                    "per_variant": {k: dict(v) for k, v in self.per_variant.items()}}

    def close(self) -> None:
        pass


class FullSwapEngine(Engine):
    """The Engine with whole models instead of deltas: each forward pass runs one model."""

    @classmethod
    def from_config(cls, base_dir: str | Path, config: RuntimeConfig) -> FullSwapEngine:
        from transformers import AutoTokenizer

        from deltazip.runtime.engine import _eos_token_ids

        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if config.dtype not in DTYPES:
            raise DeltazipError(f"runtime.dtype must be one of {', '.join(DTYPES)}, not {config.dtype!r}")
        model = load_llama(base_dir, config.dtype, device)
        model.delta_modules = {}
        pool = FullModelPool(config.full_models, base_dir, config.full_resident, config.dtype, device)
        tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
        return cls(model, tokenizer, pool, config, _eos_token_ids(Path(base_dir), tokenizer))

    def _run_model(self, seqs, prefill: bool) -> torch.Tensor:
        """One forward pass per model among `seqs` (slot -1: the base); logits in `seqs` order."""
        groups: dict[int, list[int]] = {}
        for i, seq in enumerate(seqs):
            groups.setdefault(seq.slot, []).append(i)
        out: list[torch.Tensor | None] = [None] * len(seqs)
        from deltazip.runtime.model import Segment

        for slot, rows in groups.items():
            model = self.model if slot < 0 else self.pool.model(slot)
            group = [seqs[i] for i in rows]
            if prefill:
                tokens = torch.tensor([t for s in group for t in s.prompt_ids], device=self.device)
                segments = [Segment(s.cache, 0, len(s.prompt_ids)) for s in group]
            else:
                tokens = torch.tensor([s.completion_ids[-1] for s in group], device=self.device)
                segments = [Segment(s.cache, s.cache.length, 1) for s in group]
            logits = model(tokens, segments, None)
            for i, row in zip(rows, logits, strict=True):
                out[i] = row
        return torch.stack(out)  # type: ignore[arg-type]

    def stats(self) -> dict:
        return {**self.counters, "waiting": len(self._waiting), "running": len(self._running),
                "kv_reserved_tokens": self.budget.reserved_tokens,
                "kv_budget_tokens": self.budget.total_tokens, "resident_delta_bytes": 0,
                "resident_model_bytes": self.pool.slot_bytes * self.pool.num_slots,
                "pool": self.pool.stats(), "mode": "full_swap"}

