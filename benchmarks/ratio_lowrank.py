"""Issue 15 exploration: every 2-D delta as a quantized low-rank product A·B at a 16x byte budget (tiny).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ratio_lowrank.py run TASK [--ratio R] [--bits B]
        [--alloc uniform|relative|absolute|measured|mixed|precision] [--hessian none|plain|gain]
        [--distill-steps N] [--hybrid F] [--tag TAG] [--log FILE.jsonl]
    .venv/bin/python benchmarks/ratio_lowrank.py write [--log FILE.jsonl] [--notes-file NOTES]

Not a stored layout (the artifact format, the runtime and the kernels do not know it): base + A·B is
evaluated in memory, by greedy exact match on the task's 200 held-out examples. Its bytes are those of the
two factors as dense B-bit PackedLinears in a budgeted artifact (per-row log scales, zstd-19) plus the fixed
costs a 16x artifact pays today (safetensors header, manifest, norm deltas: FIXED_BYTES). Factors: the SVD
of Δ·L (H = L·Lᵀ the Hessian of the linear's inputs on the fine-tune's calibration stream; `none`: plain
SVD), B = Σ^½·Vᵀ·L⁻¹ solved onto the grid by the OBS solver under H, A refit by least squares against the
quantized B and solved under B̂·H·B̂ᵀ. Ranks by tensor: `uniform` (bytes in proportion to the tensor's
size), `relative` (greedy over all tensors' components by σ² / ‖Δ·L‖² per byte), `absolute` (σ² per byte),
`measured` (relative × the tensor's measured KL sensitivity, as the shipped allocator), `mixed` (per
tensor low-rank, sparse or both, by the shipped allocator), `precision` (Delta-CoMe's mixed precision: bits
per singular component, up to --bits). `--distill-steps` fits both factors end to end;
`--hybrid F` gives the low-rank part F of the budget and the shipped pipeline the residual. Over 400 lines:
one script holds every variant its RESULTS section lists, so each row reproduces from one file.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
FAMILY = REPO / ".deltazip/test-cache/family-tiny-s0"
FIXED_BYTES = 3728 + 2010 + 3560  # header, manifest, norm deltas of the shipped 16x artifacts (RESULTS.md)
TITLE = "Ratio: quantized low-rank deltas at 16x (tiny, exploration)"


def hessians(model, tokens: torch.Tensor, weights: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Σ w·x xᵀ of every nn.Linear's inputs (and token counts for the embedding) on the windows."""
    hs: dict[str, torch.Tensor] = {}
    w = None  # the current chunk's token weights, read by the hooks

    def hook(name):
        def fn(_module, inputs, _out):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            xw = x if w is None else x * w[: x.shape[0]]
            hs[name] = hs.get(name, 0) + xw.T @ x
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for i in range(0, tokens.shape[0], 64):
            w = None if weights is None else weights[i:i + 64].reshape(-1, 1)
            model(input_ids=tokens[i:i + 64])
    for h in handles:
        h.remove()
    counts = torch.bincount(tokens.flatten(), minlength=model.config.vocab_size).float()
    hs["model.embed_tokens"] = counts  # the embedding's rows, weighted by how often each token occurs
    return hs


