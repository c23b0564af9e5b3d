"""Merge a delta into its base (docs/FORMAT.md, "Exactness of exact tensors", "Base fingerprint").

decompress → dense deltas; merge_tensor → base + delta; apply_delta → a full HF model directory.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from deltazip.errors import ArtifactError, FingerprintError
from deltazip.format.artifact import DeltaArtifact, load_delta
from deltazip.format.manifest import fingerprint_model
from deltazip.fsutil import atomic_dir
from deltazip.hf import ModelWeights
from deltazip.packed import PackedLinear


def decompress(delta: DeltaArtifact) -> dict[str, torch.Tensor]:
    """Dense deltas keyed by HF parameter name (linears as float32, exact deltas in their stored dtype)."""
    out = {f"{name}.weight": packed.dequantize(torch.float32) for name, packed in delta.linears.items()}
    out.update(delta.exact)
    return out


def merge_tensor(base: torch.Tensor, delta: torch.Tensor, exact: bool) -> torch.Tensor:
    """base + delta in base's dtype; exact deltas are added in float64 so the sum reproduces the target."""
    if exact:
        return (base.double() + delta.double()).to(base.dtype)
    return (base.float() + delta.float()).to(base.dtype)


def apply_delta(base_dir: str | Path, delta: DeltaArtifact | str | Path, out_dir: str | Path,
                overwrite: bool = False) -> Path:
    """Write base + delta as a full HF model directory (config, tokenizer copied from base), atomically."""
    from safetensors.torch import save_file

    if not isinstance(delta, DeltaArtifact):
        delta = load_delta(delta)
    base_dir = Path(base_dir)
    fingerprint = fingerprint_model(base_dir)
    if fingerprint != delta.base_fingerprint:
        raise FingerprintError(f"delta {delta.name!r} was made for base {delta.base_fingerprint[:19]}…, "
                               f"not {base_dir} ({fingerprint[:19]}…)")
    weights = ModelWeights(base_dir)
    params = {f"{n}.weight": (p, False) for n, p in delta.linears.items()}
    params.update({n: (t, True) for n, t in delta.exact.items()})
    for name, (value, _) in params.items():
        is_linear = isinstance(value, PackedLinear)
        shape = (value.out_features, value.in_features) if is_linear else tuple(value.shape)
        if name not in weights.entries or weights.shape(name) != shape:
            raise ArtifactError(f"delta {delta.name!r} does not fit {base_dir}: tensor {name} missing or of "
                                f"another shape")
    with atomic_dir(out_dir, overwrite) as tmp:
        for file in weights.files:
            merged = {}
            for name, entry in weights.entries.items():
                if entry[0] != file:
                    continue
                base = weights.get(name)
                if name in params:
                    value, exact = params[name]
                    dense = value.dequantize(torch.float32) if isinstance(value, PackedLinear) else value
                    base = merge_tensor(base, dense, exact)
                merged[name] = base.contiguous()
            save_file(merged, str(tmp / file), metadata={"format": "pt"})
        for item in base_dir.iterdir():
            if item.is_file() and item.suffix != ".safetensors":
                shutil.copy2(item, tmp / item.name)
    return Path(out_dir)
