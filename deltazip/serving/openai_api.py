"""The OpenAI-compatible front: a thin FastAPI app beside tritonserver that forwards over gRPC streaming.

No second engine: every completion is one request to deltazip_llm on one persistent gRPC bidirectional
stream (tritonclient.grpc.aio), its responses picked out by request id. Endpoints (docs/serving.md has
the full contract):

  GET  /v1/models                       the base and every variant (owner, ratio, bits, bytes, resident)
  POST /v1/completions                  prompt → text; stream=true: server-sent events, then `data: [DONE]`
  POST /v1/chat/completions             messages → the tokenizer's chat template (fallback: contents joined
                                        by newlines) → text
  GET  /v1/variants                     the store's variants (name, version, path, bits, ratio, resident)
  POST /v1/variants/load                {"name", "path"}: verify and install (or replace) a variant live
  POST /v1/variants/unload              {"name", "timeout_s"?}: drain in-flight requests, free it, delete it
  POST /v1/load_lora_adapter            vLLM-compatible alias: {"lora_name", "lora_path"}
  POST /v1/unload_lora_adapter          vLLM-compatible alias: {"lora_name"}
  GET  /health                          200 when tritonserver's model is ready

Errors use OpenAI's JSON ({"error": {"message", "type", "param", "code"}}): 400 bad parameter or malformed
JSON, 404 unknown model, 409 variant in use, 413 body too large or prompt too long, 503 overloaded.
Bodies larger than `max_body_bytes` or nested deeper than `max_json_depth` are refused here, before
anything reaches tritonserver (its own HTTP endpoint crashes on very deep JSON; keep it on loopback).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request  # module level: FastAPI resolves the handlers' (string) annotations here

from deltazip.errors import DeltazipError
from deltazip.serving.protocol import MODEL_NAME
from deltazip.serving.variants import (
    VariantError,
    check_variant_name,
    control,
    delete_dirs,
    install_variant,
    list_variants,
    unlink_variant,
    variant_info,
)

MAX_BODY_BYTES = 1 << 20
MAX_JSON_DEPTH = 32
MAX_STOP = 4
OWNER = "deltazip"

# OpenAI fields that would change the answer and are not implemented: refused unless at their default.
REJECTED_UNLESS_DEFAULT = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "tools": (None, []), "tool_choice": (None, "none", "auto"),
    "functions": (None, []), "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
}
# everything else that is not a field we use (user, metadata, store, service_tier, …) is ignored


class ApiError(Exception):
    """One request's error, as OpenAI reports it."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code if self.code is not None else self.status}}


@dataclass
class FrontSettings:
    """What the front needs to know about the build it serves."""

    grpc_url: str
    store: Path
    base_dir: Path
    base_id: str
    base_fingerprint: str
    max_context: int
    max_pending: int = 256
    max_body_bytes: int = MAX_BODY_BYTES
    max_json_depth: int = MAX_JSON_DEPTH
    request_timeout_s: float = 600.0
    drain_timeout_s: float = 30.0
    aliases: tuple[str, ...] = field(default_factory=tuple)  # more names of the base model
    # variant load/unload: loopback clients only, unless they send "Authorization: Bearer <admin_token>"
    admin_token: str | None = field(default_factory=lambda: os.environ.get("DELTAZIP_ADMIN_TOKEN") or None)

    @classmethod
    def from_build(cls, build_dir: str | Path, grpc_url: str, **overrides) -> FrontSettings:
        from deltazip.builder.build import load_build

        build = load_build(Path(build_dir))
        base = str(build["inputs"]["base"])
        base_id = Path(base).name if "/" in base else base
        return cls(grpc_url=grpc_url, store=Path(build["inputs"]["deltas_dir"]),
                   base_dir=Path(build["inputs"]["base_dir"]), base_id=base_id,
                   base_fingerprint=build["base_fingerprint"],
                   max_context=int(build["settings"]["runtime"]["max_context"]),
                   aliases=tuple({base} - {base_id}), **overrides)


