"""One reader of a Hugging Face model directory: typed config.json, lazy safetensors weights, model helpers.

`read_config` parses both rope spellings (transformers 5 `rope_parameters`; transformers 4 top-level
`rope_theta` + `rope_scaling`); `ModelWeights` reads one `*.safetensors` file or the shards named by
`model.safetensors.index.json`. Nothing here is loaded with pickle or remote code.
"""

from __future__ import annotations

import json
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from deltazip.errors import DeltazipError

if TYPE_CHECKING:
    from torch import nn

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own cap on the JSON header
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


# ---- config.json ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelConfig:
    """The architecture fields of an HF decoder's config.json that deltazip uses (one parse for all)."""

    model_type: str
    architectures: tuple[str, ...]
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)  # rope_type + its parameters; empty = default RoPE
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # every attention projection has a bias (Llama's attention_bias)
    qkv_bias: bool = False  # q/k/v have biases, o_proj none (Qwen2); implied by attention_bias
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral-style sliding-window attention span (None: full attention)
    hidden_act: str = "silu"
    dtype: str | None = None  # the checkpoint's dtype name ("float16", ...), None when not recorded
    source: str = CONFIG  # where it was read from, for error messages
    raw: dict = field(default_factory=dict, repr=False, compare=False)  # the whole config.json

    @property
    def rope_type(self) -> str:
        return self.rope_scaling.get("rope_type", "default")


def _field(cfg: dict, key: str, source: str, kind: type, default=None):
    """cfg[key] as `kind`; a missing required key or a wrong type names the key and the file."""
    value = cfg.get(key)
    if value is None:
        if default is None:
            raise DeltazipError(f"{source}: missing '{key}'")
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DeltazipError(f"{source}: '{key}' must be {kind.__name__}, not {value!r}")
    return value


