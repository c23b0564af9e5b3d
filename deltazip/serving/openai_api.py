"""The OpenAI-compatible front: a thin FastAPI app beside tritonserver that forwards over gRPC streaming.

No second engine: every completion is one request to deltazip_llm on one persistent gRPC bidirectional
stream (tritonclient.grpc.aio, see forwarder.py), its responses picked out by request id. Endpoints:
/v1/models, /v1/completions, /v1/chat/completions (SSE when stream=true), /v1/variants[/load|/unload] and
the vLLM aliases /v1/load_lora_adapter, /v1/unload_lora_adapter, /health; docs/serving.md has the contract.
Errors use OpenAI's JSON; bodies too large or too deeply nested are refused before tritonserver sees them
(its own HTTP endpoint crashes on very deep JSON; keep it on loopback). Parsing lives in openai_requests.py.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import threading
import time
import uuid
from pathlib import Path

from fastapi import Request  # module level: FastAPI resolves the handlers' (string) annotations here

from deltazip.errors import DeltazipError
from deltazip.serving.forwarder import TritonForwarder
from deltazip.serving.openai_requests import (
    OWNER,
    ApiError,
    ChatPrompter,
    FrontSettings,
    chat_messages,
    completion_prompt,
    finish_reason,
    is_number,
    read_json,
    sampling_params,
    sse_events,
)
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
                       "logprobs": None, "finish_reason": finish_reason(reason)} if chat else
                      {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(reason)})
            out = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                   "model": model, "choices": [choice], "usage": usage}
            return Response(json.dumps(out), media_type="application/json")
        # streaming: wait for the first response so that errors still get their status code
        try:
            first = await items.__anext__()
        except BaseException:
            state["pending"] -= 1
            raise
        return StreamingResponse(sse_events(items, first, rid, created, model, chat, include_usage, state),
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
        if not is_number(timeout_s) or not 0 <= timeout_s <= 3600:
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
