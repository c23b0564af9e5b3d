"""A compact Llama-family executor (RMSNorm, RoPE with llama3 scaling, GQA, SwiGLU) on flattened batches.

Tokens of every sequence in a step are concatenated into one [T] batch, so each linear layer runs once per
step; attention runs per sequence against that sequence's KVCache. Module names equal the Hugging Face
names (``model.layers.0.self_attn.q_proj``), so checkpoints and delta names map one to one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from deltazip.errors import DeltazipError
from deltazip.hf import ModelConfig, ModelWeights, read_config
from deltazip.runtime.kv_cache import KVCache

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def check_supported(args: ModelConfig) -> None:
    """Reject config features this executor does not implement (architecture, activation, RoPE scaling);
    warn about sliding-window attention (exact only while a sequence fits in the window)."""
    if args.model_type and args.model_type not in SUPPORTED_MODEL_TYPES:
        raise DeltazipError(f"{args.source}: unsupported model_type {args.model_type!r} "
                            f"({', '.join(SUPPORTED_MODEL_TYPES)})")
    if args.sliding_window is not None and args.sliding_window < args.max_position_embeddings:
        log.warning("%s: sliding-window attention (%d tokens) is not implemented; sequences longer than the "
                    "window attend to every earlier token", args.source, args.sliding_window)
    if args.hidden_act != "silu":
        raise DeltazipError(f"{args.source}: unsupported hidden_act {args.hidden_act!r} (only silu)")
    if args.rope_type not in SUPPORTED_ROPE_TYPES:
        raise DeltazipError(f"{args.source}: unsupported rope_type {args.rope_type!r} "
                            f"({', '.join(SUPPORTED_ROPE_TYPES)})")


def rope_inv_freq(args: ModelConfig) -> torch.Tensor:
    """Inverse RoPE frequencies [head_dim / 2] (fp32), with linear or llama3-style scaling as transformers."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = args.rope_scaling
    if scaling.get("rope_type") == "linear":
        return inv_freq / scaling["factor"]
    if scaling.get("rope_type") != "llama3":
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """x / rms(x), computed in fp32 and cast back (as transformers)."""
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * self.normalize(x)


@dataclass
class Segment:
    """One sequence's share of a flattened batch: `num_tokens` new tokens written from position `start`."""

    cache: KVCache
    start: int
    num_tokens: int


class Attention(nn.Module):
    def __init__(self, args: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        qkv_bias = args.qkv_bias or args.attention_bias  # Qwen2: q/k/v biases, no o_proj bias
        self.q_proj = nn.Linear(args.hidden_size, args.num_heads * args.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(args.num_heads * args.head_dim, args.hidden_size, bias=args.attention_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                segments: list[Segment]) -> torch.Tensor:
        num_tokens = x.shape[0]
        q = self.q_proj(x).view(num_tokens, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
        cos, sin = cos[:, None, :], sin[:, None, :]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out = torch.empty_like(q)
        offset = 0
        for seg in segments:
            rows = slice(offset, offset + seg.num_tokens)
            offset += seg.num_tokens
            seg.cache.write(self.layer_index, seg.start, k[rows].transpose(0, 1), v[rows].transpose(0, 1))
            end = seg.start + seg.num_tokens
            keys = seg.cache.keys[self.layer_index, :, :end]  # [kv_heads, end, head_dim]
            values = seg.cache.values[self.layer_index, :, :end]
            mask = None
            if seg.num_tokens > 1:  # query i sits at position start + i and sees keys 0..start + i
                query_pos = torch.arange(seg.start, end, device=x.device)[:, None]
                mask = torch.arange(end, device=x.device)[None, :] <= query_pos
            attended = F.scaled_dot_product_attention(
                q[rows].transpose(0, 1)[None], keys[None], values[None], attn_mask=mask,
                enable_gqa=self.num_heads != self.num_kv_heads)
            out[rows] = attended[0].transpose(0, 1)
        return self.o_proj(out.reshape(num_tokens, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelConfig) -> None:
        super().__init__()
        bias = args.mlp_bias
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, layer_index)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                segments: list[Segment]) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, segments)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBody(nn.Module):
    """`model.*` of the Hugging Face layout: embeddings, decoder layers, final norm."""

    def __init__(self, args: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class BatchMapping:
    """Which delta slot each row of the current batch uses ([rows] int32, -1 = base); read by delta layers."""

    def __init__(self) -> None:
        self.row_slot: torch.Tensor | None = None


class Llama(nn.Module):
    def __init__(self, args: ModelConfig) -> None:
        super().__init__()
        self.args = args
        self.model = LlamaBody(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.mapping = BatchMapping()
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)

    def forward(self, tokens: torch.Tensor, segments: list[Segment], row_slot: torch.Tensor | None = None,
                all_logits: bool = False) -> torch.Tensor:
        """tokens [T] of the segments in order → logits [len(segments), V] of each segment's last token
        (or [T, V] with all_logits). row_slot [T] int32 picks each row's delta slot (-1 / None = base)."""
        positions = torch.cat([torch.arange(s.start, s.start + s.num_tokens) for s in segments])
        positions = positions.to(tokens.device)
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        dtype = self.lm_head.weight.dtype
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        self.mapping.row_slot = row_slot
        try:
            x = self.model.embed_tokens(tokens)
            for layer in self.model.layers:
                x = layer(x, cos, sin, segments)
            if not all_logits:
                last_rows = torch.tensor([s.num_tokens for s in segments], device=tokens.device).cumsum(0) - 1
                x = x[last_rows]
                if row_slot is not None:
                    self.mapping.row_slot = row_slot[last_rows]
            logits = self.lm_head(self.model.norm(x))
        finally:
            self.mapping.row_slot = None
        for seg in segments:
            seg.cache.length = seg.start + seg.num_tokens
        return logits

    def new_cache(self, capacity_tokens: int) -> KVCache:
        args, weight = self.args, self.lm_head.weight
        return KVCache(args.num_layers, args.num_kv_heads, capacity_tokens, args.head_dim, weight.dtype,
                       weight.device)


def load_llama(model_dir: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu") -> Llama:
    """Build a Llama from a Hugging Face directory (config.json + *.safetensors); no pickle is ever loaded."""
    model_dir = Path(model_dir)
    args = read_config(model_dir)
    check_supported(args)
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    with torch.device("meta"):
        model = Llama(args)
    state = {k: v.to(torch_dtype) for k, v in ModelWeights(model_dir).load(device).items()
             if not k.endswith("rotary_emb.inv_freq")}
    if args.tie_word_embeddings or "lm_head.weight" not in state:
        state["lm_head.weight"] = state.get("model.embed_tokens.weight")
    expected = set(model.state_dict())
    missing = sorted(k for k in expected if state.get(k) is None)
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise DeltazipError(f"{model_dir}: weights do not match the config (missing: {missing[:3]}, "
                            f"unexpected: {unexpected[:3]})")
    model.load_state_dict(state, assign=True)
    model.inv_freq = rope_inv_freq(args).to(device)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval().requires_grad_(False)
