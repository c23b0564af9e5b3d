"""Request bookkeeping: the caller's handle, and the engine's per-request state from submit to result."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from deltazip.runtime.detokenizer import IncrementalDetokenizer
from deltazip.runtime.kv_cache import KVCache
from deltazip.runtime.sampling import GenerationRequest, GenerationResult

log = logging.getLogger(__name__)
TokenCallback = Callable[[str], None]


class RequestHandle:
    """The caller's side of a submitted request: wait for its result or cancel it."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._result: GenerationResult | None = None
        self.cancel_requested = False

    def result(self, timeout: float | None = None) -> GenerationResult:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request not finished after {timeout} s")
        assert self._result is not None
        return self._result

    def cancel(self) -> None:
        """Ask the engine to stop this request; it finishes with finish_reason "cancelled"."""
        self.cancel_requested = True

    def done(self) -> bool:
        return self._done.is_set()

    def _finish(self, result: GenerationResult) -> None:
        self._result = result
        self._done.set()


@dataclass(eq=False)
class RequestState:
    """Engine-side state of one request (compared by identity): tokens, text, resources held."""

    request: GenerationRequest
    prompt_ids: list[int]
    handle: RequestHandle
    on_token: TokenCallback | None
    generator: torch.Generator
    load: Future | None  # the delta's disk → host load (None: base)
    detokenizer: IncrementalDetokenizer
    cache: KVCache | None = None
    reserved_tokens: int = 0
    slot: int = -1  # -1: the base

    @property
    def completion_ids(self) -> list[int]:
        return self.detokenizer.token_ids

    def add_token(self, token: int, max_context: int) -> str | None:
        """Append a sampled (non-EOS) token and stream its text; the finish reason it causes, if any."""
        if self.detokenizer.append(token):
            return "stop"
        num_completion = len(self.completion_ids)
        if num_completion >= self.request.params.max_tokens:
            return "length"
        if len(self.prompt_ids) + num_completion >= max_context:
            return "length"
        self.stream(self.detokenizer.take_output())
        return None

    def stream(self, piece: str) -> None:
        """Pass `piece` to the caller's callback; a failing callback cancels this request only."""
        if self.on_token is None or not piece:
            return
        try:
            self.on_token(piece)
        except Exception as e:
            self.on_token = None
            self.handle.cancel_requested = True
            log.warning("token callback failed: %s", e)

    def result(self, finish_reason: str, error: str | None = None) -> GenerationResult:
        """The final result; the text not streamed yet is streamed first (unless the request failed)."""
        if finish_reason != "error":
            self.stream(self.detokenizer.flush())
        return GenerationResult(text=self.detokenizer.text, finish_reason=finish_reason,
                                prompt_tokens=len(self.prompt_ids),
                                completion_tokens=len(self.completion_ids), error=error)
