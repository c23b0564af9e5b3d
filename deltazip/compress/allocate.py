"""Rate–distortion allocation under one byte budget (`deltazip compress --target-ratio R | --budget-bytes B`).

A profiling pass solves every tensor at every candidate layout (bits × sparsity) and records, per candidate,
the bytes it is stored in (its streams after zstd, as written) and its local distortion: the Hessian-weighted
output error ‖(Ŵ − Δ)X‖² relative to the delta's own output energy ‖ΔX‖². A measured sensitivity turns
local error into model damage: for each tensor, the KL divergence of the fine-tune's next-token
distribution when only that tensor's delta is replaced by its PROBE layout, on calibration windows, each
token weighted by how far the fine-tune moved it from the base (KL(fine-tune ‖ base) at that token: the
tokens the fine-tune is about); a candidate's predicted damage is KL_probe · err_candidate / err_probe.
(Measured in benchmarks/RESULTS.md, "Ratio exploration": absolute error < relative error < measured
sensitivity < token-weighted measured sensitivity at the same bytes.) A Lagrangian
then picks, for one multiplier λ, each tensor's candidate minimizing damage + λ·bytes, and λ is bisected so
the whole artifact (the picked streams plus the exact tensors, the manifest and the payload header) fits.
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
PROBE = (2, "0.9")  # the layout whose end-to-end effect calibrates each tensor's sensitivity
SENSITIVITY_SEQUENCES = 64  # calibration windows the sensitivity KL is measured on
SENSITIVITY_WEIGHTING = "moved"  # token weights of the sensitivity KL (token_weights)
SENSITIVITY_MAX_PARAMS = 1_500_000_000  # above this the fine-tune is not loaded whole: relative error only
# bytes the manifest and payload header may grow by beyond the estimate (stream lists and digits differ)
HEADER_MARGIN = 512


def label(bits: int, sparsity: str) -> str:
    return f"{bits}-bit {sparsity}" if sparsity == "2:4" else f"{bits}-bit {float(sparsity):.0%} sparse"


@dataclass
class Profile:
    """Per tensor (HF parameter name), per candidate: (stored bytes, relative output error)."""

    rows: dict[str, dict[tuple[int, str], tuple[int, float]]] = field(default_factory=dict)
    gains: dict[str, float] = field(default_factory=dict)  # measured KL per unit of relative error

    def add(self, name: str, candidate: tuple[int, str], nbytes: int, error: float) -> None:
        self.rows.setdefault(name, {})[candidate] = (nbytes, error)

    def damage(self, name: str, candidate: tuple[int, str]) -> float:
        return self.gains.get(name, 1.0) * self.rows[name][candidate][1]

    def bounds(self) -> tuple[int, int]:
        """(smallest, largest) total stored bytes of the linears over all choices."""
        small = sum(min(b for b, _ in r.values()) for r in self.rows.values())
        large = sum(max(b for b, _ in r.values()) for r in self.rows.values())
        return small, large


def stored_bytes(packed) -> int:
    """Bytes the packed linear's streams take in the artifact (zstd, as the writer stores them)."""
    from deltazip.format.codec import encode_tensors

    _, entries = encode_tensors({"t": packed}, {}, "zstd", compact=True)
    return sum(stored for _, _, stored in entries["t"]["streams"])


def relative_error(delta: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor | None) -> float:
    """‖(Ŵ − Δ)X‖² / ‖ΔX‖² with H = XᵀX (identity when None)."""
    diff = approx.float() - delta.float()
    if hessian is None:
        return float(diff.pow(2).sum() / delta.float().pow(2).sum().clamp_min(1e-30))
    h = hessian.float()
    return float(((diff @ h) * diff).sum() / ((delta.float() @ h) * delta.float()).sum().clamp_min(1e-30))


def overhead_bytes(linears: dict, exact: dict[str, torch.Tensor], info: dict) -> int:
    """Bytes of the artifact outside the linears' streams (exact tensors, manifest, payload header), from the
    profiling pass's own tensors: its manifest is the final one up to a few digits per tensor."""
    from deltazip.format.codec import encode_tensors
    from deltazip.format.manifest import manifest_text, new_manifest

    _, entries = encode_tensors(linears, exact, "zstd", compact=True)
    exact_bytes = sum(s[2] for e in entries.values() if e["kind"] == "exact" for s in e["streams"])
    manifest = new_manifest("x" * len(info.get("name", "")), "sha256:" + "0" * 64, entries, info,
                            compact=True)  # as budgeted artifacts are written (format version 5)
    manifest["stats"].update({k: 1 / 3 for k in ("artifact_bytes", "ratio", "bits_per_weight")})
    manifest["files"] = {"delta.safetensors": {"blake3": "0" * 64, "bytes": 10**9}}
    manifest_bytes = len(manifest_text(manifest).encode())
    # safetensors header: {"name":{"dtype":"U8","shape":[n],"data_offsets":[a,b]}, ...}
    header = 64 + sum(len(n) + 64 for n in entries)
    return exact_bytes + manifest_bytes + header + HEADER_MARGIN


def allocate(profile: Profile, budget: int) -> dict[str, tuple[int, str]]:
    """Each tensor's candidate minimizing error + λ·bytes, λ the smallest (bisected) whose total fits."""
    def pick(lam: float) -> tuple[dict[str, tuple[int, str]], int]:
        plan, total = {}, 0
        for name, rows in profile.rows.items():
            best = min(rows, key=lambda c: (profile.damage(name, c) + lam * rows[c][0], rows[c][0]))
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


