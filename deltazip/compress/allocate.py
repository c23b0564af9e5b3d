"""Rate–distortion allocation under one byte budget (`deltazip compress --target-ratio R | --budget-bytes B`).

A profiling pass solves every tensor at every candidate layout (bits × sparsity) and records, per candidate,
the bytes it is stored in (its streams after zstd, as written) and its distortion: the Hessian-weighted
output error ‖(Ŵ − Δ)X‖² relative to the delta's own output energy ‖ΔX‖² (relative error is comparable
across tensors; the absolute one over-weights layers with large activations, measured in
benchmarks/RESULTS.md, "Ratio exploration"). A Lagrangian then picks, for one multiplier λ, each tensor's
candidate minimizing distortion + λ·bytes, and λ is bisected so the whole artifact (the picked streams plus
the exact tensors, the manifest and the payload header) fits the budget.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch

from deltazip.errors import DeltazipError

# (bits, sparsity) candidates: every layout here is served by the delta kernels as is (2:4 or dense codes).
CANDIDATES: tuple[tuple[int, str], ...] = (
    (2, "2:4"), (3, "2:4"), (4, "2:4"), (2, "0.75"), (2, "0.85"), (2, "0.9"), (2, "0.95"), (3, "0.85"),
)
# bytes the manifest and payload header grow by per tensor beyond their streams' numbers (estimate margin)
HEADER_MARGIN = 256


def label(bits: int, sparsity: str) -> str:
    return f"{bits}-bit {sparsity}" if sparsity == "2:4" else f"{bits}-bit {float(sparsity):.0%} sparse"


@dataclass
class Profile:
    """Per tensor (HF parameter name), per candidate: (stored bytes, relative output error)."""

    rows: dict[str, dict[tuple[int, str], tuple[int, float]]] = field(default_factory=dict)

    def add(self, name: str, candidate: tuple[int, str], nbytes: int, error: float) -> None:
        self.rows.setdefault(name, {})[candidate] = (nbytes, error)

    def bounds(self) -> tuple[int, int]:
        """(smallest, largest) total stored bytes of the linears over all choices."""
        small = sum(min(b for b, _ in r.values()) for r in self.rows.values())
        large = sum(max(b for b, _ in r.values()) for r in self.rows.values())
        return small, large


def stored_bytes(packed) -> int:
    """Bytes the packed linear's streams take in the artifact (zstd, as the writer stores them)."""
    from deltazip.format.codec import encode_tensors

    _, entries = encode_tensors({"t": packed}, {}, "zstd")
    return sum(stored for _, _, stored in entries["t"]["streams"])


def relative_error(delta: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor | None) -> float:
    """‖(Ŵ − Δ)X‖² / ‖ΔX‖² with H = XᵀX (identity when None)."""
    diff = approx.float() - delta.float()
    if hessian is None:
        return float(diff.pow(2).sum() / delta.float().pow(2).sum().clamp_min(1e-30))
    h = hessian.float()
    return float(((diff @ h) * diff).sum() / ((delta.float() @ h) * delta.float()).sum().clamp_min(1e-30))


def overhead_bytes(linear_names: list[str], exact: dict[str, torch.Tensor], info: dict) -> int:
    """Bytes of the artifact outside the linears' streams: exact tensors, manifest and payload header."""
    from deltazip.format.codec import encode_tensors

    _, entries = encode_tensors({}, exact, "zstd")
    exact_bytes = sum(s[2] for e in entries.values() for s in e["streams"])
    linear_entry = {"kind": "linear", "codec": "packed", "shape": [100000, 100000], "bits": 2,
                    "group_size": 100000, "sparse24": True, "encoding": "zstd",
                    "streams": [["codes", 10**9, 10**9], ["patterns", 10**9, 10**9], ["scales", 10**6, 10**6],
                                ["zeros", 10**6, 10**6]]}
    entries.update({name: linear_entry for name in linear_names})
    manifest = {**info, "tensors": entries, "files": {"delta.safetensors": {"sha256": "0" * 64,
                                                                            "bytes": 10**9}}}
    manifest_bytes = len(json.dumps(manifest, separators=(",", ":")))
    header = sum(len(n) + 64 for n in entries) + 64
    return exact_bytes + manifest_bytes + header + HEADER_MARGIN


def allocate(profile: Profile, budget: int) -> dict[str, tuple[int, str]]:
    """Each tensor's candidate minimizing error + λ·bytes, λ the smallest (bisected) whose total fits."""
    def pick(lam: float) -> tuple[dict[str, tuple[int, str]], int]:
        plan, total = {}, 0
        for name, rows in profile.rows.items():
            best = min(rows, key=lambda c: (rows[c][1] + lam * rows[c][0], rows[c][0]))
            plan[name] = best
            total += rows[best][0]
        return plan, total

    small, _ = profile.bounds()
    if budget < small:
        raise ValueError(f"budget {budget} below the smallest layout total {small}")
    lo, hi = 0.0, 1e-9
    while pick(hi)[1] > budget:
        lo, hi = hi, hi * 4
        if hi > 1e12:  # the smallest candidates fit (checked above); take them
            break
    if pick(lo)[1] <= budget:
        return pick(lo)[0]
    for _ in range(80):
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 2
        if pick(mid)[1] > budget:
            lo = mid
        else:
            hi = mid
    return pick(hi)[0]


def budget_for(fp16_bytes: int, target_ratio: float, budget_bytes: int) -> int:
    """The artifact byte budget: --budget-bytes, else fp16 bytes / --target-ratio."""
    return budget_bytes if budget_bytes > 0 else int(fp16_bytes / target_ratio)


def check_reachable(fp16_bytes: int, budget: int, overhead: int, profile: Profile, target_ratio: float,
                    budget_bytes: int) -> None:
    """One clear line with the achievable range when the budget is below the exact-tensor floor or outside
    what the candidate layouts can fill."""
    small, large = profile.bounds()
    lo_bytes, hi_bytes = overhead + small, overhead + large
    asked = f"--budget-bytes {budget_bytes}" if budget_bytes > 0 else f"--target-ratio {target_ratio:g}"
    if budget < lo_bytes or budget > hi_bytes:
        floor = ("" if budget >= overhead
                 else f" (below the {overhead}-byte floor of exact tensors + manifest)")
        raise DeltazipError(
            f"{asked} cannot be met{floor}: this model's achievable range is "
            f"{fp16_bytes / hi_bytes:.2f}x–{fp16_bytes / lo_bytes:.2f}x ({lo_bytes}–{hi_bytes} bytes)")
