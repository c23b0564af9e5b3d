"""OpenAI wire format for the front: body bounds, field checks, prompts, error mapping, SSE chunks."""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

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


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def sampling_params(body: dict, max_context: int, chat: bool) -> dict:
    """OpenAI sampling fields → deltazip_llm parameters (validated; ApiError 400 naming the field)."""
    for name, defaults in REJECTED_UNLESS_DEFAULT.items():
        if name in body and body[name] not in defaults:
            raise ApiError(400, f"'{name}' is not supported by this server (leave it unset)", param=name,
                           code="unsupported_parameter")
    n = body.get("n", 1)
    if n is not None and (not is_int(n) or n != 1):
        raise ApiError(400, f"'n' must be 1 (one choice per request), got {n!r}", param="n")
    params: dict = {}
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    if max_tokens is not None:
        if not is_int(max_tokens):
            raise ApiError(400, f"'{key}' must be an integer, got {type(max_tokens).__name__}", param=key)
        if not 1 <= max_tokens < max_context:
            raise ApiError(400, f"'{key}' must be in [1, {max_context - 1}] (the context holds {max_context} "
                           f"tokens), got {max_tokens}", param=key)
        params["max_tokens"] = max_tokens
    for name, low, high, low_open in (("temperature", 0.0, 2.0, False), ("top_p", 0.0, 1.0, True)):
        value = body.get(name)
        if value is None:
            continue
        if not is_number(value):
            raise ApiError(400, f"'{name}' must be a number, got {type(value).__name__}", param=name)
        if (value <= low if low_open else value < low) or value > high:
            bounds = f"({low:g}, {high:g}]" if low_open else f"[{low:g}, {high:g}]"
            raise ApiError(400, f"'{name}' must be in {bounds}, got {value}", param=name)
        params[name] = float(value)
    top_k = body.get("top_k")  # a common extension (vLLM); 0 or -1 = off
    if top_k is not None:
        if not is_int(top_k) or top_k < -1:
            raise ApiError(400, f"'top_k' must be an integer >= -1, got {top_k!r}", param="top_k")
        params["top_k"] = max(top_k, 0)
    seed = body.get("seed")
    if seed is not None:
        if not is_int(seed) or not 0 <= seed < 2**63:
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


def triton_error(message: str) -> ApiError:
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


def finish_reason(reason: str) -> str:
    """The engine's finish reason as OpenAI names it."""
    return {"stop": "stop", "length": "length"}.get(reason, reason or "stop")


async def sse_events(items, first, rid: str, created: int, model: str, chat: bool, include_usage: bool,
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
                yield chunk("", finish_reason(reason))
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