class Factorised:
    """The whitened SVD of one delta and its quantized rank-r approximation."""

    def __init__(self, delta: torch.Tensor, h: torch.Tensor | None, embed: bool = False) -> None:
        self.delta = delta.double()
        n_cols = delta.shape[1]
        eye = torch.eye(n_cols, dtype=torch.float64)
        if h is None:
            self.left, self.right = torch.eye(delta.shape[0], dtype=torch.float64), eye
        elif embed:  # rows weighted by token frequency
            self.left = torch.diag((h.double() / h.double().mean()).sqrt() + 1e-3)
            self.right = eye
        else:
            h = h.double()
            h = h + 0.01 * h.diagonal().mean() * eye
            self.left, self.right = torch.eye(delta.shape[0], dtype=torch.float64), torch.linalg.cholesky(h)
        self.h = self.right @ self.right.T
        self.plain = h is None or embed
        self.packed: dict[int, tuple] = {}  # rank → (A, B) as PackedLinear
        u, s, vt = torch.linalg.svd(self.left @ self.delta @ self.right, full_matrices=False)
        self.u, self.s, self.vt = u, s, vt
        self.energy = float((s ** 2).sum())

    def approx(self, rank: int, bits: int) -> tuple[torch.Tensor, int]:
        """Δ̂ of rank `rank` with `bits`-bit factors, and its bytes (approx_levels at one precision)."""
        return self.approx_levels([bits] * rank)

    def approx_levels(self, levels: list[int]) -> tuple[torch.Tensor, int]:
        """Δ̂ with component i's factors at levels[i] bits (non-increasing, 0 = dropped; Delta-CoMe's mixed
        precision over singular vectors) and its bytes as the artifact stores them (format version 5
        streams). One A_g·B_g pair per run of equal bits, each a dense PackedLinear solved by the OBS solver
        under the Hessian of its own inputs: H for B, B̂·H·B̂ᵀ for A after A's joint least-squares refit
        against the quantized B. At one precision the pair is kept in `packed[rank]` (for distillation)."""
        from deltazip.compress.allocate import stored_bytes
        from deltazip.compress.obs import solve_delta

        rank = sum(1 for b in levels if b)
        if rank == 0:
            return torch.zeros_like(self.delta).float(), 0
        runs, start = [], 0
        for i in range(1, rank + 1):
            if i == rank or levels[i] != levels[start]:
                runs.append((start, i, levels[start]))
                start = i
        root = self.s[:rank].sqrt()
        b = (root[:, None] * self.vt[:rank]) @ torch.linalg.inv(self.right)
        h = None if self.plain else self.h.float()
        b_parts = [solve_delta(b[i:j].float(), h, bits, "none", -1, 0.01, 128) for i, j, bits in runs]
        bd = torch.cat([bq.dequantize().double() for bq in b_parts])
        gram = bd @ self.h @ bd.T + 1e-9 * torch.eye(rank, dtype=torch.float64)
        a = torch.linalg.solve(gram, bd @ self.h @ self.delta.T).T
        out, nbytes = torch.zeros_like(self.delta, dtype=torch.float32), 0
        for (i, j, bits), bq in zip(runs, b_parts, strict=True):
            aq = solve_delta(a[:, i:j].float().contiguous(), None if self.plain else gram[i:j, i:j].float(),
                             bits, "none", -1, 0.01, 128)
            out += aq.dequantize() @ bq.dequantize()
            nbytes += stored_bytes(aq) + stored_bytes(bq)
        if len(runs) == 1:
            self.packed[rank] = (aq, bq)
        return out, nbytes

    def component_bytes(self, bits: int) -> float:
        return sum(self.delta.shape) * bits / 8 + 4


def allocate(factors: dict[str, Factorised], budget: float, bits: int, how: str,
             gains: dict[str, float] | None = None) -> dict[str, int]:
    """Rank per tensor under the byte budget (estimated from the raw packed size of a component);
    `measured`: relative energy scaled by each tensor's measured sensitivity (`gains`)."""
    total = sum(f.delta.numel() for f in factors.values())
    if how == "uniform":
        return {n: int(budget * f.delta.numel() / total / f.component_bytes(bits))
                for n, f in factors.items()}
    ranks = dict.fromkeys(factors, 0)
    spent = 0.0
    while True:
        best, best_gain = None, 0.0
        for n, f in factors.items():
            r = ranks[n]
            if r >= len(f.s) or spent + f.component_bytes(bits) > budget:
                continue
            scale = {"relative": 1 / f.energy, "measured": (gains or {}).get(n, 1.0) / f.energy}.get(how, 1.0)
            gain = float(f.s[r] ** 2) * scale / f.component_bytes(bits)
            if gain > best_gain:
                best, best_gain = n, gain
        if best is None:
            return ranks
        ranks[best] += 1
        spent += factors[best].component_bytes(bits)


