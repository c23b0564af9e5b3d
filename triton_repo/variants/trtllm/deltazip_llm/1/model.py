"""deltazip_llm, trtllm variant: the same Triton contract as the torch model, served by a TensorRT-LLM engine.

GPU only — not verified on this machine (no GPU, TensorRT-LLM not installable): rendered by
`deltazip build --backend trtllm`; the engine and its per-request delta slots are driven by
`deltazip.plugins.trtllm_session.TrtllmDeltaEngine`. Inputs and outputs are parsed and written by the same
`deltazip.serving.protocol` helpers as the torch model, so `deltazip serve`, the clients and perf_analyzer
use it unchanged. Control requests: only {"op": "stats"} (variant refresh/drain are torch-backend features).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import triton_python_backend_utils as pb_utils

from deltazip.config import RuntimeConfig
from deltazip.plugins.trtllm_session import TrtllmDeltaEngine
from deltazip.runtime import GenerationRequest, RequestError, SamplingParams
from deltazip.serving.protocol import INPUT_NAMES, BadRequest, output_arrays, parse_inputs
from deltazip.serving.variants import CONTROL_INPUT

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _response(text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int):
    outputs = output_arrays(text, finish_reason, prompt_tokens, completion_tokens)
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in outputs.items()])


def _error(sender, message: str) -> None:
    sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), flags=FINAL)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.runtime_config = RuntimeConfig(**json.loads(params["runtime_config"]))
        self.engine = TrtllmDeltaEngine(params["trtllm_dir"], params["base_dir"], self.runtime_config)
        self.engine.start()
        self.waiters = ThreadPoolExecutor(max_workers=64, thread_name_prefix="deltazip-wait")

    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            if pb_utils.get_input_tensor_by_name(request, CONTROL_INPUT) is not None:
                stats = json.dumps({"engine": self.engine.stats()})
                sender.send(_response(stats, "control", 0, 0), flags=FINAL)
                continue
            try:
                inputs = {}
                for name in INPUT_NAMES:
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    if tensor is not None:
                        inputs[name] = tensor.as_numpy()
                parsed = parse_inputs(inputs, max_tokens_limit=self.runtime_config.max_context)
                gen = GenerationRequest(parsed.prompt, parsed.delta, SamplingParams(**parsed.params))
                on_token = None
                if parsed.stream:
                    on_token = lambda chunk, s=sender: s.send(_response(chunk, "", 0, 0))  # noqa: E731
                handle = self.engine.submit(gen, on_token=on_token)
            except (BadRequest, RequestError, TypeError, ValueError) as e:
                _error(sender, str(e))
                continue
            self.waiters.submit(self._finish, sender, handle, parsed.stream)

    def _finish(self, sender, handle, streamed: bool) -> None:
        try:
            result = handle.result()
            if result.finish_reason == "error":
                _error(sender, result.error or "generation failed")
                return
            sender.send(_response("" if streamed else result.text, result.finish_reason, result.prompt_tokens,
                                  result.completion_tokens), flags=FINAL)
        except Exception as e:  # noqa: BLE001 - this request's error only
            _error(sender, f"generation failed: {e}")

    def finalize(self) -> None:
        self.engine.stop()
        self.waiters.shutdown(wait=True, cancel_futures=True)
