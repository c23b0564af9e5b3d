"""TensorRT-LLM 1.2.x layers that add per-request deltas: TrtDeltaLinear, TrtDeltaNorm, TrtDeltaEmbedding.

GPU only — not verified on this machine (TensorRT-LLM and TensorRT cannot be installed here). Imported only by
`deltazip.builder.trtllm_engine` after `require_trtllm()` succeeded. Not to be confused with the torch
runtime's `deltazip.runtime` delta layers: these build TensorRT graph nodes.

The engine inputs the layers read are declared by one `DeltaEngineInputs` object, created for one engine
build and handed to every layer explicitly (no module-global state):

- per swapped linear M: ``M.delta.{qweight,meta,scales,zeros}`` — the stacked slots [S, ...]
  (`delta_gemm_plugin.weight_shapes`), fed by the serving model from its device slots;
- per batch: ``delta_{sorted_rows,seg_start,seg_slot}`` over the packed tokens, ``delta_lm_{...}`` over the
  requests (lm_head runs on the last token of each sequence), ``delta_token_slot`` [tokens] (slot per token,
  S for none) — all from `delta_gemm_plugin.engine_segments` / `token_slot_index`;
- per norm P with a dense delta: ``P.delta.table`` [S + 1, H] (row S zeros); the embedding:
  ``transformer.vocab_embedding.delta.table`` [S + 1, V, H] (dense, dequantized by the server per slot:
  S·V·H·2 bytes — e.g. 1 GiB per slot for Llama-3-8B; a packed lookup kernel would cut that, not built).

APIs used, read from TensorRT-LLM sources (1.2.0rc2-era snapshot of NVIDIA/TensorRT-LLM, the nearest to
1.2.1 available here): tensorrt_llm/layers/linear.py (Linear.gather_output / tp_group / tp_size, RowLinear
all-reduce in collect_and_bias), tensorrt_llm/functional.py (Tensor(name, dtype, shape, dim_range),
allgather(tensor, group, gather_dim), allreduce(tensor, group), embedding(input, weight), cast, sqrt,
Tensor.mean / Tensor.view),
tensorrt_llm/_common.py (default_net, default_trtnet), tensorrt_llm/builder.py
(Builder._add_optimization_profile
reads profiles[i] of every input with a dim_range: our inputs copy the profile count of the network's inputs).
"""

from __future__ import annotations

from collections import OrderedDict

import tensorrt as trt
from tensorrt_llm._common import default_net, default_trtnet
from tensorrt_llm.functional import Tensor, allgather, allreduce, cast, embedding, sqrt
from tensorrt_llm.module import Module

from deltazip.plugins.delta_gemm_plugin import DeltaGemmShape, m_splits_for, weight_shapes
from deltazip.plugins.registration import add_delta_gemm

TOKEN_SEGMENTS = ("delta_sorted_rows", "delta_seg_start", "delta_seg_slot")
LAST_TOKEN_SEGMENTS = ("delta_lm_sorted_rows", "delta_lm_seg_start", "delta_lm_seg_slot")
TOKEN_SLOT = "delta_token_slot"
_SLOT_DTYPES = {"qweight": trt.int32, "meta": trt.int32, "scales": trt.float16, "zeros": trt.float16}


