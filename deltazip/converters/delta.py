"""Delta artifact → the per-rank TensorRT-LLM delta layout the DeltaGemm plugin consumes.

Per rank r: ``rank{r}.safetensors`` holding, for each TRT-LLM module M it modifies, the packed delta
``M.delta.{qweight,meta,scales,zeros}`` (fused and split exactly like the exporter treats ``M.weight``) and
the losslessly stored deltas ``M.delta.{weight,bias}`` (dense); plus ``rank{r}.json`` describing them.
The deltas stay packed throughout: peak host memory is about the packed delta, never the dense model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from deltazip.converters.names import hf_module_of_param, trt_target
from deltazip.converters.split import (
    ModelShape,
    cat_packed,
    check_tp,
    column_rows,
    padded_vocab,
    qkv_rows,
    row_cols,
    slice_cols_dense,
    slice_cols_packed,
    take_rows_dense,
    take_rows_packed,
    zero_packed,
)
from deltazip.errors import DeltazipError
from deltazip.fsutil import atomic_dir, check_out_dir
from deltazip.packed import PackedLinear

LAYOUT_FORMAT = "deltazip-trtllm-delta/1"
Shardable = PackedLinear | torch.Tensor


@dataclass
class RankDelta:
    """One rank's share of a delta: packed deltas by TRT-LLM module, dense deltas by TRT-LLM parameter."""

    rank: int
    packed: dict[str, PackedLinear] = field(default_factory=dict)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    parallel: dict[str, str] = field(default_factory=dict)  # module → column | row | vocab | qkv | replicated


def expected_shapes(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """HF linear module suffix → dense [out, in] shape, to reject a delta made for another model shape."""
    q, kv = shape.num_heads * shape.head_size, shape.num_kv_heads * shape.head_size
    h, i = shape.hidden_size, shape.intermediate_size
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q), "gate_proj": (i, h),
            "up_proj": (i, h), "down_proj": (h, i), "embed_tokens": (shape.vocab_size, h),
            "lm_head": (shape.vocab_size, h)}


def _rows(obj: Shardable, rows: torch.Tensor) -> Shardable:
    return take_rows_packed(obj, rows) if isinstance(obj, PackedLinear) else take_rows_dense(obj, rows)


def _cols(obj: Shardable, start: int, stop: int, what: str) -> Shardable:
    if isinstance(obj, PackedLinear):
        return slice_cols_packed(obj, start, stop, what)
    return slice_cols_dense(obj, start, stop)


def _out_features(obj: Shardable) -> int:
    return obj.out_features if isinstance(obj, PackedLinear) else obj.shape[0]


def shard_module(obj: Shardable, parallel: str, shape: ModelShape, tp: int, rank: int, vocab_rows: int,
                 what: str, is_bias: bool = False) -> Shardable:
    """Rank `rank`'s share of one (already fused) delta tensor, by the module's parallel kind."""
    if parallel == "replicated" or (tp == 1 and parallel != "vocab"):
        return obj
    if parallel == "qkv":
        return _rows(obj, qkv_rows(shape, tp, rank))
    if parallel == "column":
        return _rows(obj, column_rows(_out_features(obj), tp, rank))
    if parallel == "vocab":
        return _rows(obj, column_rows(_out_features(obj), tp, rank, padded_to=vocab_rows))
    if parallel == "row":
        if is_bias:  # a row-parallel bias is added once after the all-reduce: every rank keeps it whole
            return obj
        in_features = obj.in_features if isinstance(obj, PackedLinear) else obj.shape[1]
        return _cols(obj, *row_cols(in_features, tp, rank), what)
    raise ValueError(f"unknown parallel kind {parallel!r}")


def _fuse_qkv(parts: dict[str, Shardable], shape: ModelShape, module: str) -> Shardable:
    """cat(q, k, v) in HF order; a missing part (unchanged by the fine-tune) is a zero delta."""
    rows = {"q": shape.num_heads * shape.head_size, "k": shape.num_kv_heads * shape.head_size,
            "v": shape.num_kv_heads * shape.head_size}
    like = next(iter(parts.values()))
    filled = []
    for part, n in rows.items():
        if part in parts:
            filled.append(parts[part])
        elif isinstance(like, PackedLinear):
            filled.append(zero_packed(n, like))
        else:
            filled.append(torch.zeros(n, *like.shape[1:], dtype=like.dtype))
    if isinstance(like, PackedLinear):
        return cat_packed(filled, module)
    return torch.cat(filled)


def _check_linear_shape(hf_module: str, obj: Shardable, shape: ModelShape) -> None:
    expect = expected_shapes(shape).get(hf_module.rsplit(".", 1)[-1])
    got = (obj.out_features, obj.in_features) if isinstance(obj, PackedLinear) else tuple(obj.shape)
    if expect is not None and got != expect:
        raise DeltazipError(f"delta '{hf_module}' has shape {list(got)} but the base expects {list(expect)} "
                            "(was it compressed against another base?)")


