"""Read back a TensorRT-LLM checkpoint (config.json + rank{r}.safetensors) and a per-rank delta layout."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from deltazip.converters.delta import LAYOUT_FORMAT, RankDelta
from deltazip.errors import DeltazipError
from deltazip.packed import PACKED_KEYS, PackedLinear


@dataclass(frozen=True)
class TrtllmCheckpoint:
    """A TensorRT-LLM checkpoint directory: its config and one safetensors file per rank."""

    path: Path
    config: dict

    @property
    def tp(self) -> int:
        return self.config.get("mapping", {}).get("tp_size", 1)

    def rank_path(self, rank: int) -> Path:
        return self.path / f"rank{rank}.safetensors"

    def load_rank(self, rank: int) -> dict[str, torch.Tensor]:
        """Every tensor of one rank, by TRT-LLM weight name."""
        return load_file(str(self.rank_path(rank)))

    def tensor_names(self, rank: int = 0) -> list[str]:
        with safe_open(str(self.rank_path(rank)), "pt") as f:
            return list(f.keys())


def read_trtllm_checkpoint(path: Path) -> TrtllmCheckpoint:
    """Open a checkpoint written by `deltazip convert base` (or any TensorRT-LLM checkpoint)."""
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise DeltazipError(f"{path}: no config.json (not a TensorRT-LLM checkpoint)")
    checkpoint = TrtllmCheckpoint(path, json.loads(config_path.read_text()))
    missing = [r for r in range(checkpoint.tp) if not checkpoint.rank_path(r).is_file()]
    if missing:
        raise DeltazipError(f"{path}: missing rank files {missing} for tp_size {checkpoint.tp}")
    return checkpoint


@dataclass(frozen=True)
class DeltaLayout:
    """A per-rank delta layout directory written by `deltazip convert delta`."""

    path: Path
    manifests: list[dict]  # rank{r}.json, by rank

    @property
    def tp(self) -> int:
        return len(self.manifests)

    @property
    def base_fingerprint(self) -> str:
        return self.manifests[0]["base_fingerprint"]

    def load_rank(self, rank: int) -> RankDelta:
        """Rebuild one rank's packed deltas (as PackedLinear) and dense deltas."""
        manifest = self.manifests[rank]
        tensors = load_file(str(self.path / f"rank{rank}.safetensors"))
        out = RankDelta(rank)
        for module, info in manifest["packed"].items():
            parts = {key: tensors.get(f"{module}.delta.{key}") for key in PACKED_KEYS}
            out.packed[module] = PackedLinear(info["out_features"], info["in_features"], info["bits"],
                                              info["group_size"], info["sparse24"], parts["qweight"],
                                              parts["meta"], parts["scales"], parts["zeros"])
            out.parallel[module] = info["parallel"]
        for param, info in manifest["dense"].items():
            module, _, leaf = param.rpartition(".")
            out.dense[param] = tensors[f"{module}.delta.{leaf}"]
            out.parallel[module] = info["parallel"]
        return out


def read_delta_layout(path: Path) -> DeltaLayout:
    """Open a delta layout directory and check its rank manifests agree with each other."""
    path = Path(path)
    first = path / "rank0.json"
    if not first.is_file():
        raise DeltazipError(f"{path}: no rank0.json (not a deltazip TensorRT-LLM delta layout)")
    manifest0 = json.loads(first.read_text())
    if manifest0.get("format") != LAYOUT_FORMAT:
        raise DeltazipError(f"{first}: format {manifest0.get('format')!r}, expected {LAYOUT_FORMAT!r}")
    manifests = [manifest0]
    for rank in range(1, manifest0["tp"]):
        rank_json = path / f"rank{rank}.json"
        if not rank_json.is_file():
            raise DeltazipError(f"{path}: missing {rank_json.name} for tp {manifest0['tp']}")
        manifests.append(json.loads(rank_json.read_text()))
    if len({m["base_fingerprint"] for m in manifests}) != 1:
        raise DeltazipError(f"{path}: rank manifests disagree on the base fingerprint")
    return DeltaLayout(path, manifests)