# -- request parsing ------------------------------------------------------------------------------------
def _depth_ok(value, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return False
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return True


async def read_json(request, settings: FrontSettings) -> dict:
    """The body as a JSON object; 413 when larger than the limit (checked before reading), 400 when
    malformed or nested deeper than the limit."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(400, "Content-Length is not a number") from None
        if size > settings.max_body_bytes:
            raise ApiError(413, f"request body is {size} bytes; the limit is {settings.max_body_bytes}",
                           code="body_too_large")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > settings.max_body_bytes:
            raise ApiError(413, f"request body exceeds {settings.max_body_bytes} bytes",
                           code="body_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw)
    except RecursionError:
        raise ApiError(400, f"JSON body is nested too deeply (limit {settings.max_json_depth})",
                       code="json_too_deep") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON body: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "JSON body must be an object")
    if not _depth_ok(body, settings.max_json_depth):
        raise ApiError(400, f"JSON body is nested too deeply (limit {settings.max_json_depth})",
                       code="json_too_deep")
    return body


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def sampling_params(body: dict, max_context: int, chat: bool) -> dict:
    """OpenAI sampling fields → deltazip_llm parameters (validated; ApiError 400 naming the field)."""
    for name, defaults in REJECTED_UNLESS_DEFAULT.items():
        if name in body and body[name] not in defaults:
            raise ApiError(400, f"'{name}' is not supported by this server (leave it unset)", param=name,
                           code="unsupported_parameter")
    n = body.get("n", 1)
    if n is not None and (not _is_int(n) or n != 1):
        raise ApiError(400, f"'n' must be 1 (one choice per request), got {n!r}", param="n")
    params: dict = {}
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    if max_tokens is not None:
        if not _is_int(max_tokens):
            raise ApiError(400, f"'{key}' must be an integer, got {type(max_tokens).__name__}", param=key)
        if not 1 <= max_tokens < max_context:
            raise ApiError(400, f"'{key}' must be in [1, {max_context - 1}] (the context holds {max_context} "
                           f"tokens), got {max_tokens}", param=key)
        params["max_tokens"] = max_tokens
    for name, low, high, low_open in (("temperature", 0.0, 2.0, False), ("top_p", 0.0, 1.0, True)):
        value = body.get(name)
        if value is None:
            continue
        if not _is_number(value):
            raise ApiError(400, f"'{name}' must be a number, got {type(value).__name__}", param=name)
        if (value <= low if low_open else value < low) or value > high:
            bounds = f"({low:g}, {high:g}]" if low_open else f"[{low:g}, {high:g}]"
            raise ApiError(400, f"'{name}' must be in {bounds}, got {value}", param=name)
        params[name] = float(value)
    top_k = body.get("top_k")  # a common extension (vLLM); 0 or -1 = off
    if top_k is not None:
        if not _is_int(top_k) or top_k < -1:
            raise ApiError(400, f"'top_k' must be an integer >= -1, got {top_k!r}", param="top_k")
        params["top_k"] = max(top_k, 0)
    seed = body.get("seed")
    if seed is not None:
        if not _is_int(seed) or not 0 <= seed < 2**63:
            raise ApiError(400, f"'seed' must be an integer in [0, 2^63), got {seed!r}", param="seed")
        params["seed"] = seed
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ApiError(400, "'stop' must be a string or a list of strings", param="stop")
        if len(stops) > MAX_STOP:
            raise ApiError(400, f"'stop' holds at most {MAX_STOP} strings, got {len(stops)}", param="stop")
        if any(stops):
            params["stop"] = [s for s in stops if s]
    return params


def completion_prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):
        raise ApiError(400, "'prompt' must be one string (a batch of prompts or token ids is not supported)",
                       param="prompt")
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' is required and must be a string", param="prompt")
    if not prompt:
        raise ApiError(400, "'prompt' is empty", param="prompt")
    return prompt


def chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' is required and must be a non-empty list", param="messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a string 'role'", param="messages")
        if message["role"] not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}].role {message['role']!r} is not supported (system, "
                           "developer, user, assistant)", param="messages")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text
            parts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text"
                        and isinstance(part.get("text"), str)):
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                                   param="messages")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", param="messages")
        out.append({"role": "system" if message["role"] == "developer" else message["role"],
                    "content": content})
    return out


class ChatPrompter:
    """messages → prompt text: the base tokenizer's chat template, else the documented fallback (the
    messages' contents joined by newlines). The tokenizer is loaded on first use."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self._lock = threading.Lock()
        self._tokenizer = None
        self._loaded = False

    def _get(self):
        with self._lock:
            if not self._loaded:
                try:
                    from transformers import AutoTokenizer

                    self._tokenizer = AutoTokenizer.from_pretrained(str(self.base_dir))
                except Exception:  # noqa: BLE001 - no tokenizer: the fallback format
                    self._tokenizer = None
                self._loaded = True
            return self._tokenizer

    def __call__(self, messages: list[dict]) -> str:
        tokenizer = self._get()
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            try:
                return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as e:  # noqa: BLE001 - a template that rejects these messages
                raise ApiError(400, f"the chat template rejected these messages: {e}",
                               param="messages") from None
        return "\n".join(m["content"] for m in messages)


def _triton_error(message: str) -> ApiError:
    """deltazip_llm's error text → the OpenAI status."""
    lower = message.lower()
    if "context holds" in lower:
        return ApiError(413, message, param="prompt", code="context_length_exceeded")
    if "unknown delta" in lower:
        return ApiError(404, message, param="model", code="model_not_found")
    if "unavailable" in lower or "failed to connect" in lower or "connection refused" in lower:
        return ApiError(503, f"tritonserver is not reachable: {message}", kind="server_error",
                        code="unavailable")
    if any(s in lower for s in ("must be", "invalid", "is empty", "not valid utf-8", "not supported")):
        return ApiError(400, message)
    return ApiError(500, message, kind="server_error", code="generation_failed")


# -- forwarding ---------------------------------------------------------------------------------------------
class _Stream:
    """One live gRPC bidirectional stream: an outgoing queue and the per-request queues of its responses."""

    def __init__(self, client) -> None:
        self.outgoing: asyncio.Queue = asyncio.Queue()
        self.pending: dict[str, asyncio.Queue] = {}
        self.call = client.stream_infer(self._requests())
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _requests(self):
        while True:
            item = await self.outgoing.get()
            if item is None:
                return
            yield item

    async def _read(self) -> None:
        error: BaseException = ConnectionError("the gRPC stream to tritonserver closed")
        try:
            # raw ModelStreamInferResponse messages: an error response still carries its request's id
            async for response in self.call._grpc_call:
                queue = self.pending.get(response.infer_response.id)
                if queue is not None:
                    queue.put_nowait(response)
        except BaseException as e:  # noqa: BLE001 - the stream died: every pending request fails with it
            error = e
        for queue in self.pending.values():
            queue.put_nowait(error)

    def alive(self) -> bool:
        return not self.reader.done()

    def close(self) -> None:
        self.outgoing.put_nowait(None)
        self.call.cancel()


class TritonForwarder:
    """Forwards requests to deltazip_llm over ONE persistent gRPC bidirectional stream (one aio channel):
    requests go out tagged with a request id, responses are handed to their request by that id. (A stream
    per request costs more CPU than the rest of the front together.) A dropped stream fails the requests
    on it and the next request opens a new one. A client that disconnects stops reading; its request runs
    to its end (max_tokens) in the engine and its responses are dropped."""

    def __init__(self, grpc_url: str, timeout_s: float) -> None:
        self.grpc_url, self.timeout_s = grpc_url, timeout_s
        self._client = None
        self._stream: _Stream | None = None

    async def start(self) -> None:
        import tritonclient.grpc.aio as grpcaio

        self._client = grpcaio.InferenceServerClient(self.grpc_url)

    async def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        if self._client is not None:
            await self._client.close()

    def _live_stream(self) -> _Stream:
        if self._stream is None or not self._stream.alive():
            self._stream = _Stream(self._client)
        return self._stream

    async def responses(self, prompt: str, delta: str, stream: bool, params: dict):
        """Async iterator of (text, finish_reason, prompt_tokens, completion_tokens); ApiError on an error.
        The last item has a finish_reason."""
        from tritonclient.grpc import InferResult

        from deltazip.serving.client import grpc_inputs

        rid = uuid.uuid4().hex
        live = self._live_stream()
        queue: asyncio.Queue = asyncio.Queue()
        live.pending[rid] = queue
        inputs = grpc_inputs(prompt, delta, stream, params)
        live.outgoing.put_nowait({"model_name": MODEL_NAME, "inputs": inputs, "request_id": rid})
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), self.timeout_s)
                except TimeoutError:
                    raise ApiError(504, f"no response from tritonserver within {self.timeout_s:.0f} s",
                                   kind="server_error", code="timeout") from None
                if isinstance(item, BaseException):
                    details = item.details() if hasattr(item, "details") else str(item)
                    raise _triton_error(f"unavailable: {details}")
                if item.error_message:
                    raise _triton_error(item.error_message)
                result = InferResult(item.infer_response)
                text = _first(result, "text_output") or ""
                reason = _first(result, "finish_reason") or ""
                if reason:
                    yield (text, reason, int(_first(result, "prompt_tokens") or 0),
                           int(_first(result, "completion_tokens") or 0))
                    return
                yield text, "", 0, 0
        finally:
            live.pending.pop(rid, None)


