"""DeltaLinear for TensorRT-LLM 1.2.x graphs: base Linear, then the DeltaGemm plugin on its output.

GPU only — not verified on this machine (TensorRT-LLM and TensorRT cannot be installed here). Imported only
by `deltazip.builder.trtllm` after `require_trtllm()` succeeded. Engine inputs it adds, per swapped module M:
``M.delta.{qweight,meta,scales,zeros}`` (the stacked slots, fed by the serving model), and once per engine
``delta_sorted_rows``, ``delta_seg_start``, ``delta_seg_slot`` (from `delta_gemm_plugin.batch_segments`).
Row-parallel layers add an all-reduce of the delta term after the base layer's own (simple, not fused).
"""

from __future__ import annotations

import tensorrt as trt
from tensorrt_llm.functional import Tensor, allreduce, default_trtnet
from tensorrt_llm.mapping import Mapping
from tensorrt_llm.module import Module

from deltazip.plugins.delta_gemm_plugin import DeltaGemmShape, m_splits_for, weight_shapes
from deltazip.plugins.registration import add_delta_gemm

SEGMENT_INPUTS = ("delta_sorted_rows", "delta_seg_start", "delta_seg_slot")
_TRT_DTYPES = {"qweight": trt.int32, "meta": trt.int32, "scales": trt.float16, "zeros": trt.float16}
_segments_by_network: dict[int, dict[str, Tensor]] = {}


def _segment_inputs(max_num_tokens: int) -> dict[str, Tensor]:
    """The per-batch segment inputs, declared once per network."""
    network = default_trtnet()
    found = _segments_by_network.get(id(network))
    if found is None:
        ranges = {"delta_sorted_rows": max_num_tokens, "delta_seg_start": max_num_tokens + 1,
                  "delta_seg_slot": max_num_tokens}
        found = {name.removeprefix("delta_"): Tensor(name=name, dtype=trt.int32, shape=[-1],
                                                     dim_range={"n": [(1, 1, ranges[name])]})
                 for name in SEGMENT_INPUTS}
        _segments_by_network[id(network)] = found
    return found


class DeltaLinear(Module):
    """y = base(x) + x·Δ_slotᵀ per row, Δ from the slot inputs of this module."""

    def __init__(self, base: Module, name: str, shape: DeltaGemmShape, max_num_tokens: int,
                 row_parallel: bool, mapping: Mapping | None) -> None:
        super().__init__()
        self.base, self.delta_name, self.shape = base, name, shape
        self.max_num_tokens, self.row_parallel, self.mapping = max_num_tokens, row_parallel, mapping

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        y = self.base(x, *args, **kwargs)
        weights = {key: Tensor(name=f"{self.delta_name}.delta.{key}", dtype=_TRT_DTYPES[key],
                               shape=list(dims))
                   for key, dims in weight_shapes(self.shape).items()}
        m_splits = m_splits_for(self.max_num_tokens, 16, 64)
        segments = _segment_inputs(self.max_num_tokens)
        base_out = y * 0.0 if self.row_parallel else y  # row-parallel: the delta partial is all-reduced alone
        layer = add_delta_gemm(default_trtnet(), x.trt_tensor, base_out.trt_tensor,
                               {k: t.trt_tensor for k, t in weights.items()},
                               {k: t.trt_tensor for k, t in segments.items()}, self.shape, m_splits)
        out = Tensor(trt_tensor=layer.get_output(0), network=default_trtnet())
        if self.row_parallel and self.mapping is not None and self.mapping.tp_size > 1:
            return y + allreduce(out, self.mapping.tp_group)
        return y + out if self.row_parallel else out


def make_delta_linear(base: Module, name: str, info: dict, delta_slots: int, max_num_tokens: int,
                      row_parallel: bool) -> DeltaLinear:
    shape = DeltaGemmShape(info["out_features"], info["in_features"], info["bits"], info["group_size"],
                           info["sparse24"], delta_slots)
    return DeltaLinear(base, name, shape, max_num_tokens, row_parallel, getattr(base, "mapping", None))