class Sensitivity:
    """KL(fine-tune ‖ fine-tune with one tensor perturbed) on calibration windows (whole model in memory),
    tokens weighted by KL(fine-tune ‖ base) when the base is given (the base is loaded once, then dropped)."""

    def __init__(self, target_dir, tokens: torch.Tensor, base_dir=None) -> None:
        from deltazip.hf import load_model

        self.tokens = tokens[:SENSITIVITY_SEQUENCES].cpu()
        self.weights = None
        if base_dir is not None:  # weight tokens by how far the fine-tune moved them from the base
            self.model, _ = load_model(base_dir)
            base_logp = self._logp()
        self.model, _ = load_model(target_dir)
        self.params = dict(self.model.named_parameters())
        self.reference = self._logp()
        if base_dir is not None:
            weights = token_weights(self.reference, base_logp, self.tokens, SENSITIVITY_WEIGHTING)
            self.weights = weights / weights.sum().clamp_min(1e-30)

    @torch.no_grad()
    def _logp(self) -> torch.Tensor:
        return torch.log_softmax(self.model(input_ids=self.tokens).logits.float(), -1)

    @torch.no_grad()
    def kl(self, param: str, perturbation: torch.Tensor) -> float:
        p = self.params.get(param)
        if p is None or tuple(p.shape) != tuple(perturbation.shape):
            return float("nan")
        keep = p.data.clone()
        p.data += perturbation.to(p.dtype).cpu()
        try:
            logp = self._logp()
        finally:
            p.data.copy_(keep)
        if self.weights is not None:
            per_token = (self.reference.exp() * (self.reference - logp)).sum(-1)
            return float((per_token * self.weights).sum())
        return float(torch.nn.functional.kl_div(logp, self.reference, log_target=True, reduction="batchmean"))


def token_weights(logp: torch.Tensor, base_logp: torch.Tensor, tokens: torch.Tensor,
                  mode: str) -> torch.Tensor:
    """Per-token weights [n, seq] from the fine-tune's and the base's log-probabilities [n, seq, vocab] on
    windows `tokens`: "gain", how much better the fine-tune predicts the window's actual next token than the
    base (clamped at 0; the last position, with no next token, 0): what the fine-tune learned, not the
    tokens it forgot or its prior over what comes next; "moved", KL(fine-tune ‖ base); "none", all 1."""
    if mode == "none":
        return torch.ones(logp.shape[:2])
    if mode == "moved":
        return (logp.exp() * (logp - base_logp)).sum(-1)
    nxt = tokens[:, 1:, None].to(logp.device)
    weights = torch.zeros(logp.shape[:2], device=logp.device)
    weights[:, :-1] = (logp[:, :-1].gather(-1, nxt) - base_logp[:, :-1].gather(-1, nxt))[..., 0].clamp_min(0)
    return weights


def calibration_weights(target_dir, base_dir, tokens: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """token_weights "gain" (mean 1) of every calibration window [n, seq], from the whole fine-tune and base
    (small models only; one at a time, keeping only the log-probability of each window's actual next token):
    the budgeted run's OBS and head Hessians weight each token by them."""
    from deltazip.hf import load_model

    tokens = tokens.cpu()
    nxt = tokens[:, 1:, None]
    taken = []
    for model_dir in (target_dir, base_dir):
        model, _ = load_model(model_dir)
        with torch.no_grad():
            taken.append(torch.cat([
                torch.log_softmax(model(input_ids=tokens[i:i + chunk]).logits[:, :-1].float(), -1)
                .gather(-1, nxt[i:i + chunk])[..., 0] for i in range(0, tokens.shape[0], chunk)]))
        del model
    weights = torch.zeros(tokens.shape, dtype=torch.float32)
    weights[:, :-1] = (taken[0] - taken[1]).clamp_min(0)  # as token_weights(..., "gain")
    return weights / weights.mean().clamp_min(1e-30)


def budget_for(fp16_bytes: int, target_ratio: float, budget_bytes: int) -> int:
    """The artifact byte budget: --budget-bytes, else fp16 bytes / --target-ratio."""
    return budget_bytes if budget_bytes > 0 else int(fp16_bytes / target_ratio)


def floor_bytes(shapes: dict[str, tuple[int, ...]], info: dict) -> int:
    """A lower bound on any artifact of this model, known before profiling: half the raw bytes of the exact
    (1-D: norms, biases) deltas as float32 plus the manifest fields other than tensors."""
    exact = sum(4 * math.prod(shape) for shape in shapes.values() if len(shape) == 1)
    return exact // 2 + len(json.dumps(info, separators=(",", ":")))


def check_floor(fp16_bytes: int, budget: int, floor: int, target_ratio: float, budget_bytes: int) -> None:
    """Fail at once, before the profiling pass, when the budget is below the exact-tensor floor."""
    if budget < floor:
        asked = f"--budget-bytes {budget_bytes}" if budget_bytes > 0 else f"--target-ratio {target_ratio:g}"
        raise DeltazipError(f"{asked} cannot be met (below the {floor}-byte floor of exact tensors + "
                            f"manifest): this model's achievable range is below {fp16_bytes / floor:.2f}x")


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
