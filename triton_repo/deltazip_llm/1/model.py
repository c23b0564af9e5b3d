"""deltazip_llm: Triton Python-backend model. Parses requests and hands them to deltazip.runtime.Engine.

Decoupled: execute() returns at once; the engine's loop thread streams chunks, a small thread pool waits for
each request's result and sends the final response. One bad request gets its own error; others go on.
A request with the reserved input `control` (JSON) is a control request of the variant lifecycle
(deltazip.serving.variants): stats, refresh (a variant was added or replaced), drain (before a removal).
Per-variant metrics go to Triton's metrics endpoint (deltazip.serving.metrics).
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import triton_python_backend_utils as pb_utils

from deltazip.config import RuntimeConfig
from deltazip.runtime import Engine, GenerationRequest, RequestError, SamplingParams
from deltazip.serving.protocol import INPUT_NAMES, BadRequest, output_arrays, parse_inputs
from deltazip.serving.variants import CONTROL_INPUT
from deltazip.threads import configure_threads

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
METRICS_PERIOD_S = 1.0


def _response(text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int):
    outputs = output_arrays(text, finish_reason, prompt_tokens, completion_tokens)
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in outputs.items()])


def _error(sender, message: str) -> None:
    sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), flags=FINAL)


class TritonPythonModel:
    """One engine per model instance, started in initialize and stopped in finalize."""

    def initialize(self, args: dict) -> None:
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.runtime_config = RuntimeConfig(**json.loads(params["runtime_config"]))
        # [runtime] threads, else OMP_NUM_THREADS (the launcher sets 1), else the CPUs this process may use
        configure_threads(self.runtime_config.threads)
        self.engine = Engine.from_dirs(params["base_dir"], params["deltas_dir"], self.runtime_config)
        self.engine.start()
        # Optional: the launcher may ask for the engine's counters (swap-in times) in a JSON file.
        self.stats_path = os.environ.get("DELTAZIP_ENGINE_STATS") or None
        # Threads that wait on results; the engine itself runs in its own loop thread.
        self.waiters = ThreadPoolExecutor(max_workers=64, thread_name_prefix="deltazip-wait")
        # requests per variant ("" = base) between submit and final response; drain waits for zero
        self._lock = threading.Lock()
        self._inflight: dict[str, int] = {}
        self._draining: set[str] = set()
        self.metrics = None
        if hasattr(pb_utils, "MetricFamily"):
            from deltazip.serving.metrics import ServingMetrics

            self.metrics = ServingMetrics(pb_utils)
        self._stop = threading.Event()
        self._metrics_thread = threading.Thread(target=self._metrics_loop, name="deltazip-metrics",
                                                daemon=True)
        self._metrics_thread.start()

    # -- requests ------------------------------------------------------------------------------------------
    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            control = pb_utils.get_input_tensor_by_name(request, CONTROL_INPUT)
            if control is not None:
                self.waiters.submit(self._control, sender, control.as_numpy())
                continue
            variant, counted = None, False
            try:
                inputs = {}
                for name in INPUT_NAMES:
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    if tensor is not None:
                        inputs[name] = tensor.as_numpy()
                parsed = parse_inputs(inputs, max_tokens_limit=self.runtime_config.max_context)
                variant = parsed.delta
                self._count("requests_total", variant)
                counted = True
                gen_request = GenerationRequest(parsed.prompt, parsed.delta, SamplingParams(**parsed.params))
                started = time.perf_counter()
                first: list[float] = []
                on_token = self._on_token(sender if parsed.stream else None, first)
                self._enter(variant)
                try:
                    handle = self.engine.submit(gen_request, on_token=on_token)
                except BaseException:
                    self._leave(variant)
                    raise
            except Exception as e:  # noqa: BLE001 - any fault here is this request's error, never the others'
                if not counted:  # rejected before its variant was known: counted under the base
                    self._count("requests_total", variant)
                self._count("request_errors_total", variant)
                if not isinstance(e, BadRequest | RequestError | TypeError | ValueError):
                    pb_utils.Logger.log_error(f"deltazip_llm: request failed at submit: {e!r}")
                    e = f"request failed: {type(e).__name__}"
                _error(sender, str(e))
                continue
            self.waiters.submit(self._finish, sender, handle, parsed.stream, variant, started, first)
        return None

    def _count(self, name: str, variant: str | None) -> None:
        if self.metrics is not None:
            self.metrics.inc(name, variant)

    def _enter(self, variant: str | None) -> None:
        with self._lock:
            if variant is not None and variant in self._draining:
                raise RequestError(f"unknown delta '{variant}': it is being removed")
            key = variant or ""
            self._inflight[key] = self._inflight.get(key, 0) + 1

    def _leave(self, variant: str | None) -> None:
        with self._lock:
            key = variant or ""
            self._inflight[key] -= 1
            if not self._inflight[key]:
                del self._inflight[key]

    def _on_token(self, sender, first: list[float]):
        def on_token(chunk: str) -> None:
            if not first:
                first.append(time.perf_counter())
            if sender is not None and chunk:
                sender.send(_response(chunk, "", 0, 0))
        return on_token

    def _finish(self, sender, handle, streamed: bool, variant: str | None, started: float,
                first: list[float]) -> None:
        result = None
        try:
            result = handle.result()
            self._send_result(sender, result, streamed)
        except Exception as e:  # noqa: BLE001 - any failure is this request's error only; the rest go on
            pb_utils.Logger.log_error(f"deltazip_llm: request failed: {e!r}")
            _error(sender, f"generation failed: {e}")
        finally:
            self._leave(variant)
            if self.metrics is not None:
                now = time.perf_counter()
                error = result is None or result.finish_reason == "error"
                if result is not None and result.completion_tokens and result.finish_reason != "error":
                    self.metrics.first_token(variant, (first[0] if first else now) - started)
                self.metrics.request_finished(
                    variant, error, result.prompt_tokens if result else 0,
                    result.completion_tokens if result else 0, now - started)

    def _send_result(self, sender, result, streamed: bool) -> None:
        if result.finish_reason == "error":
            _error(sender, result.error or "generation failed")
            return
        text = "" if streamed else result.text
        if self.stats_path:
            self._write_stats()
        sender.send(_response(text, result.finish_reason, result.prompt_tokens, result.completion_tokens),
                    flags=FINAL)

    def _write_stats(self) -> None:
        # one temp file per waiter thread: two results finishing at once must not replace each other's file
        tmp = f"{self.stats_path}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(self.engine.stats(), f)
            os.replace(tmp, self.stats_path)  # readers see the whole file or the previous one
        except OSError as e:  # the stats file is a diagnostic: it never fails the request
            pb_utils.Logger.log_warn(f"deltazip_llm: cannot write engine stats: {e!r}")

    # -- control requests (variant lifecycle) -----------------------------------------------------------
    def _control(self, sender, array) -> None:
        try:
            raw = array.reshape(-1)[0]
            body = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
            if not isinstance(body, dict):
                raise BadRequest("control body must be a JSON object")
            op = body.get("op")
            handler = {"stats": self._stats, "refresh": self._refresh, "drain": self._drain}.get(op)
            if handler is None:
                raise BadRequest(f"unknown control op {op!r} (known: stats, refresh, drain)")
            answer = handler(body)
            sender.send(_response(json.dumps(answer), "control", 0, 0), flags=FINAL)
        except Exception as e:  # noqa: BLE001 - a failed control request is answered, the model goes on
            _error(sender, str(e) if isinstance(e, BadRequest | RequestError) else f"control failed: {e}")

    def _name(self, body: dict) -> str:
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest("control request needs a variant 'name'")
        return name

    def _stats(self, body: dict) -> dict:
        pool = self.engine.pool
        with self._lock:
            inflight = dict(self._inflight)
        return {"engine": self.engine.stats(), "resident": pool.resident(), "host": pool.host_resident(),
                "variant_bytes": pool.variant_bytes(), "inflight": inflight, "names": pool.names()}

    def _refresh(self, body: dict) -> dict:
        """NAME was added or replaced in the store: retire old versions, warm the new one (host tier)."""
        name = self._name(body)
        pool = self.engine.pool
        with self._lock:
            self._draining.discard(name)
            pool.unblock(name)
        retired = pool.retire(name, timeout_s=float(body.get("timeout_s", 30.0)))
        loaded_ms = None
        if name in pool.names():
            started = time.perf_counter()
            pool.prefetch(name).result(timeout=float(body.get("timeout_s", 30.0)))
            loaded_ms = (time.perf_counter() - started) * 1e3
        self._refresh_metrics()
        return {"name": name, "retired_versions": retired, "host_load_ms": loaded_ms}

    def _drain(self, body: dict) -> dict:
        """Before NAME is removed: refuse new requests, wait for in-flight ones, free slot and host copy."""
        name = self._name(body)
        timeout_s = float(body.get("timeout_s", 30.0))
        pool = self.engine.pool
        with self._lock:
            self._draining.add(name)
            pool.block(name)
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                busy = self._inflight.get(name, 0)
            if not busy and pool.evict(name):
                break
            if time.monotonic() >= deadline:
                with self._lock:
                    self._draining.discard(name)
                    pool.unblock(name)
                raise RequestError(f"variant '{name}' is in use by {max(busy, 1)} request(s) after "
                                   f"{timeout_s:g} s; not removed (retry, or wait longer)")
            time.sleep(0.005)
        self._refresh_metrics()
        return {"name": name, "drained": True}

    # -- metrics -----------------------------------------------------------------------------------------
    def _refresh_metrics(self) -> None:
        if self.metrics is None:
            return
        pool = self.engine.pool
        with self._lock:
            inflight = dict(self._inflight)
        self.metrics.refresh(self.engine.stats(), pool.variant_bytes(), inflight, pool.names())

    def _metrics_loop(self) -> None:
        while not self._stop.wait(METRICS_PERIOD_S):
            try:
                self._refresh_metrics()
            except Exception as e:  # noqa: BLE001 - metrics never take the model down
                pb_utils.Logger.log_warn(f"deltazip_llm: metrics refresh failed: {e!r}")

    def finalize(self) -> None:
        self._stop.set()
        self.engine.stop()
        self.waiters.shutdown(wait=True, cancel_futures=True)