class DeltaEngineInputs:
    """The per-batch delta inputs of one engine, declared once in the network being built."""

    def __init__(self, num_slots: int, max_num_tokens: int, max_batch_size: int, dtype: str) -> None:
        self.num_slots, self.max_num_tokens, self.max_batch_size = num_slots, max_num_tokens, max_batch_size
        self.dtype = dtype
        self._network = None
        self._tensors: dict[str, Tensor] = {}

    def _declare(self, name: str, dtype, shape: list[int], ranges: dict[str, int] | None = None) -> Tensor:
        network = default_net()
        if self._network is not network:  # a new build: nothing declared there yet
            self._network, self._tensors = network, {}
        if name not in self._tensors:
            dim_range = None
            if ranges:
                profiles = max((len(t.profiles) for t in network._inputs.values()), default=1) or 1
                dim_range = OrderedDict((dim, [(1, max(1, high // 2), high)] * profiles)
                                        for dim, high in ranges.items())
            self._tensors[name] = Tensor(name=name, dtype=dtype, shape=shape, dim_range=dim_range)
        return self._tensors[name]

    def segments(self, last_tokens: bool) -> dict[str, Tensor]:
        """sorted_rows / seg_start / seg_slot for token rows, or for lm_head's one row per request."""
        names, rows = (LAST_TOKEN_SEGMENTS, self.max_batch_size) if last_tokens else (
            TOKEN_SEGMENTS, self.max_num_tokens)
        prefix = "delta_lm_" if last_tokens else "delta_"
        dims = {"sorted_rows": rows, "seg_start": rows + 1, "seg_slot": rows}
        return {key: self._declare(name, trt.int32, [-1], {f"{prefix}{key}_len": dims[key]})
                for name, key in zip(names, dims, strict=True)}

    def token_slot(self) -> Tensor:
        """[tokens] int32: each token's slot, `num_slots` for none (the tables' zero row)."""
        return self._declare(TOKEN_SLOT, trt.int32, [-1], {"delta_token_len": self.max_num_tokens})

    def slot_weights(self, module: str, shape: DeltaGemmShape) -> dict[str, Tensor]:
        return {key: self._declare(f"{module}.delta.{key}", _SLOT_DTYPES[key], list(dims))
                for key, dims in weight_shapes(shape).items()}

    def table(self, name: str, dims: list[int]) -> Tensor:
        return self._declare(f"{name}.delta.table", trt.float16 if self.dtype == "float16" else trt.bfloat16,
                             [self.num_slots + 1, *dims])


class TrtDeltaLinear(Module):
    """y = base(x) + x·Δ_slotᵀ per row (DeltaGemm plugin after the base GEMM).

    kind: "column" (qkv, fc, gate: the local output shard), "row" (dense, proj: the delta partial of the
    local input shard is all-reduced on its own, after the base layer's own all-reduce), "lm_head" (rows
    are requests; at tp > 1 the base's all-gather is moved after the delta so the rank's vocab shard of
    the delta lines up with the rank's shard of the logits).
    """

    def __init__(self, base: Module, name: str, shape: DeltaGemmShape, kind: str,
                 inputs: DeltaEngineInputs) -> None:
        super().__init__()
        self.base, self.delta_name, self.shape, self.kind, self.inputs = base, name, shape, kind, inputs
        self.gather = False
        if kind == "lm_head" and getattr(base, "gather_output", False) and base.tp_size > 1:
            base.gather_output, self.gather = False, True  # gather after the delta, below

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        y = self.base(x, *args, **kwargs)
        rows = self.inputs.max_batch_size if self.kind == "lm_head" else self.inputs.max_num_tokens
        weights = self.inputs.slot_weights(self.delta_name, self.shape)
        segments = self.inputs.segments(last_tokens=self.kind == "lm_head")
        base_out = y * 0.0 if self.kind == "row" else y  # row: the delta partial is all-reduced alone
        layer = add_delta_gemm(default_trtnet(), x.trt_tensor, base_out.trt_tensor,
                               {k: t.trt_tensor for k, t in weights.items()},
                               {k.removeprefix("delta_lm_").removeprefix("delta_"): t.trt_tensor
                                for k, t in segments.items()},
                               self.shape, m_splits_for(rows, 16, 64))
        out = Tensor(trt_tensor=layer.get_output(0), network=default_trtnet())
        if self.kind == "row":
            if self.base.tp_size > 1 and self.base.tp_group is not None:
                out = allreduce(out, self.base.tp_group)
            return y + out
        if self.gather:
            out = allgather(out, self.base.tp_group, gather_dim=-1)
        return out


class TrtDeltaNorm(Module):
    """RMSNorm with a per-request dense weight delta: y = base(x) + rmsnorm(x)·Δw[slot(token)]."""

    def __init__(self, base: Module, name: str, hidden: int, eps: float, inputs: DeltaEngineInputs) -> None:
        super().__init__()
        self.base, self.delta_name, self.hidden, self.eps, self.inputs = base, name, hidden, eps, inputs

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        y = self.base(x, *args, **kwargs)
        table = self.inputs.table(self.delta_name, [self.hidden])
        delta_w = embedding(self.inputs.token_slot(), table)  # [tokens, H]; row S of the table is zeros
        xf = cast(x, "float32")
        normed = xf / sqrt((xf * xf).mean(-1, keepdim=True) + self.eps)
        return y + cast(normed * cast(delta_w, "float32"), y.dtype)


class TrtDeltaEmbedding(Module):
    """Vocab embedding plus the request's embedding delta row: y = base(ids) + table[slot, id]."""

    def __init__(self, base: Module, name: str, vocab: int, hidden: int, inputs: DeltaEngineInputs) -> None:
        super().__init__()
        self.base, self.delta_name, self.vocab, self.hidden, self.inputs = base, name, vocab, hidden, inputs

    def forward(self, ids: Tensor, *args, **kwargs) -> Tensor:
        y = self.base(ids, *args, **kwargs)
        table = self.inputs.table(self.delta_name, [self.vocab, self.hidden])
        flat = table.view([(self.inputs.num_slots + 1) * self.vocab, self.hidden])
        return y + embedding(self.inputs.token_slot() * self.vocab + ids, flat)