def rope_fields(cfg: dict, source: str = CONFIG) -> tuple[float, dict]:
    """(rope_theta, rope_scaling) from transformers 5 `rope_parameters`, or 4's `rope_theta` + `rope_scaling`.

    rope_scaling is {} for default RoPE, else the parameters with "rope_type" set (v4 files may say "type").
    """
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise DeltazipError(f"{source}: 'rope_parameters' / 'rope_scaling' must be an object, not {rope!r}")
    rope = dict(rope)
    theta = rope.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0
    if not isinstance(theta, (int, float)) or isinstance(theta, bool):
        raise DeltazipError(f"{source}: 'rope_theta' must be a number, not {theta!r}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    return float(theta), ({} if rope_type == "default" else {**rope, "rope_type": rope_type})


def _sliding_window(cfg: dict) -> int | None:
    """The sliding-window span when the config turns it on (Mistral: `sliding_window`; Qwen2 also needs
    `use_sliding_window`), else None."""
    window = cfg.get("sliding_window")
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        return None
    if cfg.get("model_type") == "qwen2" and not cfg.get("use_sliding_window", False):
        return None
    return window


def parse_config(cfg: dict, source: str = CONFIG) -> ModelConfig:
    """A config.json dict → ModelConfig; missing or mistyped fields are errors naming the key and `source`."""
    if not isinstance(cfg, dict):
        raise DeltazipError(f"{source}: expected a JSON object")
    heads = _field(cfg, "num_attention_heads", source, int)
    hidden = _field(cfg, "hidden_size", source, int)
    theta, scaling = rope_fields(cfg, source)
    return ModelConfig(
        model_type=_field(cfg, "model_type", source, str, ""),
        architectures=tuple(_field(cfg, "architectures", source, list, [])),
        vocab_size=_field(cfg, "vocab_size", source, int),
        hidden_size=hidden,
        intermediate_size=_field(cfg, "intermediate_size", source, int),
        num_layers=_field(cfg, "num_hidden_layers", source, int),
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or hidden // heads,
        rms_norm_eps=_field(cfg, "rms_norm_eps", source, float, 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=_field(cfg, "max_position_embeddings", source, int, 2048),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", False)),
        qkv_bias=bool(cfg.get("attention_bias", False)) or cfg.get("model_type") == "qwen2",
        sliding_window=_sliding_window(cfg),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        hidden_act=_field(cfg, "hidden_act", source, str, "silu"),
        dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
        source=source,
        raw=cfg,
    )


def config_json(model_dir: str | Path) -> dict:
    """The raw config.json of a model directory (checked to exist and to be a JSON object)."""
    path = Path(model_dir) / CONFIG
    if not path.is_file():
        raise DeltazipError(f"{model_dir}: no config.json (not a Hugging Face model directory)")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DeltazipError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise DeltazipError(f"{path}: expected a JSON object")
    return cfg


def read_config(model_dir: str | Path) -> ModelConfig:
    """The typed config of an HF model directory."""
    return parse_config(config_json(model_dir), str(Path(model_dir) / CONFIG))


# ---- safetensors weights --------------------------------------------------------------------------------

def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, with data offsets made absolute within the file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise DeltazipError(f"{path}: truncated safetensors file")
        (length,) = struct.unpack("<Q", raw)
        if length > MAX_HEADER_BYTES:
            raise DeltazipError(f"{path}: safetensors header too large ({length} bytes)")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DeltazipError(f"{path}: unreadable safetensors header") from None
    header.pop("__metadata__", None)
    for info in header.values():
        info["data_offsets"] = [8 + length + o for o in info["data_offsets"]]
    return header


class ModelWeights:
    """Lazy, read-only view of the safetensors weights of an HF model directory (sharded or not)."""

    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir)
        index_path = self.dir / INDEX
        weight_map = _read_index(index_path) if index_path.is_file() else None
        files = sorted(set(weight_map.values())) if weight_map else sorted(
            p.name for p in self.dir.glob("*.safetensors"))
        if not files:
            raise DeltazipError(f"{self.dir}: no *.safetensors weights (pickle checkpoints are not read)")
        for file in files:
            if not (self.dir / file).is_file():
                raise DeltazipError(f"{index_path}: names shard {file}, which is not in {self.dir}")
        self.files = files
        # name -> (file, dtype, shape, begin, end) with absolute byte offsets in the file
        self.entries: dict[str, tuple[str, str, list[int], int, int]] = {}
        for file in files:
            for name, info in read_safetensors_header(self.dir / file).items():
                if name in self.entries:
                    raise DeltazipError(f"{self.dir}: tensor {name} is in two shards, "
                                        f"{self.entries[name][0]} and {file}")
                self.entries[name] = (file, info["dtype"], info["shape"], *info["data_offsets"])
        for name, file in (weight_map or {}).items():
            if name not in self.entries or self.entries[name][0] != file:
                raise DeltazipError(f"{index_path}: tensor {name} is not in its shard {file}")

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return sorted(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name][2])

    def dtype(self, name: str) -> torch.dtype:
        file, code = self.entries[name][:2]
        if code not in SAFETENSORS_DTYPES:
            raise DeltazipError(f"{self.dir / file}: tensor {name} has unsupported dtype {code}")
        return SAFETENSORS_DTYPES[code]

    def get(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """One tensor (or a slice of its leading rows), read from the file straight into its own memory
        (no mapping, no second copy: resident memory is the tensor's bytes)."""
        file, _, shape, begin, end = self.entries[name]
        dtype = self.dtype(name)
        shape = list(shape)
        if rows is not None and shape:
            start, stop, _ = rows.indices(shape[0])
            row_bytes = (end - begin) // max(shape[0], 1)
            begin, end, shape[0] = begin + start * row_bytes, begin + max(stop, start) * row_bytes, max(
                stop - start, 0)
        out = torch.empty(end - begin, dtype=torch.uint8)
        with open(self.dir / file, "rb") as f:
            f.seek(begin)
            if f.readinto(memoryview(out.numpy())) != end - begin:
                raise DeltazipError(f"{self.dir / file}: truncated data for tensor {name}")
        if sys.byteorder != "little":  # safetensors is little-endian: let the library swap the bytes
            from safetensors import safe_open

            with safe_open(str(self.dir / file), framework="pt") as f:
                whole = f.get_tensor(name)
            return (whole if rows is None else whole[rows]).clone()
        return out.view(dtype).reshape(shape)

    def load(self, device: str = "cpu") -> dict[str, torch.Tensor]:
        """Every tensor, read one file at a time straight onto `device`."""
        from safetensors.torch import load_file

        state: dict[str, torch.Tensor] = {}
        for file in self.files:
            state.update({k: v for k, v in load_file(self.dir / file, device=str(device)).items()
                          if self.entries[k][0] == file})
        return state


def _read_index(path: Path) -> dict[str, str]:
    """The weight_map (tensor name → shard file) of a model.safetensors.index.json."""
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise DeltazipError(f"{path}: expected a JSON object with a 'weight_map'") from None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise DeltazipError(f"{path}: 'weight_map' must map tensor names to file names")
    for file in set(weight_map.values()):
        if Path(file).name != file:
            raise DeltazipError(f"{path}: shard {file!r} is not a file name in the model directory")
    return weight_map


# ---- transformers models ----------------------------------------------------------------------------------

def load_model(model_dir: str | Path) -> tuple[nn.Module, object]:
    """An HF causal LM (fp32, eval mode, CPU) and its tokenizer from a model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / CONFIG).is_file():
        raise DeltazipError(f"not a model directory (no config.json): {model_dir}")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model.eval(), tokenizer


def unique_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters by name, tied ones once (the first name wins, as in named_parameters)."""
    return dict(model.named_parameters())


def fp16_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters stored as fp16 (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters()) * 2


def replace_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Overwrite the named parameters of `model` in place with absolute weights from `state`."""
    params = dict(model.named_parameters(remove_duplicate=False))
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise DeltazipError(f"weights do not match the model: unknown parameter '{unknown[0]}'")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].dtype))
    return model


def add_delta(model: nn.Module, delta: dict[str, torch.Tensor]) -> nn.Module:
    """Add a dense delta (param name → Δ) to `model`'s weights in place; tied weights get it once."""
    params = dict(model.named_parameters(remove_duplicate=False))
    done: set[int] = set()
    with torch.no_grad():
        for name, value in delta.items():
            if name not in params:
                raise DeltazipError(f"delta does not match the base: unknown parameter '{name}'")
            param = params[name]
            if id(param) in done:
                continue
            if tuple(param.shape) != tuple(value.shape):
                raise DeltazipError(
                    f"delta '{name}' has shape {tuple(value.shape)}, base has {tuple(param.shape)}")
            param.add_(value.to(param.dtype))
            done.add(id(param))
    return model
