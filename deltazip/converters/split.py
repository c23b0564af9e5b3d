"""Tensor-parallel split, vocab padding and GQA kv-head duplication, once for dense and packed tensors.

The rules mirror modelopt's TensorRT-LLM exporter (``postprocess._split_model_config_for_tp``,
``layer_utils.dup_kv_weight``, ``model_config_utils.pad_weights``): column-parallel weights are zero-padded to
a multiple of tp on dim 0 and chunked on dim 0; row-parallel weights are chunked on dim 1; q, k, v are split
separately (k and v heads repeated ``tp / kv_heads`` times each when tp exceeds the kv heads) and each rank
holds ``[q_r; k_r; v_r]``. A column-parallel split is a list of source rows per rank (-1: a zero pad row),
so one index rule serves dense tensors and every packed tensor alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from deltazip.converters.names import SUPPORTED
from deltazip.errors import DeltazipError
from deltazip.hf import ModelConfig, config_json, parse_config
from deltazip.packed import PackedLinear, codes_per_word, pack_codes, unpack_codes

SUPPORTED_TP = (1, 2, 4, 8)
PAD_ROW = -1
# 2:4 positions (0, 1) in every group, 16 two-bit slots per word: the metadata of an all-zero padded row.
_PAD_META_WORD = 0x44444444
_ROW_CHUNK = 1024  # rows unpacked at a time when a row-parallel split is not word aligned


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama model that decide its TensorRT-LLM layout (a view of hf.ModelConfig)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    vocab_size: int
    tie_word_embeddings: bool = False

    @classmethod
    def from_config(cls, config: ModelConfig) -> ModelShape:
        return cls(config.hidden_size, config.intermediate_size, config.num_layers, config.num_heads,
                   config.num_kv_heads, config.head_dim, config.vocab_size, config.tie_word_embeddings)

    @classmethod
    def from_hf_config(cls, config: dict, source: str = "config.json") -> ModelShape:
        """Read an HF config dict; anything but a Llama, Mistral or Qwen2 causal LM is a clear error."""
        archs = config.get("architectures") or []
        if not any(SUPPORTED.get(a) == config.get("model_type") for a in archs):
            raise DeltazipError(
                f"{source}: unsupported architecture {archs or '?'} (model_type "
                f"{config.get('model_type')!r}); TensorRT-LLM conversion supports {', '.join(SUPPORTED)} "
                "only"
            )
        return cls.from_config(parse_config(config, source))

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> ModelShape:
        return cls.from_hf_config(config_json(model_dir), str(Path(model_dir) / "config.json"))


def check_tp(shape: ModelShape, tp: int) -> None:
    """Reject a tensor-parallel size the exporter cannot split this model into."""
    if tp not in SUPPORTED_TP:
        raise DeltazipError(f"tp must be one of {SUPPORTED_TP}, not {tp}")
    for name, value in (("num_attention_heads", shape.num_heads), ("hidden_size", shape.hidden_size),
                        ("intermediate_size", shape.intermediate_size)):
        if value % tp:
            raise DeltazipError(f"tp {tp} does not divide {name} {value}")
    kv = shape.num_kv_heads
    if kv % tp and tp % kv:
        raise DeltazipError(f"num_key_value_heads {kv} neither divides nor is divisible by tp {tp}")


def padded_vocab(vocab_size: int, tp: int, multiple: int = 1) -> int:
    """Vocab rows after the exporter's padding: to `multiple` (64 for AWQ) first, then to a multiple of tp."""
    size = -(-vocab_size // multiple) * multiple
    return -(-size // tp) * tp


def column_rows(out_features: int, tp: int, rank: int, padded_to: int | None = None) -> torch.Tensor:
    """Source rows of a column-parallel (or vocab) shard: pad to `padded_to` (or a multiple of tp), chunk."""
    total = padded_to if padded_to is not None else -(-out_features // tp) * tp
    per_rank = total // tp
    rows = torch.arange(rank * per_rank, (rank + 1) * per_rank)
    return torch.where(rows < out_features, rows, PAD_ROW)


def qkv_rows(shape: ModelShape, tp: int, rank: int) -> torch.Tensor:
    """Rows of cat(q, k, v) (HF, no duplication) that form rank `rank`'s fused qkv, kv heads duplicated."""
    hd, n_q, n_kv = shape.head_size, shape.num_heads, shape.num_kv_heads
    q_heads = torch.arange(rank * n_q // tp, (rank + 1) * n_q // tp)
    kv_eff = max(n_kv, tp)  # kv heads after dup_kv_weight's repeat_interleave
    reps = kv_eff // n_kv
    kv_heads = torch.arange(rank * kv_eff // tp, (rank + 1) * kv_eff // tp) // reps
    within = torch.arange(hd)

    def rows_of(heads: torch.Tensor, offset: int) -> torch.Tensor:
        return (offset + heads[:, None] * hd + within[None, :]).reshape(-1)

    return torch.cat([rows_of(q_heads, 0), rows_of(kv_heads, n_q * hd), rows_of(kv_heads, (n_q + n_kv) * hd)])


def row_cols(in_features: int, tp: int, rank: int) -> tuple[int, int]:
    """The [start, stop) input columns of a row-parallel shard."""
    per_rank = in_features // tp
    return rank * per_rank, (rank + 1) * per_rank


# ---- dense tensors -------------------------------------------------------------------------------------


def take_rows_dense(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """weight[rows] with zero rows where rows == PAD_ROW."""
    out = weight[rows.clamp(min=0)].clone()
    out[rows == PAD_ROW] = 0
    return out


def slice_cols_dense(weight: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    return weight[:, start:stop].contiguous()


# ---- packed deltas -------------------------------------------------------------------------------------


def cat_packed(parts: list[PackedLinear], what: str) -> PackedLinear:
    """Concatenate packed deltas along out_features (all must share bits, group size and sparsity)."""
    first = parts[0]
    for p in parts[1:]:
        if (p.bits, p.group_size, p.sparse24, p.in_features) != (first.bits, first.group_size, first.sparse24,
                                                                 first.in_features):
            raise DeltazipError(f"{what}: fused parts differ in bits/group size/2:4/in_features; cannot fuse")
    meta = torch.cat([p.meta for p in parts]) if first.sparse24 else None
    return PackedLinear(sum(p.out_features for p in parts), first.in_features, first.bits, first.group_size,
                        first.sparse24, torch.cat([p.qweight for p in parts]), meta,
                        torch.cat([p.scales for p in parts]), torch.cat([p.zeros for p in parts]))


def zero_packed(out_features: int, like: PackedLinear) -> PackedLinear:
    """An all-zero packed delta shaped like `like` with `out_features` rows (a fused part left unchanged)."""
    return take_rows_packed(like, torch.full((out_features,), PAD_ROW))


def take_rows_packed(packed: PackedLinear, rows: torch.Tensor) -> PackedLinear:
    """Select output rows of a packed delta (codes, 2:4 metadata, scales, zeros); PAD_ROW rows are zero."""
    src = rows.clamp(min=0)
    pad = rows == PAD_ROW

    def take(t: torch.Tensor, fill: int | float) -> torch.Tensor:
        out = t.index_select(0, src)
        out[pad] = fill
        return out

    meta = take(packed.meta, _PAD_META_WORD) if packed.sparse24 else None
    return PackedLinear(len(rows), packed.in_features, packed.bits, packed.group_size, packed.sparse24,
                        take(packed.qweight, 0), meta, take(packed.scales, 0.0), take(packed.zeros, 0.0))


def slice_cols_packed(packed: PackedLinear, start: int, stop: int, what: str) -> PackedLinear:
    """Input columns [start, stop) of a packed delta, keeping 2:4 groups, metadata words and scale groups."""
    width, group = stop - start, packed.group_size
    if packed.sparse24 and (start % 32 or width % 32):
        raise DeltazipError(
            f"{what}: a row-parallel shard of {width} input columns splits 2:4 metadata words "
            f"(need a multiple of 32 per rank; in_features {packed.in_features})"
        )
    if width % group == 0 and start % group == 0:
        scales = packed.scales[:, start // group: stop // group]
        zeros = packed.zeros[:, start // group: stop // group]
        local_group = group
    elif group % width == 0:  # one scale group spans several ranks: each keeps that group's scale
        scales = packed.scales[:, start // group: start // group + 1]
        zeros = packed.zeros[:, start // group: start // group + 1]
        local_group = width
    else:
        raise DeltazipError(
            f"{what}: a row-parallel shard of {width} input columns splits scale groups of {group} "
            "(the shard must hold whole groups, or lie inside one group)"
        )
    code_start, code_stop = (start // 2, stop // 2) if packed.sparse24 else (start, stop)
    qweight = _slice_codes(packed.qweight, packed.bits, packed.n_codes, code_start, code_stop)
    meta = packed.meta[:, start // 32: stop // 32].contiguous() if packed.sparse24 else None
    return PackedLinear(packed.out_features, width, packed.bits, local_group, packed.sparse24, qweight, meta,
                        scales.contiguous(), zeros.contiguous())


def _slice_codes(words: torch.Tensor, bits: int, n_codes: int, start: int, stop: int) -> torch.Tensor:
    """Codes [start, stop) of every row, repacked from code 0; word-aligned cuts are a plain word slice."""
    vpw = codes_per_word(bits)
    if start % vpw == 0 and (stop % vpw == 0 or stop == n_codes):
        return words[:, start // vpw: -(-stop // vpw)].contiguous()
    chunks = []
    for row0 in range(0, words.shape[0], _ROW_CHUNK):  # bounded int64 temporaries
        codes = unpack_codes(words[row0: row0 + _ROW_CHUNK], bits, n_codes)[:, start:stop]
        chunks.append(pack_codes(codes, bits))
    return torch.cat(chunks)
