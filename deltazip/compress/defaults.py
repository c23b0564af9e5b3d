"""Compression defaults that scale with the model: calibration size, tuning steps and their time budget.

The CompressConfig defaults (256 windows of 32 tokens, 100 Adam steps per block, no time budget) are
tuned to the embedded tiny family. For a larger model every setting still at its default is replaced by
the row of SIZE_TABLE for the target's parameter count; a setting given explicitly (flag or deltazip.toml,
with a value other than the default) is kept. The manifest records the settings actually used.

| parameters | n_samples | seq_len | tune_steps | tune_seconds (per block) | e.g. |
|---|---|---|---|---|---|
| < 100 M | 256 | 32 | 100 | none | the tiny family |
| < 3 B | 128 | 512 | 50 | 120 | Llama-3.2-1B, Qwen2-1.5B |
| < 10 B | 128 | 2048 | 20 | 180 | Llama-2-7B, Llama-3-8B, Mistral-7B |
| ≥ 10 B | 128 | 2048 | 10 | 240 | Llama-2-13B |

Rationale: OBS needs the Hessian of each linear's inputs well conditioned (tokens ≫ hidden size: 128 ×
2048 = 262 k tokens for hidden 4096–5120, as GPTQ/SparseGPT use), and long windows so positions beyond 32
are calibrated; scale tuning costs a forward + backward of the block per step, so the steps shrink with
the block size and a time budget caps them on slow hardware.
"""

from __future__ import annotations

import dataclasses
import math

from deltazip.config import CompressConfig

SCALED = ("n_samples", "seq_len", "tune_steps", "tune_seconds")
# (upper bound on parameters, values for SCALED)
SIZE_TABLE = (
    (100e6, {"n_samples": 256, "seq_len": 32, "tune_steps": 100, "tune_seconds": 0.0}),
    (3e9, {"n_samples": 128, "seq_len": 512, "tune_steps": 50, "tune_seconds": 120.0}),
    (10e9, {"n_samples": 128, "seq_len": 2048, "tune_steps": 20, "tune_seconds": 180.0}),
    (math.inf, {"n_samples": 128, "seq_len": 2048, "tune_steps": 10, "tune_seconds": 240.0}),
)


def defaults_for(num_params: int) -> dict:
    """The SIZE_TABLE row for a model of `num_params` parameters."""
    return next(values for bound, values in SIZE_TABLE if num_params < bound)


def scale_defaults(settings: CompressConfig, num_params: int) -> CompressConfig:
    """`settings` with every SCALED field still at its CompressConfig default set from SIZE_TABLE."""
    defaults = CompressConfig()
    row = defaults_for(num_params)
    changes = {k: v for k, v in row.items() if getattr(settings, k) == getattr(defaults, k)}
    return dataclasses.replace(settings, **changes) if changes else settings
