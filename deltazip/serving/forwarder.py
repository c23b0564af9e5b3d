"""The front's link to tritonserver: one persistent gRPC bidirectional stream, responses matched by id."""

from __future__ import annotations

import asyncio
import uuid

from deltazip.serving.openai_requests import ApiError, triton_error
from deltazip.serving.protocol import MODEL_NAME


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

        from deltazip.serving.client import first_output, grpc_inputs

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
                    raise triton_error(f"unavailable: {details}")
                if item.error_message:
                    raise triton_error(item.error_message)
                result = InferResult(item.infer_response)
                text = first_output(result, "text_output") or ""
                reason = first_output(result, "finish_reason") or ""
                if reason:
                    yield (text, reason, int(first_output(result, "prompt_tokens") or 0),
                           int(first_output(result, "completion_tokens") or 0))
                    return
                yield text, "", 0, 0
        finally:
            live.pending.pop(rid, None)


