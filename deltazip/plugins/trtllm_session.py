"""Drive a deltazip TensorRT-LLM engine with per-request delta slots (the trtllm serving model's engine).

GPU only — not verified on this machine: TensorRT-LLM cannot be installed here, nothing in this module has
run. Used by triton_repo/variants/trtllm/deltazip_llm/1/model.py. tp 1 only (a tp > 1 engine needs one
MPI process per rank; not built).

How it feeds the delta inputs. TensorRT-LLM's Python runtime (`tensorrt_llm.runtime.ModelRunner` /
`GenerationSession`, tensorrt_llm/runtime/model_runner.py and generation.py, 1.2.0rc2-era sources) feeds
exactly the inputs it knows and refuses an engine with others unless ``debug_mode``
(GenerationSession.__init__
compares the engine's tensor names with its expected list). So the runner is created with ``debug_mode=True``
(ModelRunner.from_dir(engine_dir, rank=, debug_mode=)), its session is switched to `DeltaGenerationSession`
with debug mode off again, and the two methods that build each step's tensor map
(``_get_context_shape_buffer``, ``_get_next_step_shape_buffer`` → {name: RuntimeTensor}) add the delta
inputs (``RuntimeTensor.from_torch(name, tensor)``): the slot tensors (device-resident, rewritten only when
a delta is loaded into a slot) and the per-step segments (`delta_gemm_plugin.engine_segments`: tokens per
request = its prompt length in the context step, 1 in generation steps; lm_head rows = requests).

Batching is static: a batch of up to max_batch_size queued requests using at most `delta_slots` distinct
deltas runs to completion (ModelRunner.generate(streaming=True)); sampling settings are taken per batch from
its first request, requests with other settings wait for a later batch.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deltazip.config import RuntimeConfig
from deltazip.errors import DeltazipError, RequestError
from deltazip.plugins.delta_gemm_plugin import DeltaGemmShape, engine_segments
from deltazip.runtime.sampling import GenerationRequest, GenerationResult


def _session_class():
    from tensorrt_llm.runtime import GenerationSession
    from tensorrt_llm.runtime.generation import RuntimeTensor

    class DeltaGenerationSession(GenerationSession):
        """GenerationSession that adds deltazip's engine inputs to every step's tensor map."""

        delta_inputs: dict[str, torch.Tensor] = {}
        delta_steps: dict[str, dict[str, torch.Tensor]] = {}

        def _with_deltas(self, tensors: dict, step: str) -> dict:
            for name, tensor in {**self.delta_inputs, **self.delta_steps[step]}.items():
                tensors[name] = RuntimeTensor.from_torch(name, tensor)
            return tensors

        def _get_context_shape_buffer(self, *args, **kwargs):
            return self._with_deltas(super()._get_context_shape_buffer(*args, **kwargs), "context")

        def _get_next_step_shape_buffer(self, *args, **kwargs):
            return self._with_deltas(super()._get_next_step_shape_buffer(*args, **kwargs), "generation")

    return DeltaGenerationSession


@dataclass
class _Job:
    request: GenerationRequest
    on_token: object
    future: Future = field(default_factory=Future)
    ids: list[int] = field(default_factory=list)


class _Handle:
    def __init__(self, job: _Job) -> None:
        self._job = job

    def result(self, timeout: float | None = None) -> GenerationResult:
        return self._job.future.result(timeout)

    def cancel(self) -> None:  # static batches run to completion; a queued request is dropped
        self._job.future.cancel()


class DeltaSlotStore:
    """Device tensors of every delta input of the engine, and which delta each slot holds (LRU)."""

    def __init__(self, layout: dict, layouts_dir: Path, num_slots: int, table_shape,
                 dtype: torch.dtype) -> None:
        """`table_shape(input name)`: the engine's shape of a table input (the embedding table's vocab
        rows are the engine's, not the layouts' per-rank share)."""
        from deltazip.kernels import DeltaSlots

        self.layouts_dir, self.num_slots, self.dtype = Path(layouts_dir), num_slots, dtype
        self.linears = {}
        self.tables: dict[str, torch.Tensor] = {}
        names = [m for m in layout["packed"] if m == "transformer.vocab_embedding"]
        names += [p.removesuffix(".weight") for p in layout["dense"]]
        for name in names:
            dims = tuple(table_shape(f"{name}.delta.table"))
            self.tables[name] = torch.zeros(dims, dtype=dtype, device="cuda")
        for module, info in layout["packed"].items():
            if module in self.tables:
                continue
            shape = DeltaGemmShape(info["out_features"], info["in_features"], info["bits"],
                                   info["group_size"], info["sparse24"], num_slots)
            self.linears[module] = DeltaSlots(num_slots, shape.out_features, shape.in_features, shape.bits,
                                              shape.group_size, shape.sparse24, device="cuda")
        self.resident: OrderedDict[str, int] = OrderedDict()  # delta name → slot, least recently used first

    def engine_inputs(self) -> dict[str, torch.Tensor]:
        from deltazip.plugins.delta_gemm_plugin import plugin_weights

        out = {f"{m}.delta.{k}": t for m, slots in self.linears.items()
               for k, t in plugin_weights(slots).items()}
        out.update({f"{name}.delta.table": t for name, t in self.tables.items()})
        return out

    def acquire(self, names: list[str]) -> dict[str, int]:
        """Slots for these (at most num_slots) deltas; missing ones replace the least recently used."""
        from deltazip.converters.readers import read_delta_layout

        for name in names:
            if name in self.resident:
                self.resident.move_to_end(name)
                continue
            used = set(self.resident.values())
            free = [s for s in range(self.num_slots) if s not in used]
            if free:
                slot = free[0]
            else:
                victim = next(n for n in self.resident if n not in names)
                slot = self.resident.pop(victim)
            rank = read_delta_layout(self.layouts_dir / name).load_rank(0)
            for module, slots in self.linears.items():
                if module in rank.packed:
                    slots.set(slot, rank.packed[module].to("cuda"))
                else:
                    slots.clear(slot)
            for module, table in self.tables.items():
                table[slot].zero_()
                if module in rank.packed:  # the embedding: dequantized rows
                    rows = rank.packed[module].dequantize().to(self.dtype)
                    table[slot, : rows.shape[0]] = rows.to("cuda")
                elif f"{module}.weight" in rank.dense:
                    table[slot] = rank.dense[f"{module}.weight"].to(self.dtype).to("cuda")
            self.resident[name] = slot
        return {name: self.resident[name] for name in names}


class TrtllmDeltaEngine:
    """submit/result/stop/stats like deltazip.runtime.Engine, over a TensorRT-LLM engine with delta slots."""

    def __init__(self, trtllm_dir: str | Path, base_dir: str | Path, runtime: RuntimeConfig) -> None:
        import json

        self.root, self.base_dir, self.runtime = Path(trtllm_dir), Path(base_dir), runtime
        self.info = json.loads((self.root / "trtllm_build.json").read_text())
        if self.info["tp"] != 1:
            raise DeltazipError("the trtllm serving model runs tp 1 engines only (tp > 1 needs MPI ranks)")
        self.names = set(self.info["deltas"])
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._stats = {"requests": 0, "batches": 0, "slot_loads": 0}
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        from tensorrt_llm.runtime import ModelRunner
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(self.base_dir))
        self.runner = ModelRunner.from_dir(str(self.root / "engine"), rank=0, debug_mode=True)
        session = self.runner.session
        session.__class__ = _session_class()
        session.debug_mode = False
        dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[self.info["dtype"]]
        engine = session.runtime.engine  # trt.ICudaEngine (model_runner.py: session.runtime.engine)
        self.slots = DeltaSlotStore(self.info["layout"], self.root / "deltas", self.info["delta_slots"],
                                    engine.get_tensor_shape, dtype)
        session.delta_inputs = self.slots.engine_inputs()
        self._thread = threading.Thread(target=self._loop, name="deltazip-trtllm", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join()

    def stats(self) -> dict:
        return dict(self._stats, resident=list(self.slots.resident))

    def submit(self, request: GenerationRequest, on_token=None) -> _Handle:
        request.params.validate()
        if request.delta is not None and request.delta not in self.names:
            raise RequestError(f"unknown delta '{request.delta}' (this engine has {sorted(self.names)})")
        job = _Job(request, on_token, ids=self.tokenizer(request.prompt).input_ids)
        self._stats["requests"] += 1
        self._queue.put(job)
        return _Handle(job)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        return self.submit(request).result()

    # -- the loop ----------------------------------------------------------------------------------------
    def _next_batch(self, first: _Job, waiting: list[_Job]) -> list[_Job]:
        key = _sampling_key(first.request)
        batch, deltas = [first], {first.request.delta} - {None}
        for job in list(waiting):
            if len(batch) >= self.runtime.max_batch_size:
                break
            delta = job.request.delta
            if _sampling_key(job.request) != key or (delta and delta not in deltas
                                                       and len(deltas) >= self.slots.num_slots):
                continue
            deltas |= {delta} - {None}
            batch.append(job)
            waiting.remove(job)
        return batch

    def _loop(self) -> None:
        waiting: list[_Job] = []
        while True:
            while not waiting or not self._queue.empty():
                job = self._queue.get()
                if job is None:
                    return
                if not job.future.cancelled():
                    waiting.append(job)
            batch = self._next_batch(waiting.pop(0), waiting)
            try:
                self._run(batch)
            except Exception as err:  # noqa: BLE001 - the batch fails, the engine goes on
                for job in batch:
                    if not job.future.done():
                        job.future.set_result(GenerationResult("", "error", len(job.ids), 0, str(err)))

    def _run(self, batch: list[_Job]) -> None:
        names = sorted({j.request.delta for j in batch} - {None})
        slot_of = self.slots.acquire(names)
        request_slots = torch.tensor([slot_of.get(j.request.delta, -1) for j in batch], dtype=torch.int32)
        prompt_lens = torch.tensor([len(j.ids) for j in batch])
        steps = {"context": engine_segments(request_slots, prompt_lens, self.slots.num_slots),
                 "generation": engine_segments(request_slots, torch.ones(len(batch), dtype=torch.long),
                                               self.slots.num_slots)}
        self.runner.session.delta_steps = {k: {n: t.cuda() for n, t in v.items()} for k, v in steps.items()}
        params = batch[0].request.params
        self._stats["batches"] += 1
        texts = [""] * len(batch)
        done = [False] * len(batch)
        started = time.perf_counter()
        for out in self.runner.generate(
                [torch.tensor(j.ids, dtype=torch.int32) for j in batch],
                max_new_tokens=max(1, max(j.request.params.max_tokens for j in batch)),
                end_id=self.tokenizer.eos_token_id, pad_id=self.tokenizer.pad_token_id or 0,
                temperature=params.temperature or 1.0, top_k=1 if params.temperature == 0 else params.top_k,
                top_p=params.top_p, random_seed=params.seed, streaming=True, return_dict=True,
                output_sequence_lengths=True):
            ids, lengths = out["output_ids"], out["sequence_lengths"]
            for i, job in enumerate(batch):
                if done[i]:
                    continue
                new = ids[i, 0, len(job.ids): int(lengths[i, 0])].tolist()[: job.request.params.max_tokens]
                text = self.tokenizer.decode(new, skip_special_tokens=True)
                reason = _finish(job, new, text, self.tokenizer.eos_token_id)
                if reason == "stop":
                    text = _cut_at_stop(text, job.request.params.stop)
                if job.on_token is not None and len(text) > len(texts[i]):  # no hold-back of partial stops
                    job.on_token(text[len(texts[i]):])
                texts[i] = text
                if reason in ("stop", "length"):
                    done[i] = True
                    job.future.set_result(GenerationResult(text, reason, len(job.ids), len(new)))
        for i, job in enumerate(batch):
            if not done[i]:
                job.future.set_result(GenerationResult(texts[i], "stop", len(job.ids),
                                                       len(self.tokenizer(texts[i]).input_ids)))
        self._stats["last_batch_s"] = time.perf_counter() - started


def _sampling_key(request: GenerationRequest) -> tuple:
    p = request.params
    return (p.temperature, p.top_k, p.top_p, p.seed)


def _cut_at_stop(text: str, stops: list[str]) -> str:
    cuts = [text.index(s) for s in stops if s and s in text]
    return text[: min(cuts)] if cuts else text


def _finish(job: _Job, new_ids: list[int], text: str, eos: int) -> str:
    if new_ids and new_ids[-1] == eos or any(s and s in text for s in job.request.params.stop):
        return "stop"
    if len(new_ids) >= job.request.params.max_tokens:
        return "length"
    return ""