PRODUCT_ERROR = {0: 1.0, 2: 0.30, 3: 0.078, 4: 0.023, 8: 0.0001}  # 2x one factor's RTN error (gaussian)


def allocate_levels(factors: dict[str, Factorised], budget: float, top: int) -> dict[str, list[int]]:
    """Bits per singular component across all tensors (levels 0, 2, 3, 4[, 8]): upgrades sorted by relative
    energy gained per byte (convex chains, so the sorted order keeps each component's upgrades in order)."""
    chain = [b for b in (0, 2, 3, 4, 8) if b <= top]
    items = []
    for name, f in factors.items():
        rel = (f.s ** 2 / f.energy).tolist()
        per_bit = sum(f.delta.shape) / 8
        for i, e in enumerate(rel):
            for lo, hi in itertools.pairwise(chain):
                cost = per_bit * (hi - lo) + (4 if lo == 0 else 0)
                items.append((e * (PRODUCT_ERROR[lo] - PRODUCT_ERROR[hi]) / cost, cost, name, i, hi))
    items.sort(key=lambda t: -t[0])
    levels = {n: [0] * len(f.s) for n, f in factors.items()}
    spent = 0.0
    for _, cost, name, i, hi in items:
        if spent + cost > budget:
            break
        levels[name][i] = hi
        spent += cost
    return levels


def fit_budget(factors: dict[str, Factorised], plan, budget: float) -> tuple[dict[str, list[int]], int, dict]:
    """(levels, bytes, name → (Δ̂, bytes)) of the largest plan(b) whose stored bytes fit the budget: the
    plan's byte estimate is coarse, so b is rescaled until the real bytes fit."""
    best, scale = None, 1.0
    for round_ in range(12):
        levels = plan(budget * scale)
        approx = {n: f.approx_levels(levels[n]) for n, f in factors.items()}
        linear_bytes = sum(nbytes for _, nbytes in approx.values())
        if linear_bytes <= budget and (best is None or linear_bytes > best[1]):
            best = (levels, linear_bytes, approx)
        if best is not None and round_ >= 3:
            break
        scale *= budget / max(linear_bytes, 1) * (0.99 if linear_bytes > budget else 1.0)
    return best


RANKS = (2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)
HYBRID_RANKS = (4, 8, 16)
RESIDUAL = ((2, "0.95"), (2, "0.9"), (2, "0.85"))


def mixed(factors: dict[str, Factorised], budget: float, bits: int) -> tuple[dict, int]:
    """Per tensor the candidate (low-rank, sparse layout, or low-rank + sparse residual) chosen by the
    shipped Lagrangian allocator (allocate.allocate) on the relative error under the tensor's Hessian
    (identity with --hessian none, and for the embedding); returns Δ̂ and bytes."""
    from deltazip.compress import allocate as alloc
    from deltazip.compress.obs import solve_delta

    profile, approx = alloc.Profile(), {}
    for name, f in factors.items():
        delta = f.delta.float()
        options = {}
        for rank in RANKS:
            if rank <= min(delta.shape) // 2:
                options[("lr", rank)] = f.approx(rank, bits)
        h = None if f.plain else f.h.float()  # --hessian plain|gain: OBS sparse layouts, H-weighted errors
        for bits_s, sparsity in alloc.CANDIDATES:
            if sparsity == "2:4" and delta.shape[1] % 32:
                continue
            packed = solve_delta(delta, h, bits_s, sparsity, -1, 0.01, 128)
            options[("sparse", bits_s, sparsity)] = (packed.dequantize(), alloc.stored_bytes(packed))
        for rank in HYBRID_RANKS:
            if rank > min(delta.shape) // 2:
                continue
            low, low_bytes = options[("lr", rank)]
            for bits_s, sparsity in RESIDUAL:
                packed = solve_delta(delta - low, h, bits_s, sparsity, -1, 0.01, 128)
                options[("hybrid", rank, sparsity)] = (low + packed.dequantize(),
                                                       low_bytes + alloc.stored_bytes(packed))
        hd = f.h.float()
        energy = float(((delta @ hd) * delta).sum())
        for key, (d_hat, nbytes) in options.items():
            err = delta - d_hat
            profile.add(name, key, nbytes, float(((err @ hd) * err).sum()) / energy)
        approx[name] = options
    plan = alloc.allocate(profile, int(budget))
    chosen = {n: approx[n][plan[n]] for n in factors}
    kinds = {}
    for key in plan.values():
        kinds[key[0]] = kinds.get(key[0], 0) + 1
    print("plan:", kinds, flush=True)
    return chosen, sum(b for _, b in chosen.values())


