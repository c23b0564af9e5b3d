"""Scale tuning: codes and 2:4 masks fixed, fit the fp16 scales of a block's deltas to the fine-tune's output.

The OBS sweep matches each linear's output on its own; tuning then matches the whole block (nonlinearities,
interactions between its linears) against the *fine-tune's* output on the fine-tune's own hidden stream,
so that error accumulated by earlier compressed blocks is corrected too. Only scales move: the format and
the codes stay as the solver chose them.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import torch

from deltazip.compress.stream import ROWS, StreamedDelta, packed_rows
from deltazip.packed import PackedLinear


def unit_steps(packed: PackedLinear) -> torch.Tensor:
    """The dense delta [N, K] with every scale 1: code − zero at kept positions, 0 elsewhere."""
    return dataclasses.replace(packed, scales=torch.ones_like(packed.scales)).dequantize()


def with_scales(packed: PackedLinear, scales: torch.Tensor) -> PackedLinear:
    """A copy of `packed` holding `scales` (rounded to the stored fp16)."""
    fp16 = scales.to(torch.float16).clamp_min(torch.finfo(torch.float16).tiny)
    return dataclasses.replace(packed, scales=fp16.contiguous())


class ScaleSet:
    """Trainable log-multipliers of the scales of several packed deltas; `dense(name)` is differentiable."""

    def __init__(self, packed: dict[str, PackedLinear], device: torch.device | str | None = None,
                 compact: bool = False) -> None:
        """`compact`: keep the steps as int8 (exact: codes − zero are small integers), built row chunk by
        row chunk, for losses that read them through `int_steps` (the streamed path of large blocks)."""
        self.packed = packed
        self.steps = {n: (_int_steps(p) if compact else unit_steps(p)).to(device) for n, p in packed.items()}
        self.base_scales = {n: p.scales.float().to(device) for n, p in packed.items()}
        self.log_mult = {n: torch.zeros_like(s, requires_grad=True) for n, s in self.base_scales.items()}

    def scales(self, name: str) -> torch.Tensor:
        return self.base_scales[name] * torch.exp(self.log_mult[name])

    def dense(self, name: str) -> torch.Tensor:
        group = self.packed[name].group_size
        return self.steps[name].float() * self.scales(name).repeat_interleave(group, dim=1)

    def result(self) -> dict[str, PackedLinear]:
        return {n: with_scales(p, self.scales(n).detach().cpu()) for n, p in self.packed.items()}


def _int_steps(packed: PackedLinear, rows: int = 1024) -> torch.Tensor:
    out = torch.empty(packed.out_features, packed.in_features, dtype=torch.int8)
    for r in range(0, packed.out_features, rows):
        out[r:r + rows] = unit_steps(packed_rows(packed, slice(r, r + rows))).to(torch.int8)
    return out


def tune_scales(packed: dict[str, PackedLinear], loss_fn: Callable[[ScaleSet, slice], torch.Tensor],
                n_rows: int, steps: int, lr: float, batch: int, device: torch.device | str | None = None,
                max_seconds: float = 0.0, taken: dict | None = None,
                compact: bool = False) -> dict[str, PackedLinear]:
    """Adam on the log-scales of `packed` against loss_fn(scales, rows) (on `device`; at most `max_seconds`
    when > 0); keeps the result only if the full-batch loss drops (fp16-rounded scales).

    `taken["steps"]` receives the number of steps run. With a time budget that number depends on the
    machine's speed: the pipeline uses the budget once (block 0) and then this fixed count, so a resumed
    run reproduces an uninterrupted one.
    """
    if taken is not None:
        taken["steps"] = 0
    if steps <= 0 or not packed:
        return packed
    params = ScaleSet(packed, device, compact)
    everything = slice(0, n_rows)
    with torch.no_grad():
        before = float(loss_fn(params, everything))
    opt = torch.optim.Adam(list(params.log_mult.values()), lr=lr)
    gen = torch.Generator().manual_seed(0)
    deadline = time.perf_counter() + max_seconds if max_seconds > 0 else math.inf
    for step in range(steps):
        if time.perf_counter() > deadline:
            break
        if taken is not None:
            taken["steps"] = step + 1
        start = int(torch.randint(0, max(1, n_rows - batch + 1), (1,), generator=gen))
        loss = loss_fn(params, slice(start, start + batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
    tuned = params.result()
    check = ScaleSet(tuned, device, compact)
    with torch.no_grad():
        after = float(loss_fn(check, everything))
    return tuned if after < before else packed


def streamed_delta(scales: ScaleSet, name: str, base: Callable[[slice], torch.Tensor],
                   chunk: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """x → x (B + steps ⊙ s)ᵀ for `name` of a compact ScaleSet, B read by `base(rows)` (stream.StreamedDelta:
    the weight is rebuilt in the backward, not saved); `chunk` rows at a time (None: stream.ROWS)."""
    group = scales.packed[name].group_size
    steps = scales.steps[name]

    def build(s: torch.Tensor, rows: slice) -> torch.Tensor:
        return base(rows).float() + steps[rows].float() * s[rows].repeat_interleave(group, dim=1)

    def forward(x: torch.Tensor) -> torch.Tensor:
        s = scales.scales(name)
        return StreamedDelta.apply(x, s, build, lambda rows: steps[rows], chunk or ROWS)
    return forward


def tune_head_streamed(packed: PackedLinear, base, target, normed: torch.Tensor, normed_ft: torch.Tensor,
                       steps: int, lr: float, batch: int, max_seconds: float = 0.0,
                       chunk: int = ROWS) -> PackedLinear:
    """The lm_head's scale tuning (KL to the fine-tune's next-token distribution, as the pipeline's
    `_tune_head`) with base and fine-tune heads read from disk (`ModelWeights`) `chunk` rows at a time."""
    name = "lm_head.weight"
    n_rows = packed.out_features
    with torch.no_grad():
        logits_ft = torch.cat([normed_ft @ target.get(name, slice(r, r + chunk)).float().to(normed.device).T
                               for r in range(0, n_rows, chunk)], dim=-1)
        target_logp = torch.log_softmax(logits_ft, dim=-1)
        del logits_ft

    def loss_fn(scales: ScaleSet, rows: slice) -> torch.Tensor:
        head = streamed_delta(scales, "head", lambda r: base.get(name, r).to(normed.device), chunk)
        logp = torch.log_softmax(head(normed[rows]), dim=-1)
        return torch.nn.functional.kl_div(logp, target_logp[rows], log_target=True, reduction="batchmean")

    with torch.enable_grad():
        return tune_scales({"head": packed}, loss_fn, normed.shape[0], steps, lr, batch, device=normed.device,
                           max_seconds=max_seconds, compact=True)["head"]
