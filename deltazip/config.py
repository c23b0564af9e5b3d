"""deltazip.toml → typed, frozen dataclasses. Errors name the key and the file."""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from deltazip.errors import ConfigError

CONFIG_NAME = "deltazip.toml"


@dataclass(frozen=True)
class BaseSpec:
    """A named base model: a Hugging Face model directory."""

    path: str


@dataclass(frozen=True)
class FamilyConfig:
    """The embedded tiny model family (`deltazip family create`)."""

    dir: str = ".deltazip/family"
    preset: str = "tiny"
    seed: int = 0


@dataclass(frozen=True)
class StoreConfig:
    """Where compressed delta artifacts live (one `NAME.dz/` directory each)."""

    deltas: str = ".deltazip/deltas"


@dataclass(frozen=True)
class CompressConfig:
    """Defaults for `deltazip compress`."""

    bits: int = 2
    sparsity: str = "2:4"
    group_size: int = -1
    calib: str = ""  # empty: the family's calib.jsonl
    n_samples: int = 256
    seq_len: int = 32
    damp: float = 0.01
    block_size: int = 128
    lossless: str = "zstd"
    tune_steps: int = 100  # Adam steps fitting each block's scales to the fine-tune's output (0: off)
    tune_seconds: float = 0.0  # time budget of one block's (or the head's) tuning; 0: none
    distill_steps: int = 300  # budgeted runs: end-to-end Adam steps (compress/distill.py); 0: off
    target_ratio: float = 0.0  # > 0: allocate bits/sparsity per tensor so fp16 bytes / artifact bytes ≥ this
    budget_bytes: int = 0  # > 0: an explicit whole-artifact byte budget instead (wins over target_ratio)
    any_precision: bool = False  # store nested bitplanes: loadable at every precision 2..bits
    device: str = "auto"  # auto | cpu | cuda | cuda:N — where calibration, Hessians, OBS and tuning run

    def __post_init__(self) -> None:
        if self.target_ratio < 0 or self.budget_bytes < 0:
            raise ValueError("target_ratio and budget_bytes must be ≥ 0 (0: off)")
        if self.bits not in (2, 3, 4, 8, 16):
            raise ValueError(f"bits must be 2, 3, 4, 8 or 16, not {self.bits}")
        if self.lossless not in ("zstd", "none"):
            raise ValueError(f"lossless must be 'zstd' or 'none', not {self.lossless!r}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size must be -1 or positive, not {self.group_size}")


@dataclass(frozen=True)
class RuntimeConfig:
    """The generation engine and its delta pool."""

    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "float32"  # float32 | float16 | bfloat16
    kernel: str = "auto"  # auto | torch | triton
    max_batch_size: int = 16
    delta_slots: int = 8  # packed deltas resident on the device at once
    host_cache_bytes: int = 1 << 30  # decoded artifacts kept in host memory (LRU)
    kv_budget_tokens: int = 16384  # KV-cache tokens across all running sequences
    max_context: int = 256
    threads: int = 0  # torch/OpenMP threads of compress, eval, generate and the served model; 0: auto
    # any-precision variants (deltazip/runtime/precision.py): max | fixed | pressure | popularity
    precision_policy: str = "max"
    precision_bits: int = 0  # fixed: install at this precision where the variant stores it
    precision_pressure: float = 0.75  # pressure: host tier fill fraction from which the narrowest is used
    precision_hot: int = 4  # popularity: the most requested variants that get the widest precision
    # the baseline of benchmarks/multitenant.py (deltazip/runtime/full_swap.py): "full_swap" serves merged
    # fine-tunes (full_models: a directory of NAME/ HF model dirs), at most full_resident of them loaded
    # (LRU swap from disk on a miss), one model per forward pass; "deltas" (default) is deltazip itself
    mode: str = "deltas"
    full_models: str = ""
    full_resident: int = 1

    def __post_init__(self) -> None:
        if self.mode not in ("deltas", "full_swap"):
            raise ValueError(f"mode must be deltas or full_swap, not {self.mode!r}")
        if self.mode == "full_swap" and (not self.full_models or self.full_resident < 1):
            raise ValueError("mode full_swap needs full_models (a directory of merged fine-tunes) and "
                             "full_resident >= 1")
        if self.precision_policy not in ("max", "fixed", "pressure", "popularity"):
            raise ValueError(f"precision_policy must be max, fixed, pressure or popularity, not "
                             f"{self.precision_policy!r}")
        if self.threads < 0:
            raise ValueError(f"threads must be 0 (auto: the CPUs this process may use) or positive, not "
                             f"{self.threads}")


