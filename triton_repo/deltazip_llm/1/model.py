"""deltazip_llm: Triton Python-backend model. Parses requests and hands them to deltazip.runtime.Engine.

Decoupled: execute() returns at once; the engine's loop thread streams chunks, a small thread pool waits for
each request's result and sends the final response. One bad request gets its own error; others go on.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import torch
import triton_python_backend_utils as pb_utils

from deltazip.config import RuntimeConfig
from deltazip.runtime import Engine, GenerationRequest, RequestError, SamplingParams
from deltazip.serving.protocol import INPUT_NAMES, BadRequest, output_arrays, parse_inputs

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _response(text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int):
    outputs = output_arrays(text, finish_reason, prompt_tokens, completion_tokens)
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in outputs.items()])


def _error(sender, message: str) -> None:
    sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), flags=FINAL)


class TritonPythonModel:
    """One engine per model instance, started in initialize and stopped in finalize."""

    def initialize(self, args: dict) -> None:
        torch.set_num_threads(1)
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.runtime_config = RuntimeConfig(**json.loads(params["runtime_config"]))
        self.engine = Engine.from_dirs(params["base_dir"], params["deltas_dir"], self.runtime_config)
        self.engine.start()
        # Optional: the launcher may ask for the engine's counters (swap-in times) in a JSON file.
        self.stats_path = os.environ.get("DELTAZIP_ENGINE_STATS") or None
        # Threads that wait on results; the engine itself runs in its own loop thread.
        self.waiters = ThreadPoolExecutor(max_workers=64, thread_name_prefix="deltazip-wait")

    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                inputs = {}
                for name in INPUT_NAMES:
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    if tensor is not None:
                        inputs[name] = tensor.as_numpy()
                parsed = parse_inputs(inputs, max_tokens_limit=self.runtime_config.max_context)
                gen_request = GenerationRequest(parsed.prompt, parsed.delta, SamplingParams(**parsed.params))
                on_token = self._streamer(sender) if parsed.stream else None
                handle = self.engine.submit(gen_request, on_token=on_token)
            except (BadRequest, RequestError, TypeError, ValueError) as e:
                _error(sender, str(e))
                continue
            self.waiters.submit(self._finish, sender, handle, parsed.stream)
        return None

    def _streamer(self, sender):
        def on_token(chunk: str) -> None:
            if chunk:
                sender.send(_response(chunk, "", 0, 0))
        return on_token

    def _finish(self, sender, handle, streamed: bool) -> None:
        try:
            self._send_result(sender, handle.result(), streamed)
        except Exception as e:  # noqa: BLE001 - any failure is this request's error only; the rest go on
            pb_utils.Logger.log_error(f"deltazip_llm: request failed: {e!r}")
            _error(sender, f"generation failed: {e}")

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
        tmp = f"{self.stats_path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.engine.stats(), f)
        os.replace(tmp, self.stats_path)  # readers see the whole file or the previous one

    def finalize(self) -> None:
        self.engine.stop()
        self.waiters.shutdown(wait=True, cancel_futures=True)

