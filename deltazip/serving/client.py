"""Clients for the deltazip_llm model: gRPC (tritonclient, bidirectional stream) and HTTP (generate).

Decoupled models accept only the gRPC stream and HTTP /generate[_stream] (HTTP /infer rejects them), so
every request here goes through those, with `stream` deciding whether text arrives in chunks.
"""

from __future__ import annotations

import json
import queue
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from deltazip.errors import DeltazipError
from deltazip.serving.protocol import MODEL_NAME


class ClientError(DeltazipError):
    """The server answered a request with an error (or could not be reached)."""


@dataclass
class Completion:
    """One request's answer as seen by a client."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    chunks: list[str] = field(default_factory=list)  # text of each streamed response, in arrival order


def _params(max_tokens: int | None, temperature: float | None, top_p: float | None, top_k: int | None,
            seed: int | None, stop: list[str] | None) -> dict:
    values = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k,
              "seed": seed, "stop": list(stop) if stop else None}
    # the model's inputs are INT32 (UINT64 for seed): tritonserver would wrap a larger value silently (HTTP)
    for name, (low, high) in _INT_RANGES.items():
        value = values[name]
        if value is not None and not low <= value <= high:
            raise ClientError(f"{name} must be in [{low}, {high}], got {value}")
    return {k: v for k, v in values.items() if v is not None}


_INT_RANGES = {"max_tokens": (-2**31, 2**31 - 1), "top_k": (-2**31, 2**31 - 1), "seed": (0, 2**64 - 1)}


_GRPC_TYPES = {
    "max_tokens": ("INT32", np.int32), "temperature": ("FP32", np.float32), "top_p": ("FP32", np.float32),
    "top_k": ("INT32", np.int32), "seed": ("UINT64", np.uint64),
}


def grpc_inputs(prompt: str, model: str, stream: bool, params: dict) -> list:
    """tritonclient.grpc InferInputs for one request."""
    import tritonclient.grpc as grpcclient

    def tensor(name: str, datatype: str, array: np.ndarray):
        t = grpcclient.InferInput(name, list(array.shape), datatype)
        t.set_data_from_numpy(array)
        return t

    inputs = [
        tensor("text_input", "BYTES", np.array([prompt.encode()], dtype=np.object_)),
        tensor("model", "BYTES", np.array([model.encode()], dtype=np.object_)),
        tensor("stream", "BOOL", np.array([stream], dtype=np.bool_)),
    ]
    for name, value in params.items():
        if name == "stop":
            inputs.append(tensor("stop", "BYTES", np.array([s.encode() for s in value], dtype=np.object_)))
        else:
            datatype, dtype = _GRPC_TYPES[name]
            inputs.append(tensor(name, datatype, np.array([value], dtype=dtype)))
    return inputs


def first_output(result, name: str):
    """The first element of a response's output tensor, decoded to str; None where it is absent."""
    array = result.as_numpy(name)
    if array is None or array.size == 0:
        return None
    value = array.reshape(-1)[0]
    return value.decode() if isinstance(value, bytes) else value


def generate_grpc(url: str, prompt: str, model: str = "", stream: bool = True,
                  on_chunk: Callable[[str], None] | None = None, timeout_s: float = 120.0,
                  max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                  top_k: int | None = None, seed: int | None = None,
                  stop: list[str] | None = None) -> Completion:
    """Send one request over a gRPC stream and collect its responses until the final one."""
    params = _params(max_tokens, temperature, top_p, top_k, seed, stop)
    return stream_request(url, grpc_inputs(prompt, model, stream, params), on_chunk, timeout_s)


def stream_request(url: str, inputs: list, on_chunk: Callable[[str], None] | None = None,
                   timeout_s: float = 120.0) -> Completion:
    """Send prepared gRPC InferInputs on a fresh stream; collect the Completion (ClientError on error)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    finished = False
    try:
        # tritonclient calls the callback with keyword arguments (result=..., error=...).
        client.start_stream(callback=lambda result=None, error=None: responses.put((result, error)))
        client.async_stream_infer(MODEL_NAME, inputs, request_id=uuid.uuid4().hex,
                                  enable_empty_final_response=True)
        chunks: list[str] = []
        done = Completion("", "", 0, 0, chunks)
        while True:
            try:
                result, error = responses.get(timeout=timeout_s)
            except queue.Empty:
                raise ClientError(f"no response from {url} within {timeout_s:.0f} s") from None
            if error is not None:
                finished = True  # an error response is the request's last one
                raise ClientError(error.message() if hasattr(error, "message") else str(error))
            response = result.get_response()
            text = first_output(result, "text_output")
            if text:
                chunks.append(text)
                if on_chunk is not None:
                    on_chunk(text)
            reason = first_output(result, "finish_reason")
            if reason:
                done.finish_reason = reason
                done.prompt_tokens = int(first_output(result, "prompt_tokens"))
                done.completion_tokens = int(first_output(result, "completion_tokens"))
            if response.parameters["triton_final_response"].bool_param:
                finished = True
                break
        done.text = "".join(chunks)
        return done
    except InferenceServerException as e:
        raise ClientError(f"gRPC {url}: {e.message()}") from None
    finally:
        try:
            client.stop_stream(cancel_requests=not finished)
        finally:
            client.close()


def _post(url: str, body: dict, timeout_s: float):
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("error", str(e))
        except (ValueError, AttributeError):
            message = str(e)
        raise ClientError(message) from None
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        raise ClientError(f"cannot reach {url}: {getattr(e, 'reason', e)}") from None


def _completion_fields(event: dict, done: Completion) -> None:
    if event.get("finish_reason"):
        done.finish_reason = event["finish_reason"]
        done.prompt_tokens = int(event.get("prompt_tokens", 0))
        done.completion_tokens = int(event.get("completion_tokens", 0))


def generate_http(url: str, prompt: str, model: str = "", stream: bool = False,
                  on_chunk: Callable[[str], None] | None = None, timeout_s: float = 120.0,
                  max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                  top_k: int | None = None, seed: int | None = None,
                  stop: list[str] | None = None) -> Completion:
    """POST to /generate (one JSON answer) or /generate_stream (server-sent events, one per chunk)."""
    body = {"text_input": prompt, "model": model, "stream": stream,
            **_params(max_tokens, temperature, top_p, top_k, seed, stop)}
    endpoint = "generate_stream" if stream else "generate"
    base = url if url.startswith("http") else f"http://{url}"
    chunks: list[str] = []
    done = Completion("", "", 0, 0, chunks)
    with _post(f"{base}/v2/models/{MODEL_NAME}/{endpoint}", body, timeout_s) as response:
        events = ((json.loads(line[5:]) for line in _sse_lines(response)) if stream
                  else iter([json.loads(response.read())]))
        for event in events:
            if "error" in event:
                raise ClientError(event["error"])
            text = event.get("text_output", "")
            if text:
                chunks.append(text)
                if on_chunk is not None:
                    on_chunk(text)
            _completion_fields(event, done)
    done.text = "".join(chunks)
    return done


def _sse_lines(response):
    """The `data:` lines of a server-sent event stream, as they arrive."""
    for raw in response:
        line = raw.decode().strip()
        if line.startswith("data:"):
            yield line