@dataclass(frozen=True)
class BuildConfig:
    """Defaults for `deltazip build`."""

    base: str = "tiny"
    deltas: str = ".deltazip/deltas"
    out: str = ".deltazip/build"
    backend: str = "torch"  # torch | trtllm
    tp: int = 1

    def __post_init__(self) -> None:
        if self.backend not in ("torch", "trtllm"):
            raise ValueError(f"backend must be 'torch' or 'trtllm', not {self.backend!r}")


@dataclass(frozen=True)
class ServeConfig:
    """Defaults for `deltazip serve`; servers bind loopback unless told otherwise."""

    host: str = "127.0.0.1"  # tritonserver's HTTP, gRPC and metrics (keep its HTTP on loopback)
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    openai_host: str = "127.0.0.1"  # the OpenAI-compatible front (the one endpoint meant to be exposed)
    openai_port: int = 8080  # 0 = a free port; -1 = no front


@dataclass(frozen=True)
class Config:
    """The whole deltazip.toml. Relative paths are resolved against `root` (the file's directory)."""

    root: str = "."
    family: FamilyConfig = field(default_factory=FamilyConfig)
    bases: dict[str, BaseSpec] = field(default_factory=dict)
    store: StoreConfig = field(default_factory=StoreConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    build: BuildConfig = field(default_factory=BuildConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def path(self, value: str) -> Path:
        """Resolve a path from the config relative to the config file's directory."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else Path(self.root) / p

    def resolve_model(self, name_or_dir: str) -> Path:
        """A base/target given as a name from [bases] or as a model directory."""
        if name_or_dir in self.bases:
            return self.path(self.bases[name_or_dir].path)
        p = Path(name_or_dir).expanduser()
        if p.is_dir():
            return p
        known = ", ".join(sorted(self.bases)) or "none"
        raise ConfigError(
            f"'{name_or_dir}' is neither a model directory nor a base in [bases] (known: {known})"
        )


_SECTIONS = {
    "family": FamilyConfig,
    "store": StoreConfig,
    "compress": CompressConfig,
    "runtime": RuntimeConfig,
    "build": BuildConfig,
    "serve": ServeConfig,
}


def _check_type(value: object, hint: object) -> bool:
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if isinstance(hint, types.UnionType):
        return any(_check_type(value, h) for h in typing.get_args(hint))
    return True


def _build(cls: type, table: object, where: str, source: str):
    """Instantiate dataclass `cls` from a TOML table, rejecting unknown keys and wrong types."""
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [{where}] must be a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in table.items():
        if key not in names:
            raise ConfigError(f"{source}: unknown key '{where}.{key}' (known: {', '.join(sorted(names))})")
        if not _check_type(value, hints[key]):
            tname = getattr(hints[key], "__name__", str(hints[key]))
            raise ConfigError(
                f"{source}: '{where}.{key}' must be {tname}, not {type(value).__name__} ({value!r})"
            )
        kwargs[key] = float(value) if hints[key] is float else value
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigError(f"{source}: [{where}] {e}") from None


def parse_config(data: dict, root: str, source: str) -> Config:
    """Turn a parsed TOML document into a Config."""
    kwargs: dict[str, object] = {"root": root}
    for key, value in data.items():
        if key == "bases":
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: [bases] must be a table of tables")
            kwargs["bases"] = {n: _build(BaseSpec, t, f"bases.{n}", source) for n, t in value.items()}
        elif key in _SECTIONS:
            kwargs[key] = _build(_SECTIONS[key], value, key, source)
        else:
            known = ", ".join(sorted([*_SECTIONS, "bases"]))
            raise ConfigError(f"{source}: unknown section '{key}' (known: {known})")
    return Config(**kwargs)


def find_config(start: Path | None = None) -> Path | None:
    """The nearest deltazip.toml in `start` or its parents."""
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / CONFIG_NAME).is_file():
            return d / CONFIG_NAME
    return None


def load_config(path: str | Path | None = None) -> Config:
    """Load an explicit config file, else the nearest deltazip.toml, else built-in defaults."""
    if path is None:
        found = find_config()
        if found is None:
            return Config(root=str(Path.cwd()))
        path = found
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    return parse_config(data, str(path.resolve().parent), str(path))