def _first(result, name: str):
    array = result.as_numpy(name)
    if array is None or array.size == 0:
        return None
    value = array.reshape(-1)[0]
    return value.decode() if isinstance(value, bytes) else value


# -- the app ------------------------------------------------------------------------------------------------
def create_app(settings: FrontSettings):
    """The FastAPI app of the front (started by OpenAIFront or any ASGI server)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    forwarder = TritonForwarder(settings.grpc_url, settings.request_timeout_s)
    prompter = ChatPrompter(settings.base_dir)
    state = {"pending": 0}
    lifecycle = threading.Lock()  # one add/remove at a time

    @asynccontextmanager
    async def lifespan(app):
        await forwarder.start()
        try:
            yield
        finally:
            await forwarder.close()

    app = FastAPI(title="deltazip OpenAI-compatible API", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)

    def error_response(e: ApiError) -> Response:
        return Response(json.dumps(e.body()), status_code=e.status, media_type="application/json")

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_response(e)

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):  # a bug: still OpenAI's JSON, one line
        return error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error",
                                       code="internal_error"))

    @app.exception_handler(404)
    async def _not_found(request, e):
        return error_response(ApiError(404, f"no route {request.method} {request.url.path}",
                                       code="not_found"))

    @app.exception_handler(405)
    async def _method(request, e):
        return error_response(ApiError(405, f"method {request.method} not allowed on {request.url.path}",
                                       code="method_not_allowed"))

    def resolve_model(body: dict) -> tuple[str, str]:
        """(model id as given, delta name for deltazip_llm: "" = base)."""
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "'model' is required: the base's name or a variant's", param="model")
        if model == settings.base_id or model in settings.aliases:
            return model, ""
        try:
            check_variant_name(model)
        except VariantError:
            raise ApiError(404, f"The model '{model}' does not exist", param="model",
                           code="model_not_found") from None
        if not (settings.store / f"{model}.dz" / "manifest.json").is_file():
            known = [settings.base_id, *(v.name for v in list_variants(settings.store))]
            raise ApiError(404, f"The model '{model}' does not exist (known: {', '.join(known)})",
                           param="model", code="model_not_found")
        return model, model

    def authorize(request) -> None:
        """Variant lifecycle: a loopback client, or the admin token (a front exposed with --openai-host
        0.0.0.0 serves completions to everyone, but loads and unloads only for whoever holds the token)."""
        header = request.headers.get("authorization", "")
        if settings.admin_token and hmac.compare_digest(header, f"Bearer {settings.admin_token}"):
            return
        host = request.client.host if request.client else ""
        if host in ("127.0.0.1", "::1", "localhost", "testclient") and not settings.admin_token:
            return
        raise ApiError(403, "variant load/unload needs a loopback client, or 'Authorization: Bearer <token>' "
                       "with the server's DELTAZIP_ADMIN_TOKEN", kind="permission_error", code="forbidden")

    def admit() -> None:
        if state["pending"] >= settings.max_pending:
            raise ApiError(503, f"server overloaded: {state['pending']} requests in flight (limit "
                           f"{settings.max_pending}); retry later", kind="server_error", code="overloaded")
        state["pending"] += 1

    async def generate(request: Request, chat: bool):
        body = await read_json(request, settings)
        model, delta = resolve_model(body)
        params = sampling_params(body, settings.max_context, chat)
        stream = body.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise ApiError(400, "'stream' must be a boolean", param="stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise ApiError(400, "'stream_options' must be an object", param="stream_options")
        include_usage = bool(options.get("include_usage", False))
        prompt = prompter(chat_messages(body)) if chat else completion_prompt(body)
        admit()
        created = int(time.time())
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        items = forwarder.responses(prompt, delta, stream, params)
        if not stream:
            try:
                pieces, last = [], None
                async for last in items:
                    pieces.append(last[0])
            finally:
                state["pending"] -= 1
            _, reason, prompt_tokens, completion_tokens = last
            text = "".join(pieces)
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                     "total_tokens": prompt_tokens + completion_tokens}
            choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                       "logprobs": None, "finish_reason": _reason(reason)} if chat else
                      {"index": 0, "text": text, "logprobs": None, "finish_reason": _reason(reason)})
            out = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                   "model": model, "choices": [choice], "usage": usage}
            return Response(json.dumps(out), media_type="application/json")
        # streaming: wait for the first response so that errors still get their status code
        try:
            first = await items.__anext__()
        except BaseException:
            state["pending"] -= 1
            raise
        return StreamingResponse(_sse(items, first, rid, created, model, chat, include_usage, state),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    async def stats() -> dict | None:
        try:
            return await asyncio.to_thread(control, settings.grpc_url, "stats", 10.0)
        except DeltazipError:
            return None

    @app.get("/v1/models")
    async def models():
        variants = await asyncio.to_thread(list_variants, settings.store)
        current = await stats()
        resident = set((current or {}).get("resident", {}))
        data = [{"id": settings.base_id, "object": "model", "created": 0, "owned_by": OWNER,
                 "root": settings.base_id, "parent": None, "kind": "base", "resident": True,
                 "ratio": None, "bits": None, "bytes": None}]
        for v in variants:
            data.append({"id": v.name, "object": "model", "created": v.created, "owned_by": OWNER,
                         "root": settings.base_id, "parent": settings.base_id, "kind": "variant",
                         "resident": (v.name in resident) if current is not None else None,
                         "ratio": v.ratio, "bits": v.bits, "bytes": v.bytes, "version": v.version})
        return JSONResponse({"object": "list", "data": data})

    @app.get("/v1/variants")
    async def variants():
        infos = await asyncio.to_thread(list_variants, settings.store)
        current = await stats() or {}
        held = current.get("variant_bytes", {})
        return JSONResponse({"object": "list", "base": settings.base_id, "data": [
            {**v.to_dict(), "resident": v.name in current.get("resident", {}),
             "device_bytes": held.get(v.name, {}).get("device", 0),
             "host_bytes": held.get(v.name, {}).get("host", 0)} for v in infos]})

    def add(name, path) -> dict:
        if not isinstance(name, str) or not isinstance(path, str) or not path:
            raise ApiError(400, "'name' and 'path' (an artifact directory on the server) are required "
                           "strings")
        started = time.perf_counter()
        with lifecycle:
            replaced = (settings.store / f"{name}.dz").exists()
            try:
                info, old = install_variant(settings.store, name, Path(path), settings.base_fingerprint,
                                            reserved=(settings.base_id, *settings.aliases))
            except VariantError as e:
                raise ApiError(e.status, str(e), param="path" if e.status == 400 else "name") from None
            except OSError as e:
                raise ApiError(400, f"cannot read {path}: {e.strerror or e}", param="path") from None
            try:
                control(settings.grpc_url, "refresh", settings.request_timeout_s, name=name)
            except DeltazipError as e:
                raise ApiError(500, f"variant installed but the model did not take it: {e}",
                               kind="server_error") from None
            delete_dirs(old)
        return {**info.to_dict(), "replaced": replaced, "seconds": round(time.perf_counter() - started, 4)}

    def remove(name, timeout_s) -> dict:
        if not isinstance(name, str):
            raise ApiError(400, "'name' is required and must be a string", param="name")
        if timeout_s is None:
            timeout_s = settings.drain_timeout_s
        if not _is_number(timeout_s) or not 0 <= timeout_s <= 3600:
            raise ApiError(400, "'timeout_s' must be a number of seconds in [0, 3600]", param="timeout_s")
        started = time.perf_counter()
        with lifecycle:
            try:
                check_variant_name(name)
                info = variant_info(settings.store, name)
            except VariantError as e:
                raise ApiError(404 if e.status == 404 else 400, str(e), param="name") from None
            try:
                control(settings.grpc_url, "drain", float(timeout_s) + 30, name=name, timeout_s=timeout_s)
            except DeltazipError as e:
                status = 409 if "in use" in str(e) else 500
                raise ApiError(status, str(e), param="name", code="variant_in_use" if status == 409 else None,
                               kind="invalid_request_error" if status == 409 else "server_error") from None
            delete_dirs(unlink_variant(settings.store, name))
        return {"name": name, "removed": True, "version": info.version,
                "seconds": round(time.perf_counter() - started, 4)}

    @app.post("/v1/variants/load")
    async def variants_load(request: Request):
        authorize(request)
        body = await read_json(request, settings)
        return JSONResponse(await asyncio.to_thread(add, body.get("name"), body.get("path")))

    @app.post("/v1/variants/unload")
    async def variants_unload(request: Request):
        authorize(request)
        body = await read_json(request, settings)
        return JSONResponse(await asyncio.to_thread(remove, body.get("name"), body.get("timeout_s")))

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        authorize(request)
        body = await read_json(request, settings)
        result = await asyncio.to_thread(add, body.get("lora_name"), body.get("lora_path"))
        return Response(f"Success: variant {result['name']} added.", media_type="text/plain")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        authorize(request)
        body = await read_json(request, settings)
        result = await asyncio.to_thread(remove, body.get("lora_name"), body.get("timeout_s"))
        return Response(f"Success: variant {result['name']} removed.", media_type="text/plain")

    @app.get("/health")
    async def health():
        current = await stats()
        if current is None:
            raise ApiError(503, "tritonserver's deltazip_llm is not answering", kind="server_error",
                           code="unavailable")
        return JSONResponse({"status": "ok"})

    return app


def _reason(reason: str) -> str:
    return {"stop": "stop", "length": "length"}.get(reason, reason or "stop")


async def _sse(items, first, rid: str, created: int, model: str, chat: bool, include_usage: bool,
               state: dict):
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def event(choices: list, **extra) -> bytes:
        payload = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices, **extra}
        return b"data: " + json.dumps(payload).encode() + b"\n\n"

    def chunk(text: str, reason: str | None) -> bytes:
        if chat:
            delta = {"content": text} if text else {}
            return event([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}])
        return event([{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}])

    try:
        if chat:
            yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        item = first
        while True:
            text, reason, prompt_tokens, completion_tokens = item
            if text:
                yield chunk(text, None)
            if reason:
                yield chunk("", _reason(reason))
                if include_usage:
                    yield event([], usage={"prompt_tokens": prompt_tokens,
                                           "completion_tokens": completion_tokens,
                                           "total_tokens": prompt_tokens + completion_tokens})
                break
            try:
                item = await items.__anext__()
            except StopAsyncIteration:
                break
        yield b"data: [DONE]\n\n"
    except ApiError as e:  # after the first byte the status is sent: the error travels as an event
        yield b"data: " + json.dumps(e.body()).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"
    finally:
        state["pending"] -= 1
        await items.aclose()


# -- running it beside tritonserver -------------------------------------------------------------------------
class OpenAIFront:
    """The front in a background thread (uvicorn on a socket bound here: port 0 = a free port)."""

    def __init__(self, settings: FrontSettings, host: str = "127.0.0.1", port: int = 0) -> None:
        self.settings, self.host, self.port = settings, host, port
        self._server = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def start(self, ready_timeout_s: float = 30.0) -> OpenAIFront:
        import uvicorn

        # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only for TCP-proto
        # sockets; without it every response (headers, then body) waits ~40 ms for a delayed ACK
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as e:
            sock.close()
            raise DeltazipError(f"port {self.port} on {self.host} is not available (--openai-port): "
                                f"{e.strerror}") from None
        self.port = sock.getsockname()[1]
        self._socket = sock
        config = uvicorn.Config(create_app(self.settings), log_level="warning", access_log=False,
                                lifespan="on", timeout_graceful_shutdown=5, timeout_keep_alive=30)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="deltazip-openai", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + ready_timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise DeltazipError(f"the OpenAI front did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> OpenAIFront:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
