"""The generation engine: continuous (iteration-level) batching of requests on many deltas and the base.

A background thread loops: admit waiting requests (delta loaded, slot pinned, KV tokens reserved), prefill
them in one flattened batch, then run one decode step for every running sequence — whatever delta each
uses. Requests finish one by one (stop token/string, max_tokens, context, cancel, error) and free their KV
tokens and slot pins; a failing request fails alone. Each request's tokens, text and stream live in its
RequestState (runtime/request.py), decoded incrementally (runtime/detokenizer.py).

On CUDA the delta layers run the Triton kernel (add_delta_matmul impl "auto"): GPU only — not verified on this
machine. Everything else (CPU, torch path) is tested here.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from deltazip.config import RuntimeConfig
from deltazip.errors import DeltazipError, RequestError
from deltazip.runtime.delta_linear import (
    clear_model_delta,
    enable_deltas,
    resident_delta_bytes,
    set_model_delta,
)
from deltazip.runtime.detokenizer import IncrementalDetokenizer
from deltazip.runtime.kv_cache import KVBudget
from deltazip.runtime.model import DTYPES, Llama, Segment, load_llama
from deltazip.runtime.pool import DeltaPool
from deltazip.runtime.precision import PrecisionPolicy
from deltazip.runtime.request import RequestHandle, RequestState, TokenCallback
from deltazip.runtime.sampling import (
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    new_generator,
    sample_next,
)

log = logging.getLogger(__name__)


class Engine:
    """Serves the base and every delta of a store from one model in one batch loop."""

    def __init__(self, model: Llama, tokenizer, pool: DeltaPool, config: RuntimeConfig,
                 eos_token_ids: set[int]) -> None:
        self.model, self.tokenizer, self.pool, self.config = model, tokenizer, pool, config
        self.eos_token_ids = eos_token_ids
        # fast tokenizers raise "Already borrowed" when encode and decode run on two threads at once
        self._tokenizer_lock = threading.Lock()
        self.device = model.lm_head.weight.device
        self.budget = KVBudget(config.kv_budget_tokens)
        self._waiting: list[RequestState] = []
        self._running: list[RequestState] = []
        self._wakeup = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stopped = False
        self.counters = {"submitted": 0, "finished": 0, "errors": 0, "cancelled": 0, "decode_steps": 0,
                         "prefill_tokens": 0, "generated_tokens": 0, "peak_decode_batch": 0,
                         "peak_decode_deltas": 0}  # most distinct deltas (base counted as one) in a step

    @classmethod
    def from_dirs(cls, base_dir: str | Path, deltas_dir: str | Path,
                  config: RuntimeConfig | None = None) -> Engine:
        """Load the base (HF dir) and point the pool at a store of NAME.dz/ artifacts."""
        from transformers import AutoTokenizer

        from deltazip.format import fingerprint_model

        config = config or RuntimeConfig()
        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device not in ("cpu", "cuda"):
            raise DeltazipError(f"runtime.device must be auto, cpu or cuda, not {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise DeltazipError("runtime.device is 'cuda' but torch sees no CUDA device (use cpu or auto)")
        if config.dtype not in DTYPES:
            raise DeltazipError(f"runtime.dtype must be one of {', '.join(DTYPES)}, not {config.dtype!r}")
        if config.kernel not in ("auto", "torch", "triton"):
            raise DeltazipError(f"runtime.kernel must be auto, torch or triton, not {config.kernel!r}")
        model = load_llama(base_dir, config.dtype, device)
        enable_deltas(model, config.delta_slots, config.kernel)
        tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
        pool = DeltaPool(deltas_dir, fingerprint_model(base_dir), config.delta_slots, config.host_cache_bytes,
                         install=lambda slot, art: set_model_delta(model, slot, art.linears, art.exact),
                         uninstall=lambda slot: clear_model_delta(model, slot),
                         precision_policy=PrecisionPolicy(config.precision_policy, config.precision_bits,
                                                          config.precision_pressure, config.precision_hot))
        return cls(model, tokenizer, pool, config, _eos_token_ids(Path(base_dir), tokenizer))

    # -- public API -------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="deltazip-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish the loop; requests still queued or running end as "cancelled"."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify_all()
        if self._thread is not None:
            self._thread.join()
        for seq in [*self._waiting, *self._running]:
            self._finish(seq, "cancelled", error="engine stopped")
        self._waiting.clear()
        self._running.clear()
        self._stopped = True
        self.pool.close()

    def submit(self, request: GenerationRequest, on_token: TokenCallback | None = None) -> RequestHandle:
        """Queue a request; raises RequestError for input that can never run."""
        if self._stopping:
            raise RequestError("the engine is stopped")
        params = request.params if request.params is not None else SamplingParams()
        params.validate()
        if not isinstance(request.prompt, str):
            raise RequestError(f"prompt must be a string, not {type(request.prompt).__name__}")
        if request.delta is not None:
            self.pool.check_name(request.delta)
        with self._tokenizer_lock:
            prompt_ids = self.tokenizer(request.prompt)["input_ids"]
        if not prompt_ids:
            raise RequestError("prompt is empty (no tokens)")
        if len(prompt_ids) >= self.config.max_context:
            raise RequestError(f"prompt has {len(prompt_ids)} tokens; the context holds "
                               f"{self.config.max_context} (prompt + at least one new token)")
        handle = RequestHandle()
        load = self.pool.prefetch(request.delta) if request.delta is not None else None
        seq = RequestState(request, prompt_ids, handle, on_token, new_generator(params.seed), load,
                           IncrementalDetokenizer(self._decode, params.stop))
        with self._wakeup:
            self._waiting.append(seq)
            self.counters["submitted"] += 1
            self._wakeup.notify_all()
        if load is not None:  # wake the loop as soon as the delta is on the host
            load.add_done_callback(lambda _: self._notify())
        return handle

    def _notify(self) -> None:
        with self._wakeup:
            self._wakeup.notify_all()

    def generate(self, request: GenerationRequest, on_token: TokenCallback | None = None) -> GenerationResult:
        """Submit and wait (starts the loop if needed)."""
        self.start()
        return self.submit(request, on_token).result()

    def list_deltas(self) -> list[str]:
        return self.pool.names()

    def stats(self) -> dict:
        return {**self.counters, "waiting": len(self._waiting), "running": len(self._running),
                "kv_reserved_tokens": self.budget.reserved_tokens,
                "kv_budget_tokens": self.budget.total_tokens,
                "resident_delta_bytes": resident_delta_bytes(self.model), "pool": self.pool.stats()}

    # -- the loop ---------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wakeup:
                if self._stopping:
                    return
                if not self._running and not self._admissible():
                    self._wakeup.wait(timeout=0.05)
                    continue
            try:
                with torch.inference_mode():
                    self._prefill(self._admit())
                    self._decode_step()
            except Exception as e:  # a bug, not a request error: fail the running batch, keep serving
                log.exception("engine step failed")
                for seq in list(self._running):
                    self._finish(seq, "error", error=f"engine step failed: {e}")

    def _admissible(self) -> bool:
        return any(s.load is None or s.load.done() or s.handle.cancel_requested for s in self._waiting)

    def _admit(self) -> list[RequestState]:
        """Move waiting requests that can run now into the batch (FIFO among those whose delta is loaded)."""
        admitted: list[RequestState] = []
        with self._wakeup:
            waiting = list(self._waiting)
        for seq in waiting:
            if seq.handle.cancel_requested:
                self._finish(seq, "cancelled")
                continue
            if len(self._running) + len(admitted) >= self.config.max_batch_size:
                break
            params = seq.request.params
            if params.max_tokens == 0:
                self._finish(seq, "length")
                continue
            need = min(len(seq.prompt_ids) + params.max_tokens, self.config.max_context)
            if not self.budget.can_ever_fit(need):
                self._finish(seq, "error", error=f"request needs {need} KV-cache tokens; the budget "
                                                 f"(runtime.kv_budget_tokens) is {self.budget.total_tokens}")
                continue
            if seq.load is not None and not seq.load.done():
                continue
            if not self.budget.try_reserve(need):
                continue  # waits for running sequences to free their tokens
            seq.reserved_tokens = need
            if seq.load is not None:
                try:
                    slot = self.pool.acquire(seq.request.delta, seq.load.result())
                except Exception as e:
                    self._finish(seq, "error", error=str(e))
                    continue
                if slot is None:  # every slot pinned by other deltas: wait
                    self.budget.release(need)
                    seq.reserved_tokens = 0
                    continue
                seq.slot = slot
            seq.cache = self.model.new_cache(need)
            admitted.append(seq)
            with self._wakeup:
                self._waiting.remove(seq)
        return admitted

    def _row_slot(self, seqs: list[RequestState], counts: list[int]) -> torch.Tensor | None:
        if all(s.slot < 0 for s in seqs):
            return None
        slots = torch.tensor([s.slot for s in seqs], dtype=torch.int32)
        return slots.repeat_interleave(torch.tensor(counts)).to(self.device)

    def _prefill(self, seqs: list[RequestState]) -> None:
        if not seqs:
            return
        counts = [len(s.prompt_ids) for s in seqs]
        tokens = torch.tensor([t for s in seqs for t in s.prompt_ids], device=self.device)
        segments = [Segment(s.cache, 0, n) for s, n in zip(seqs, counts, strict=True)]
        try:
            logits = self.model(tokens, segments, self._row_slot(seqs, counts))
        except Exception as e:
            log.exception("prefill failed")
            for seq in seqs:
                self._finish(seq, "error", error=f"prefill failed: {e}")
            return
        self.counters["prefill_tokens"] += len(tokens)
        self._running.extend(seqs)
        for seq, row in zip(seqs, logits, strict=True):
            self._accept(seq, row)

    def _decode_step(self) -> None:
        for seq in [s for s in self._running if s.handle.cancel_requested]:
            self._finish(seq, "cancelled")
        seqs = [s for s in self._running if s.completion_ids]
        if not seqs:
            return
        tokens = torch.tensor([s.completion_ids[-1] for s in seqs], device=self.device)
        segments = [Segment(s.cache, s.cache.length, 1) for s in seqs]
        logits = self.model(tokens, segments, self._row_slot(seqs, [1] * len(seqs)))
        self.counters["decode_steps"] += 1
        self.counters["peak_decode_batch"] = max(self.counters["peak_decode_batch"], len(seqs))
        distinct = len({s.slot for s in seqs})
        self.counters["peak_decode_deltas"] = max(self.counters["peak_decode_deltas"], distinct)
        for seq, row in zip(seqs, logits, strict=True):
            self._accept(seq, row)

    # -- sampling and finishing -------------------------------------------------------------------------
    def _accept(self, seq: RequestState, logits: torch.Tensor) -> None:
        """Sample the next token of `seq`; finish it when EOS, a stop string or a length limit is reached."""
        token = sample_next(logits, seq.request.params, seq.generator)
        if token in self.eos_token_ids:
            self._finish(seq, "stop")
            return
        self.counters["generated_tokens"] += 1
        finish_reason = seq.add_token(token, self.config.max_context)
        if finish_reason is not None:
            self._finish(seq, finish_reason)

    def _decode(self, token_ids: Sequence[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _finish(self, seq: RequestState, reason: str, error: str | None = None) -> None:
        """End `seq` (streaming the rest of its text), free its KV tokens and slot, and post its result."""
        if seq.handle.done():
            return
        result = seq.result(reason, error)
        if seq in self._running:
            self._running.remove(seq)
        with self._wakeup:
            if seq in self._waiting:
                self._waiting.remove(seq)
        if seq.reserved_tokens:
            self.budget.release(seq.reserved_tokens)
            seq.reserved_tokens = 0
        if seq.slot >= 0:
            self.pool.release(seq.request.delta)
            seq.slot = -1
        seq.cache = None
        key = {"error": "errors", "cancelled": "cancelled"}.get(reason, "finished")
        self.counters[key] += 1
        seq.handle._finish(result)


def _eos_token_ids(base_dir: Path, tokenizer) -> set[int]:
    """EOS ids from the tokenizer, config.json and generation_config.json (each may hold an int or a list)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for name in ("config.json", "generation_config.json"):
        path = base_dir / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            ids.update([value] if isinstance(value, int) else (value or []))
    return ids