def distill_factors(base, ft_dir, tokens: torch.Tensor, factors: dict[str, tuple], steps: int) -> dict:
    """Fit both factors' codes (latent values, straight-through rounding) and row scales (log-multipliers) of
    every tensor to the gain-weighted KL(fine-tune ‖ base + A·B) on the calibration windows, as
    compress/distill.py does for the shipped layouts; returns name → (Δ̂, stored bytes)."""
    from deltazip.compress.allocate import stored_bytes
    from deltazip.compress.distill import kl_loss, teacher
    from deltazip.compress.obs import _pack
    from deltazip.compress.tune import unit_steps, with_scales

    teach = teacher(base, ft_dir, tokens)
    base_w = {n: p.detach() for n, p in base.named_parameters()}
    latent = {(n, i): unit_steps(f[i]).clone().requires_grad_(True)
              for n, f in factors.items() for i in (0, 1)}
    scales = {(n, i): factors[n][i].scales.float() for n in factors for i in (0, 1)}
    mult = {k: torch.zeros_like(v, requires_grad=True) for k, v in scales.items()}
    opt = torch.optim.Adam([{"params": list(latent.values()), "lr": 0.01},
                            {"params": list(mult.values()), "lr": 0.01}], fused=True)

    def factor(key, straight_through=True):
        bits = factors[key[0]][key[1]].bits
        x = latent[key].clamp(-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
        q = x + (torch.round(x) - x).detach() if straight_through else torch.round(x).detach()
        return q, scales[key] * torch.exp(mult[key])

    def weights():
        out = dict(base_w)
        for n in factors:
            (qa, sa), (qb, sb) = factor((n, 0)), factor((n, 1))
            out[n] = base_w[n] + (qa * sa) @ (qb * sb)
        return out

    gen = torch.Generator().manual_seed(0)
    with torch.enable_grad():
        for _ in range(steps):
            start = int(torch.randint(0, tokens.shape[0] - 8, (1,), generator=gen))
            loss = kl_loss(base, weights(), tokens, teach, slice(start, start + 8))
            opt.zero_grad()
            loss.backward()
            opt.step()
    out = {}
    with torch.no_grad():
        for n, (a, b) in factors.items():
            packed = []
            for i, p in ((0, a), (1, b)):
                q, sc = factor((n, i), straight_through=False)
                pk = _pack(q.to(torch.int8), torch.zeros_like(q, dtype=torch.bool), p.scales, p.bits,
                           p.group_size, False)
                packed.append(with_scales(pk, sc))
            out[n] = (packed[0].dequantize() @ packed[1].dequantize(),
                      stored_bytes(packed[0]) + stored_bytes(packed[1]))
    return out


def calibration_kl(base, ft_dir, tokens: torch.Tensor, student) -> float:
    """The gain-weighted KL(fine-tune ‖ student) on the calibration windows: the distillation stage's
    full-set loss, which a budgeted artifact's manifest records as `distill_kl_after`."""
    from deltazip.compress.distill import full_loss, teacher

    weights = {n: p.detach() for n, p in student.named_parameters()}
    return full_loss(base, weights, tokens, teacher(base, ft_dir, tokens))


def measured_gains(family, task: str, tokens: torch.Tensor, factors: dict[str, Factorised],
                   bits: int) -> dict[str, float]:
    """Per tensor, as the shipped allocator calibrates its sensitivity: KL(fine-tune ‖ fine-tune with only
    this tensor's delta replaced by a probe approximation) per unit of the probe's relative error; the probe
    is the rank keeping a quarter of the tensor's components."""
    from deltazip.compress.allocate import Sensitivity

    sensitivity = Sensitivity(family.finetune_dirs[task], tokens, family.base_dir)
    gains = {}
    for name, f in factors.items():
        approx, _ = f.approx(max(1, len(f.s) // 4), bits)
        error = float((approx - f.delta.float()).square().sum() / f.delta.float().square().sum())
        kl = sensitivity.kl(name, approx - f.delta.float())
        gains[name] = max(kl, 1e-12) / max(error, 1e-12) if kl == kl else 1.0
    return gains


def residual_on_top(family, task: str, low_rank_model, budget_bytes: float):
    """Save base + A·B as a model, compress the fine-tune against it with the shipped budgeted pipeline
    (`--budget-bytes`: what the low-rank part left), and return (base + A·B + residual, artifact bytes)."""
    import dataclasses
    import shutil

    from deltazip.compress import compress_model
    from deltazip.config import CompressConfig
    from deltazip.format import decompress, load_delta, read_manifest
    from deltazip.hf import add_delta, load_model

    root = Path(tempfile.mkdtemp(prefix="dz-hybrid-"))
    low_rank_model.save_pretrained(root / "base")
    for f in family.base_dir.glob("*token*"):
        shutil.copy(f, root / "base" / f.name)
    settings = dataclasses.replace(CompressConfig(), budget_bytes=int(budget_bytes))
    compress_model(root / "base", family.finetune_dirs[task], root / "res.dz", settings, name=task,
                   calib=family.calib_path)
    model, _ = load_model(root / "base")
    add_delta(model, decompress(load_delta(root / "res.dz")))
    return model, read_manifest(root / "res.dz")["stats"]["artifact_bytes"]


def run(task: str, ratio: float, bits: int, how: str, hessian: str, tag: str, log: Path,
        distill_steps: int = 0, hybrid: float = 0.0) -> None:
    from transformers.utils import logging as hf_logging

    from deltazip.compress.allocate import calibration_weights
    from deltazip.compress.calibration import calibration_tokens
    from deltazip.family import create_family, exact_match, load_eval_set
    from deltazip.hf import load_model

    hf_logging.disable_progress_bar()
    family = create_family(FAMILY, preset="tiny", seed=0)
    base, tok = load_model(family.base_dir)
    ft, _ = load_model(family.finetune_dirs[task])
    tokens = calibration_tokens(family.base_dir, family.calib_path, 256, 32)
    weights = (calibration_weights(family.finetune_dirs[task], family.base_dir, tokens)
               if hessian == "gain" else None)
    hs = hessians(ft, tokens, weights) if hessian != "none" else {}
    base_params, ft_params = dict(base.named_parameters()), dict(ft.named_parameters())
    factors = {}
    for name, p in base_params.items():
        if p.dim() == 2:
            module = name.removesuffix(".weight")
            factors[name] = Factorised((ft_params[name] - p).detach().float(), hs.get(module),
                                       embed=module == "model.embed_tokens")
    fp16_bytes = 2 * sum(p.numel() for p in base_params.values())
    budget = fp16_bytes / ratio - FIXED_BYTES
    if hybrid:
        budget *= hybrid  # the low-rank part's share; the shipped pipeline compresses the residual
    gains = measured_gains(family, task, tokens, factors, bits) if how == "measured" else None
    if how == "mixed":
        approx, linear_bytes = mixed(factors, budget, bits)
        levels = {n: [] for n in factors}
    else:
        def plan(nbytes: float) -> dict[str, list[int]]:
            if how == "precision":
                return allocate_levels(factors, nbytes, bits)
            return {n: [bits] * r for n, r in allocate(factors, nbytes, bits, how, gains).items()}
        levels, linear_bytes, approx = fit_budget(factors, plan, budget)
    if how == "precision":
        print("levels:", {b: sum(lv.count(b) for lv in levels.values()) for b in (2, 3, 4, 8)}, flush=True)
    ranks = {n: sum(1 for b in lv if b) for n, lv in levels.items()}
    if distill_steps and how not in ("mixed", "precision"):
        chosen = {n: f.packed[ranks[n]] for n, f in factors.items() if ranks[n] > 0}
        tuned = distill_factors(base, family.finetune_dirs[task], tokens,
                                {n.removesuffix(".weight") + ".weight": v for n, v in chosen.items()},
                                distill_steps)
        approx = {**approx, **tuned}
        linear_bytes = sum(nbytes for _, nbytes in approx.values())
    with torch.no_grad():
        for name, (delta, _) in approx.items():
            ft_params[name].copy_(base_params[name] + delta)
    total = linear_bytes + FIXED_BYTES
    if hybrid:
        ft, total = residual_on_top(family, task, ft, fp16_bytes / ratio - linear_bytes)
        total += linear_bytes
    kl = calibration_kl(base, family.finetune_dirs[task], tokens, ft)
    acc = exact_match(ft, tok, load_eval_set(family.eval_path(task)))
    row = {"task": task, "tag": tag, "bits": bits, "alloc": how, "hessian": hessian, "bytes": total,
           "ratio": fp16_bytes / total, "acc": acc, "kl": kl, "ranks": sorted(set(ranks.values())),
           "hybrid": hybrid}
    with log.open("a") as out:
        out.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def write(log: Path, notes: str) -> None:
    from benchmarks._results import markdown_table, write_section
    from benchmarks.ratio_fixed_costs import retention_cells

    rows = []
    for line in log.read_text().splitlines():
        r = json.loads(line)
        rows.append([r["tag"], r["task"], r["bits"], r["alloc"], r["hessian"], r["bytes"],
                     f"{r['ratio']:.2f}x", *retention_cells(r["task"], r["acc"]),
                     f"{min(r['ranks'])}–{max(r['ranks'])}"])
    table = markdown_table(["variant", "task", "factor bits", "ranks by", "Hessian", "est. artifact bytes",
                            "ratio vs fp16", "acc %", "fine-tune acc %", "retention", "ranks"], rows)
    command = ("OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ratio_lowrank.py run TASK --ratio 16 --bits B "
               "--alloc A --hessian H --tag TAG, one per row; then ... write --notes-file NOTES")
    write_section(TITLE, command, table, notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("run", "write"))
    parser.add_argument("task", nargs="?")
    parser.add_argument("--ratio", type=float, default=16.0)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--alloc", default="relative",
                        choices=("uniform", "relative", "absolute", "measured", "mixed", "precision"))
    parser.add_argument("--hessian", choices=("none", "plain", "gain"), default="plain")
    parser.add_argument("--distill-steps", type=int, default=0, help="fit the factors end to end (KL)")
    parser.add_argument("--hybrid", type=float, default=0.0,
                        help="give the low-rank part this share of the budget and compress the residual with "
                             "the shipped budgeted pipeline")
    parser.add_argument("--tag", default="")
    parser.add_argument("--log", type=Path, default=Path(tempfile.gettempdir()) / "ratio_lowrank.jsonl")
    parser.add_argument("--notes-file", type=Path)
    args = parser.parse_args()
    if args.mode == "run":
        run(args.task, args.ratio, args.bits, args.alloc, args.hessian, args.tag, args.log,
            args.distill_steps, args.hybrid)
    else:
        write(args.log, args.notes_file.read_text() if args.notes_file else "")


if __name__ == "__main__":
    main()