def shard_delta(linears: Mapping[str, PackedLinear], exact: Mapping[str, torch.Tensor], shape: ModelShape,
                tp: int, vocab_multiple: int = 1) -> list[RankDelta]:
    """Split a delta (packed linears by HF module, exact deltas by HF parameter) into tp rank-local deltas."""
    check_tp(shape, tp)
    vocab_rows = padded_vocab(shape.vocab_size, tp, vocab_multiple)
    ranks = [RankDelta(r) for r in range(tp)]
    linears = dict(linears)
    if shape.tie_word_embeddings and "model.embed_tokens" in linears and "lm_head" not in linears:
        linears["lm_head"] = linears["model.embed_tokens"]  # tied: the exporter writes lm_head = embedding

    # (TRT module, leaf or None for packed) → {part: tensor}; part is q/k/v inside qkv, else None
    groups: dict[tuple[str, str | None], dict[str | None, Shardable]] = {}
    kinds: dict[str, str] = {}
    for hf_module, packed in linears.items():
        _check_linear_shape(hf_module, packed, shape)
        target = trt_target(hf_module)
        groups.setdefault((target.module, None), {})[target.part] = packed
        kinds[target.module] = target.parallel
    for param, tensor in exact.items():
        hf_module, leaf = hf_module_of_param(param)
        if leaf == "weight" and tensor.dim() == 2:
            _check_linear_shape(hf_module, tensor, shape)
        target = trt_target(hf_module)
        groups.setdefault((target.module, leaf), {})[target.part] = tensor
        kinds[target.module] = target.parallel

    for (module, leaf), parts in groups.items():
        parallel = kinds[module]
        whole = _fuse_qkv(parts, shape, module) if parallel == "qkv" else parts[None]
        for rank in ranks:
            share = shard_module(whole, parallel, shape, tp, rank.rank, vocab_rows, f"{module}.delta",
                                 is_bias=leaf == "bias")
            if leaf is None:
                rank.packed[module] = share
            else:
                rank.dense[f"{module}.{leaf}"] = share.contiguous()
            rank.parallel[module] = parallel
    return ranks


def rank_tensors(rank: RankDelta) -> dict[str, torch.Tensor]:
    """The safetensors content of one rank: M.delta.<packed key> and M.delta.<leaf> (dense)."""
    out = {}
    for module, packed in rank.packed.items():
        for key, tensor in packed.tensors().items():
            out[f"{module}.delta.{key}"] = tensor.contiguous()
    for param, tensor in rank.dense.items():
        module, leaf = hf_module_of_param(param)
        out[f"{module}.delta.{leaf}"] = tensor
    return out


def rank_manifest(rank: RankDelta, tp: int, name: str, base_fingerprint: str, shape: ModelShape,
                  vocab_rows: int) -> dict:
    """rank{r}.json: what each tensor of the rank file is and how it was split."""
    return {
        "format": LAYOUT_FORMAT, "name": name, "tp": tp, "pp": 1, "rank": rank.rank,
        "base_fingerprint": base_fingerprint, "vocab_size": shape.vocab_size, "vocab_size_padded": vocab_rows,
        "packed": {m: {"out_features": p.out_features, "in_features": p.in_features, "bits": p.bits,
                       "group_size": p.group_size, "sparse24": p.sparse24, "parallel": rank.parallel[m]}
                   for m, p in rank.packed.items()},
        "dense": {param: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                          "parallel": rank.parallel[hf_module_of_param(param)[0]]}
                  for param, t in rank.dense.items()},
    }


def write_delta_layout(ranks: list[RankDelta], out_dir: Path, name: str, base_fingerprint: str,
                       shape: ModelShape, vocab_multiple: int = 1, overwrite: bool = False) -> Path:
    """Write rank{r}.safetensors + rank{r}.json for every rank, atomically."""
    tp = len(ranks)
    vocab_rows = padded_vocab(shape.vocab_size, tp, vocab_multiple)
    with atomic_dir(Path(out_dir), overwrite) as tmp:
        for rank in ranks:
            manifest = rank_manifest(rank, tp, name, base_fingerprint, shape, vocab_rows)
            save_file(rank_tensors(rank), str(tmp / f"rank{rank.rank}.safetensors"),
                      metadata={"format": LAYOUT_FORMAT, "rank": str(rank.rank), "tp": str(tp)})
            (tmp / f"rank{rank.rank}.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return Path(out_dir)


def convert_delta(artifact_dir: Path, base_dir: Path, out_dir: Path, tp: int, vocab_multiple: int = 1,
                  overwrite: bool = False) -> Path:
    """Check the delta belongs to this base, then write its per-rank layout; all checks run before output."""
    from deltazip.format import FingerprintError, fingerprint_model, load_delta

    shape = ModelShape.from_model_dir(base_dir)
    check_tp(shape, tp)
    check_out_dir(Path(out_dir), overwrite)
    delta = load_delta(Path(artifact_dir))
    fingerprint = fingerprint_model(Path(base_dir))
    if delta.base_fingerprint != fingerprint:
        raise FingerprintError(f"{artifact_dir}: compressed against another base (fingerprint "
                            f"{delta.base_fingerprint[:12]}…, {base_dir} has {fingerprint[:12]}…)")
    ranks = shard_delta(delta.linears, delta.exact, shape, tp, vocab_multiple)
    return write_delta_layout(ranks, out_dir, delta.name, delta.base_fingerprint, shape, vocab_multiple,
                              overwrite)
