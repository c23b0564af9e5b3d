"""The deltazip_llm request/response schema: validate Triton input arrays into a generation request.

Kept free of Triton and torch imports so the model's parsing rules are testable in-process. Errors never
echo more than a few dozen characters of what the client sent.

Over Triton's HTTP /generate, tritonserver itself turns JSON into the typed tensors before the model sees
them: an integer beyond 32 bits is wrapped into INT32 (2^32 + 5 arrives as 5), a JSON value of the wrong type
is a 500 from tritonserver's parser, and a deeply nested body crashes 2.51 (fixed upstream later). None of
that reaches this module, so Triton's HTTP binds loopback by default and the public HTTP endpoint is the
OpenAI-compatible front (deltazip/serving/openai_api.py), which bounds body size and depth and checks every
JSON type and range before anything is forwarded (over gRPC, typed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from deltazip.errors import DeltazipError, shorten

MODEL_NAME = "deltazip_llm"
INPUT_NAMES = ("text_input", "model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
               "exclude_input_in_output")  # the last one: TensorRT-LLM clients (genai-perf) send it
OUTPUT_NAMES = ("text_output", "finish_reason", "prompt_tokens", "completion_tokens")
MAX_NAME_CHARS = 128  # the pool's NAME_PATTERN allows no longer delta names
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256  # stop strings are checked on every token: keep that bounded
# temperatures besides 0 (greedy): the bounds of runtime.sampling (MIN_/MAX_TEMPERATURE); below, logits /
# temperature overflow float32 and sampling has no answer
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-2, 100.0


class BadRequest(DeltazipError):
    """One request's inputs are missing, mistyped or out of range (becomes that request's error)."""


@dataclass
class ParsedRequest:
    """A validated request: prompt, delta name (None = base), SamplingParams kwargs, stream flag."""

    prompt: str
    delta: str | None
    params: dict = field(default_factory=dict)
    stream: bool = False


def _one(name: str, array: np.ndarray) -> object:
    if array.size != 1:
        raise BadRequest(f"input '{name}' must hold exactly one value, got shape {list(array.shape)}")
    return array.reshape(-1)[0]


def _text(name: str, value: object) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(f"input '{name}' is not valid UTF-8") from None
    if isinstance(value, str):
        return value
    raise BadRequest(f"input '{name}' must be BYTES, got {type(value).__name__}")


def _int(name: str, array: np.ndarray, kinds: str = "iu") -> int:
    if array.dtype.kind not in kinds:
        raise BadRequest(f"input '{name}' must be an integer tensor, got {array.dtype}")
    return int(_one(name, array))


def _float(name: str, array: np.ndarray) -> float:
    if array.dtype.kind != "f":
        raise BadRequest(f"input '{name}' must be FP32, got {array.dtype}")
    value = float(_one(name, array))
    if not math.isfinite(value):
        raise BadRequest(f"input '{name}' must be finite, got {value}")
    return value


def _bool(name: str, array: np.ndarray) -> bool:
    if array.dtype != np.bool_:
        raise BadRequest(f"input '{name}' must be BOOL, got {array.dtype}")
    return bool(_one(name, array))


def validate_delta_name(name: str) -> str:
    """A delta name is a plain identifier: no path separators, no leading dot, at most 128 characters."""
    if (not name or len(name) > MAX_NAME_CHARS or "/" in name or "\\" in name or name.startswith(".")
            or "\x00" in name):
        raise BadRequest(f"invalid delta name {shorten(name)}: use the artifact's name (at most "
                         f"{MAX_NAME_CHARS} characters) without a path")
    return name


# optional sampling inputs: name → (parser, validity check, the rule as the error states it)
_SAMPLING_INPUTS = {
    "temperature": (_float, lambda v: v == 0 or MIN_TEMPERATURE <= v <= MAX_TEMPERATURE,
                    f"0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]"),
    "top_p": (_float, lambda v: 0 < v <= 1, "in (0, 1]"),
    "top_k": (_int, lambda v: v >= 0, ">= 0"),
    "seed": (_int, lambda v: v >= 0, ">= 0"),
}


def parse_inputs(inputs: dict[str, np.ndarray], max_tokens_limit: int) -> ParsedRequest:
    """Turn the request's input arrays (name → numpy) into a ParsedRequest; raise BadRequest on any fault."""
    unknown = sorted(set(inputs) - set(INPUT_NAMES))
    if unknown:
        raise BadRequest(f"unknown input(s) {', '.join(unknown)} (known: {', '.join(INPUT_NAMES)})")
    if "text_input" not in inputs:
        raise BadRequest("missing required input 'text_input'")
    prompt = _text("text_input", _one("text_input", inputs["text_input"]))
    if not prompt:
        raise BadRequest("input 'text_input' is empty")

    delta = None
    if "model" in inputs:
        name = _text("model", _one("model", inputs["model"]))
        delta = validate_delta_name(name) if name else None

    params: dict = {}
    if "max_tokens" in inputs:
        max_tokens = _int("max_tokens", inputs["max_tokens"])
        if not 1 <= max_tokens <= max_tokens_limit:
            hint = " (over Triton's HTTP, integers beyond INT32 arrive wrapped)" if max_tokens == 0 else ""
            raise BadRequest(f"max_tokens must be in [1, {max_tokens_limit}], got {max_tokens}{hint}")
        params["max_tokens"] = max_tokens
    for name, (parse, valid, rule) in _SAMPLING_INPUTS.items():
        if name in inputs:
            value = parse(name, inputs[name])
            if not valid(value):
                raise BadRequest(f"{name} must be {rule}, got {value}")
            params[name] = value
    if "stop" in inputs:
        values = inputs["stop"].reshape(-1)
        if values.size > MAX_STOP_STRINGS:
            raise BadRequest(f"at most {MAX_STOP_STRINGS} stop strings, got {values.size}")
        stop = [_text("stop", v) for v in values]
        if any(len(s) > MAX_STOP_CHARS for s in stop):
            raise BadRequest(f"stop strings must be at most {MAX_STOP_CHARS} characters")
        params["stop"] = [s for s in stop if s]

    if "exclude_input_in_output" in inputs:
        if not _bool("exclude_input_in_output", inputs["exclude_input_in_output"]):
            raise BadRequest("exclude_input_in_output=false is not supported (answers never echo the prompt)")
    stream = False
    if "stream" in inputs:
        stream = _bool("stream", inputs["stream"])
    return ParsedRequest(prompt=prompt, delta=delta, params=params, stream=stream)


def output_arrays(text: str, finish_reason: str, prompt_tokens: int,
                  completion_tokens: int) -> dict[str, np.ndarray]:
    """The four output tensors of one response, as numpy arrays in the config's dtypes and dims [1]."""
    return {
        "text_output": np.array([text.encode("utf-8")], dtype=np.object_),
        "finish_reason": np.array([finish_reason.encode("utf-8")], dtype=np.object_),
        "prompt_tokens": np.array([prompt_tokens], dtype=np.int32),
        "completion_tokens": np.array([completion_tokens], dtype=np.int32),
    }
