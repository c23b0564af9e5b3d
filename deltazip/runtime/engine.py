"""The generation engine: continuous (iteration-level) batching of requests on many deltas and the base.

A background thread loops: admit waiting requests (delta loaded, slot pinned, KV tokens reserved), prefill
them in one flattened batch, then run one decode step for every running sequence — whatever delta each
uses. Requests finish one by one (stop token/string, max_tokens, context, cancel, error) and free their KV
tokens and slot pins. Each request's tokens, text and stream live in its RequestState (runtime/request.py),
decoded incrementally (runtime/detokenizer.py).

A failing request fails alone: sampling and detokenizing run per request (an exception finishes that
request with an error), and a batched forward pass that raises is retried one request at a time, so only
the request whose row fails gets the error (KV writes are idempotent: a cache's length advances only after
a forward succeeds). Prompts are tokenized on the submitting thread with a tokenizer of their own (never the
loop's, which detokenizes), after a byte-length bound: a prompt longer than max_context x the longest
token's UTF-8 bytes cannot fit and is refused before any tokenizer work.

On CUDA the delta layers run the Triton kernel (add_delta_matmul impl "auto"): GPU only — not verified on this
machine. Everything else (CPU, torch path) is tested here.
"""

from __future__ import annotations

import copy
import json
import logging
import os
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
        # fast tokenizers raise "Already borrowed" when one object is used on two threads at once: the loop
        # detokenizes with `tokenizer`, submitters encode with a copy, so a long encode never blocks a step
        self._tokenizer_lock = threading.Lock()
        self._encoder = copy.deepcopy(tokenizer)
        self._encoder_lock = threading.Lock()
        self.max_prompt_bytes = config.max_context * max_token_bytes(tokenizer)
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
        if config.mode == "full_swap":  # the full-model-swapping baseline (benchmarks/multitenant.py)
            from deltazip.runtime.full_swap import FullSwapEngine

            return FullSwapEngine.from_config(base_dir, config)
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
        # cheap bound before any tokenizer work (a 10 MB prompt would hold a tokenizer for seconds)
        if len(request.prompt) > self.max_prompt_bytes or (
                len(request.prompt.encode("utf-8", "surrogatepass")) > self.max_prompt_bytes):
            raise RequestError(f"prompt is longer than {self.max_prompt_bytes} bytes; the context holds "
                               f"{self.config.max_context} tokens (prompt + at least one new token)")
        if request.delta is not None:
            self.pool.check_name(request.delta)
        with self._encoder_lock:
            prompt_ids = self._encoder(request.prompt)["input_ids"]
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
                    self._finish(seq, "error", error=self._public_error(e))
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

    def _public_error(self, error: Exception) -> str:
        """A load error as remote clients may see it: the store's location replaced by <store>, bounded."""
        text = str(error)
        store = self.pool.store_dir
        for path in sorted({str(store), os.path.realpath(store)}, key=len, reverse=True):
            text = text.replace(path, "<store>")
        return text if len(text) <= 500 else text[:500] + "…"

    def _row_slot(self, seqs: list[RequestState], counts: list[int]) -> torch.Tensor | None:
        if all(s.slot < 0 for s in seqs):
            return None
        slots = torch.tensor([s.slot for s in seqs], dtype=torch.int32)
        return slots.repeat_interleave(torch.tensor(counts)).to(self.device)

    def _prefill(self, seqs: list[RequestState]) -> None:
        if not seqs:
            return
        self._running.extend(seqs)
        for seq, row in self._forward(seqs, prefill=True):
            self.counters["prefill_tokens"] += len(seq.prompt_ids)
            self._accept(seq, row)

    def _decode_step(self) -> None:
        for seq in [s for s in self._running if s.handle.cancel_requested]:
            self._finish(seq, "cancelled")
        seqs = [s for s in self._running if s.completion_ids]
        if not seqs:
            return
        self.counters["decode_steps"] += 1
        self.counters["peak_decode_batch"] = max(self.counters["peak_decode_batch"], len(seqs))
        distinct = len({s.slot for s in seqs})
        self.counters["peak_decode_deltas"] = max(self.counters["peak_decode_deltas"], distinct)
        for seq, row in self._forward(seqs, prefill=False):
            self._accept(seq, row)

    def _forward(self, seqs: list[RequestState], prefill: bool) -> list[tuple[RequestState, torch.Tensor]]:
        """Logits of the next token of each sequence: one batched pass; if it raises, one pass per sequence,
        and a sequence whose own pass raises finishes with the error (the others go on)."""
        try:
            return list(zip(seqs, self._run_model(seqs, prefill), strict=True))
        except Exception as e:
            if len(seqs) == 1:
                log.exception("forward pass failed")
                self._finish(seqs[0], "error", error=f"{'prefill' if prefill else 'decode'} failed: {e}")
                return []
            log.warning("batched forward pass failed (%s); retrying its %d requests one by one", e, len(seqs))
        out = []
        for seq in seqs:
            out += self._forward([seq], prefill)
        return out

    def _run_model(self, seqs: list[RequestState], prefill: bool) -> torch.Tensor:
        if prefill:
            counts = [len(s.prompt_ids) for s in seqs]
            tokens = torch.tensor([t for s in seqs for t in s.prompt_ids], device=self.device)
            segments = [Segment(s.cache, 0, n) for s, n in zip(seqs, counts, strict=True)]
        else:
            counts = [1] * len(seqs)
            tokens = torch.tensor([s.completion_ids[-1] for s in seqs], device=self.device)
            segments = [Segment(s.cache, s.cache.length, 1) for s in seqs]
        return self.model(tokens, segments, self._row_slot(seqs, counts))

    # -- sampling and finishing -------------------------------------------------------------------------
    def _accept(self, seq: RequestState, logits: torch.Tensor) -> None:
        """Sample the next token of `seq`; finish it when EOS, a stop string or a length limit is reached.
        Any exception (sampling, detokenizing) finishes `seq` alone with an error."""
        try:
            self._sample(seq, logits)
        except Exception as e:
            log.exception("request failed while sampling")
            self._finish(seq, "error", error=f"sampling failed: {e}")

    def _sample(self, seq: RequestState, logits: torch.Tensor) -> None:
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


def max_token_bytes(tokenizer) -> int:
    """UTF-8 bytes of the longest token text (at least 4: one unknown character); a prompt longer than
    max_context times this cannot fit. Vocab strings (▁ for a space, Ġ for a byte, <0x..> fallbacks) are never
    shorter than the text they stand for, so the bound is safe for SentencePiece and byte-level BPE."""
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # noqa: BLE001 - a tokenizer without a vocab view: a generous fixed bound
        return 64
    return max([4, *(len(t.encode("utf-8", "surrogatepass")) for t in vocab)])


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
