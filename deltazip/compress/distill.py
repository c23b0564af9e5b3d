"""End-to-end distillation of a budgeted artifact (`--target-ratio` / `--budget-bytes`; `distill_steps`).

After every block is compressed (layouts and masks fixed), what the artifact stores is fitted on the
*whole* model, as BitDelta fits its scales: each linear's per-row scales (trained as log-multipliers, then
snapped to the one-byte log grid the artifact stores), its nonzero codes (a latent value per code, rounded
straight-through onto the grid; a pruned or zero code stays zero, so no mask and no layout changes) and the
deltas of the norms (stored as fp16 values in their float32 stream: no longer exact, and fewer bytes after
zstd). The loss is KL(fine-tune ‖ base + Δ̂) of the next-token distribution on the calibration windows, the
fine-tune's log-probabilities computed once, each token weighted by how much better the fine-tune predicts
the window's actual next token than the base (allocate.token_weights "gain": what the fine-tune learned,
not what it forgot). Block-wise scale tuning (tune.py) matches each block's output on its own; this stage
sees the errors of all blocks together and their effect on the output.

The result is kept only if the full-set loss, with everything as the artifact stores it, drops and the
tensors take no more bytes than before (the allocator's budget holds): the stage never increases the KL it
measures. Deterministic on a fixed thread count (fixed batch order, CPU). Small models only (the whole
base and fine-tune are loaded): DISTILL_MAX_PARAMS. Measured in benchmarks/RESULTS.md, "Ratio: sort and
add at 16x, distillation and token-weighted Hessians (tiny)": it lowers the KL 3–10x but moves exact match
by −1.5 to +4 points; with the token-weighted Hessians it keeps reverse at 99.5% where they alone lose it.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn.functional as F
from torch.func import functional_call

from deltazip.compress.allocate import token_weights
from deltazip.compress.obs import _pack
from deltazip.compress.tune import unit_steps, with_scales
from deltazip.format.logscale import log_snapped, zero_grid
from deltazip.packed import PackedLinear

log = logging.getLogger(__name__)
DISTILL_MAX_PARAMS = 100_000_000  # above: skipped (two whole models and the teacher's log-probs in memory)
LR_SCALES = 0.01  # Adam on the log-multipliers of the scales
LR_EXACT = 0.001  # Adam on the norm deltas (norm weights are O(1))
LR_CODES = 0.01  # Adam on the latent code values (in quantization steps), straight-through rounding
BATCH = 8  # calibration windows per step
EVAL_CHUNK = 64  # windows per forward pass of the full-set loss


@dataclasses.dataclass
class Teacher:
    """The fine-tune's log-probabilities on the windows and each token's weight (mean 1)."""

    logp: torch.Tensor  # [n, seq, vocab]
    weights: torch.Tensor  # [n, seq]


@torch.no_grad()
def _logp(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return torch.cat([F.log_softmax(model(input_ids=tokens[i:i + EVAL_CHUNK]).logits.float(), -1)
                      for i in range(0, tokens.shape[0], EVAL_CHUNK)])


def teacher(base_model: torch.nn.Module, target_dir, tokens: torch.Tensor,
            weighting: str = "gain") -> Teacher:
    """The fine-tune's log-probabilities and token weights: "gain" (how much better the fine-tune predicts the
    window's actual next token than the base: what it learned, not what it forgot), "moved" (KL(fine-tune ‖
    base)) or "none"."""
    from deltazip.hf import load_model

    model, _ = load_model(target_dir)
    logp = _logp(model, tokens)
    del model
    base_logp = _logp(base_model, tokens) if weighting != "none" else logp
    weights = token_weights(logp, base_logp, tokens, weighting)
    return Teacher(logp, weights / weights.mean().clamp_min(1e-30))


class Student:
    """base + Δ̂ with trainable log-multipliers of every linear's scales, latent codes (`train_codes`) and
    norm deltas (`train_exact`)."""

    def __init__(self, base_model: torch.nn.Module, linears: dict[str, PackedLinear],
                 exact: dict[str, torch.Tensor], train_exact: bool = True, train_codes: bool = False) -> None:
        self.model = base_model.requires_grad_(False)
        self.base = {n: p.detach() for n, p in base_model.named_parameters()}
        self.packed = {n: p for n, p in linears.items() if isinstance(p, PackedLinear)
                       and f"{n}.weight" in self.base and p.scales.numel()}
        self.steps = {n: unit_steps(p) for n, p in self.packed.items()}
        self.kept = {n: s != 0 for n, s in self.steps.items()}
        self.scales = {n: p.scales.float() for n, p in self.packed.items()}
        self.log_mult = {n: torch.zeros_like(s, requires_grad=True) for n, s in self.scales.items()}
        # codes: a latent value per nonzero code (pruned and zero codes stay zero: the mask is fixed)
        self.latent = ({n: s.clone().requires_grad_(True) for n, s in self.steps.items()} if train_codes
                       else {})
        self.exact = {n: v for n, v in exact.items() if n in self.base and v.is_floating_point()}
        self.norms = {n: v.float().clone().requires_grad_(train_exact) for n, v in self.exact.items()}

    def parameters(self) -> list[dict]:
        groups = [{"params": list(self.log_mult.values()), "lr": LR_SCALES}]
        if self.latent:
            groups.append({"params": list(self.latent.values()), "lr": LR_CODES})
        trained = [v for v in self.norms.values() if v.requires_grad]
        return groups + ([{"params": trained, "lr": LR_EXACT}] if trained else [])

    def rounded(self, n: str, straight_through: bool = True) -> torch.Tensor:
        """The codes − zero the latent values round to (nonzero positions only, clamped to the grid)."""
        bits = self.packed[n].bits
        latent = self.latent[n].clamp(-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
        levels = torch.round(latent)
        levels = latent + (levels - latent).detach() if straight_through else levels.detach()
        return levels * self.kept[n]

    def weights(self) -> dict[str, torch.Tensor]:
        out = {}
        for n, steps in self.steps.items():
            steps = self.rounded(n) if n in self.latent else steps
            group = self.packed[n].group_size
            scales = self.scales[n] * torch.exp(self.log_mult[n])
            if scales.shape[1] > 1:  # per-group scales; one per row broadcasts (cheaper forward and backward)
                scales = scales.repeat_interleave(group, dim=1)
            out[f"{n}.weight"] = torch.addcmul(self.base[f"{n}.weight"], steps, scales)
        for n, v in self.norms.items():
            out[n] = self.base[n] + v
        return out

    def result(self) -> tuple[dict[str, PackedLinear], dict[str, torch.Tensor]]:
        """The trained parameters as the artifact stores them: fp16 scales snapped to the log grid (linears
        without the symmetric zeros keep fp16), norm deltas in their stored dtype."""
        linears = {}
        with torch.no_grad():
            for n, p in self.packed.items():
                if n in self.latent:
                    steps = self.rounded(n, straight_through=False)
                    p = _pack(steps.to(torch.int8), steps == 0, p.scales, p.bits, p.group_size, p.sparse24)
                tuned = with_scales(p, self.scales[n] * torch.exp(self.log_mult[n]))
                linears[n] = log_snapped(tuned) if zero_grid(p) else tuned
            # trained norm deltas are no longer exact: fp16 values (in the stored dtype) compress well
            exact = {n: (self.norms[n].detach().half().to(self.exact[n].dtype) if self.norms[n].requires_grad
                         else self.exact[n]) for n in self.exact}
        return linears, exact


def kl_loss(model: torch.nn.Module, weights: dict, tokens: torch.Tensor, teach: Teacher,
            rows: slice) -> torch.Tensor:
    """Token-weighted KL(fine-tune ‖ student) on windows `rows`, mean over tokens."""
    logits = functional_call(model, weights, (), {"input_ids": tokens[rows]}).logits.float()
    target = teach.logp[rows]
    per_token = (target.exp() * (target - F.log_softmax(logits, -1))).sum(-1)
    return (per_token * teach.weights[rows]).mean()


@torch.no_grad()
def full_loss(model: torch.nn.Module, weights: dict, tokens: torch.Tensor, teach: Teacher) -> float:
    total = 0.0
    for i in range(0, tokens.shape[0], EVAL_CHUNK):
        rows = slice(i, i + EVAL_CHUNK)
        total += float(kl_loss(model, weights, tokens, teach, rows)) * tokens[rows].shape[0]
    return total / tokens.shape[0]


def static_weights(base_model: torch.nn.Module, linears: dict, exact: dict) -> dict[str, torch.Tensor]:
    """base + Δ̂ for the stored (snapped) parameters: the model the artifact decodes to."""
    return Student(base_model, linears, exact, train_exact=False).weights()


def stored_bytes(linears: dict, exact: dict, lossless: str) -> int:
    """Bytes of all tensor streams as a budgeted artifact stores them (log-snapped scales, zstd)."""
    from deltazip.format.codec import encode_tensors

    snapped = {n: log_snapped(p) if isinstance(p, PackedLinear) and zero_grid(p) else p
               for n, p in linears.items()}
    _, entries = encode_tensors(snapped, exact, lossless, compact=True)
    return sum(s[2] for e in entries.values() for s in e["streams"])


def distill(base_dir, target_dir, tokens: torch.Tensor, linears: dict[str, PackedLinear],
            exact: dict[str, torch.Tensor], steps: int, lossless: str = "zstd", train_exact: bool = True,
            weighting: str = "gain", train_codes: bool = True, stats: dict | None = None
            ) -> tuple[dict[str, PackedLinear], dict[str, torch.Tensor]]:
    """`linears` and `exact` with scales, codes and norm deltas fitted end to end (module docstring).

    Unchanged when `steps` is 0, the model is above DISTILL_MAX_PARAMS, the full-set loss does not drop,
    or the distilled tensors would take more bytes than the given ones (the budget they were allocated).
    `stats` (if given) receives the full-set loss before and after.
    """
    from deltazip.hf import load_model

    if steps <= 0:
        return linears, exact
    base_model, _ = load_model(base_dir)
    n_params = sum(p.numel() for p in base_model.parameters())
    if n_params > DISTILL_MAX_PARAMS:
        log.info("distillation skipped: %d parameters, above %d", n_params, DISTILL_MAX_PARAMS)
        return linears, exact
    tokens = tokens.cpu()
    teach = teacher(base_model, target_dir, tokens, weighting)
    snapped = {n: log_snapped(p) if isinstance(p, PackedLinear) and zero_grid(p) else p
               for n, p in linears.items()}
    before = full_loss(base_model, static_weights(base_model, snapped, exact), tokens, teach)
    student = Student(base_model, linears, exact, train_exact, train_codes)
    opt = torch.optim.Adam(student.parameters(), fused=True)  # one kernel for all tensors (CPU supports it)
    gen = torch.Generator().manual_seed(0)
    n = tokens.shape[0]
    batch = min(BATCH, n)
    with torch.enable_grad():
        for _ in range(steps):
            start = int(torch.randint(0, max(1, n - batch + 1), (1,), generator=gen))
            loss = kl_loss(base_model, student.weights(), tokens, teach, slice(start, start + batch))
            opt.zero_grad()
            loss.backward()
            opt.step()
    tuned, tuned_exact = student.result()
    out_linears = {**linears, **tuned}
    out_exact = {**exact, **tuned_exact}
    after = full_loss(base_model, static_weights(base_model, out_linears, out_exact), tokens, teach)
    fits = stored_bytes(out_linears, out_exact, lossless) <= stored_bytes(linears, exact, lossless)
    kept = after < before and fits
    log.info("distillation: %d steps, KL %.5f → %.5f%s", steps, before, after,
             "" if kept else " (kept the undistilled tensors: " + ("more bytes)" if after < before else
                                                                   "no lower loss)"))
    if stats is not None:
        stats.update({"distill_kl_before": before, "distill_kl_after": after if kept else before})
    return (out_linears, out_exact) if kept else (linears, exact)
