"""OBS column sweep (SparseGPT + GPTQ): jointly prunes (2:4 or a fraction) and quantizes one delta matrix."""

from __future__ import annotations

import torch

from deltazip.compress.quantize import dequantize, fit_scale, likely_kept, quantize, zero_code
from deltazip.packed import PackedLinear

# OBS passes: the second re-quantizes against the least-squares scales refit after the first.
SWEEPS = 2


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹ after damping (damp · mean diag); dead inputs get H_jj = 1."""
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    diag = torch.arange(h.shape[0])
    h[diag, diag] += damp * torch.mean(torch.diag(h))
    for attempt in range(5):  # grow damping if H is numerically indefinite
        factor, info = torch.linalg.cholesky_ex(h)
        if info == 0:
            break
        h[diag, diag] += damp * torch.mean(torch.diag(h)) * 10**attempt
    h_inv = torch.cholesky_inverse(factor)
    return torch.linalg.cholesky(h_inv, upper=True).float()


def solve_delta(delta: torch.Tensor, hessian: torch.Tensor | None, bits: int, sparsity: str,
                group_size: int, damp: float, block_size: int) -> PackedLinear:
    """Compress delta [N, K] given H [K, K] of its inputs (None: identity, i.e. round-to-nearest)."""
    n_rows, n_cols = delta.shape
    sparse24 = sparsity == "2:4"
    prune_fraction = 0.0 if sparsity in ("2:4", "none") else float(sparsity)
    group = n_cols if group_size == -1 else group_size
    if n_cols % group:
        raise ValueError(f"group size {group} does not divide in_features {n_cols}")
    if sparse24 and n_cols % 32:
        raise ValueError(f"2:4 sparsity needs in_features % 32 == 0, got {n_cols}")
    block_size = max(4, block_size - block_size % 4)

    w = delta.float().clone()
    if hessian is None:
        h_inv = torch.eye(n_cols)
    else:
        w[:, torch.diag(hessian) == 0] = 0
        h_inv = inverse_hessian_factor(hessian, damp)
    h = torch.eye(n_cols) if hessian is None else hessian.float()
    best, best_err, fixed = None, None, None
    for _ in range(SWEEPS):
        codes, pruned, scales = _sweep(w.clone(), h_inv, bits, sparse24, prune_fraction, group, block_size,
                                       fixed)
        steps = codes - zero_code(bits)
        scales = refit_scales(delta.float(), steps, scales, h, group)
        err = output_error(delta.float(), steps, scales, h, group).sum()
        if best_err is None or err < best_err:
            best, best_err = (codes, pruned, scales), err
        fixed = scales  # next sweep quantizes against the refit scales
    codes, pruned, scales = best
    return _pack(codes.long(), pruned, scales, bits, group, sparse24)


def _sweep(w: torch.Tensor, h_inv: torch.Tensor, bits: int, sparse24: bool, prune_fraction: float, group: int,
           block_size: int, fixed_scales: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """One OBS pass over the columns of w (modified in place): codes [N, K], pruned mask, scales [N, G]."""
    n_rows, n_cols = w.shape
    codes = torch.full((n_rows, n_cols), float(zero_code(bits)))
    pruned = torch.zeros(n_rows, n_cols, dtype=torch.bool)
    scales = torch.zeros(n_rows, n_cols // group) if fixed_scales is None else fixed_scales.clone()
    scale = torch.ones(n_rows, 1)
    for start in range(0, n_cols, block_size):
        end = min(start + block_size, n_cols)
        w_block = w[:, start:end]  # a view: in-block updates land in w
        h_inv_block = h_inv[start:end, start:end]
        h_inv_diag = torch.diag(h_inv_block)
        err_block = torch.zeros_like(w_block)
        if prune_fraction > 0:
            saliency = w_block.pow(2) / h_inv_diag.pow(2)
            k = int(saliency.numel() * prune_fraction)
            if k > 0:
                threshold = saliency.flatten().kthvalue(k).values
                pruned[:, start:end] = saliency <= threshold
        for i in range(end - start):
            col = start + i
            if col % group == 0:
                if fixed_scales is None:
                    span = w[:, col:col + group]
                    keep = likely_kept(span, sparse24, 1.0 - prune_fraction)
                    scales[:, col // group] = fit_scale(span, bits, keep)[:, 0]
                scale = scales[:, col // group].unsqueeze(1)
            if sparse24 and col % 4 == 0:
                saliency = w_block[:, i:i + 4].pow(2) / h_inv_diag[i:i + 4].pow(2)
                drop = saliency.topk(2, dim=1, largest=False).indices
                pruned[:, col:col + 4].scatter_(1, drop, True)
            column = w_block[:, i]
            q = quantize(column.unsqueeze(1), scale, bits)[:, 0]
            q = torch.where(pruned[:, col], float(zero_code(bits)), q)
            codes[:, col] = q
            approx = dequantize(q.unsqueeze(1), scale, bits)[:, 0]
            err = (column - approx) / h_inv_diag[i]
            w_block[:, i:] -= err.unsqueeze(1) * h_inv_block[i, i:].unsqueeze(0)
            err_block[:, i] = err
        w[:, end:] -= err_block @ h_inv[start:end, end:]
    return codes, pruned, scales


def refit_scales(delta: torch.Tensor, steps: torch.Tensor, scales: torch.Tensor, h: torch.Tensor,
                 group: int) -> torch.Tensor:
    """Refit scales [N, G] to the chosen codes: s_g = (u_gᵀ H_gg Δ_g) / (u_gᵀ H_gg u_g), u = code − zero.

    Exact least squares for ‖(Ŵ − Δ) X‖² when G = 1; per-group (block-diagonal H) otherwise. A row keeps
    its new scales only if its output error drops.
    """
    fitted = scales.clone()
    for g in range(scales.shape[1]):
        cols = slice(g * group, (g + 1) * group)
        steps_h = steps[:, cols] @ h[cols, cols]
        num = (steps_h * delta[:, cols]).sum(1)
        den = (steps_h * steps[:, cols]).sum(1)
        fitted[:, g] = torch.where(den > 0, num / den.clamp_min(1e-30), scales[:, g])
    fitted = fitted.to(torch.float16).clamp_min(torch.finfo(torch.float16).tiny).float()
    better = output_error(delta, steps, fitted, h, group) < output_error(delta, steps, scales, h, group)
    return torch.where(better, fitted, scales)


def output_error(delta: torch.Tensor, steps: torch.Tensor, scales: torch.Tensor, h: torch.Tensor,
                 group: int) -> torch.Tensor:
    """Per-row ‖(Ŵ − Δ) X‖² / n as (Ŵ − Δ) H (Ŵ − Δ)ᵀ diagonal: [N, 1]."""
    diff = scales.repeat_interleave(group, dim=1) * steps - delta
    return ((diff @ h) * diff).sum(1, keepdim=True)


def _pack(codes: torch.Tensor, pruned: torch.Tensor, scales: torch.Tensor, bits: int, group: int,
          sparse24: bool) -> PackedLinear:
    """Full codes [N, K] + pruned mask → PackedLinear (2:4: kept codes and canonical positions only)."""
    n_rows, n_cols = codes.shape
    zeros = torch.full_like(scales, float(zero_code(bits)))
    if not sparse24:
        return PackedLinear.from_codes(codes, scales, zeros, bits, group)
    positions, kept = canonical_24(codes, ~pruned, zero_code(bits))
    return PackedLinear.from_codes(kept, scales, zeros, bits, group, positions=positions, in_features=n_cols)


def canonical_24(codes: torch.Tensor, keep: torch.Tensor, zero: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept codes [N, K/2] and 2:4 positions [N, K/2]; kept zero codes move to the lowest free slots.

    A kept value whose code is the zero code carries no information, so its position is free: moving it
    to the lowest free slot skews the pattern distribution (better entropy coding), values unchanged.
    """
    n_rows, n_cols = codes.shape
    groups = codes.reshape(n_rows, -1, 4)
    nonzero = keep.reshape(n_rows, -1, 4) & (groups != zero)
    if int(nonzero.sum(-1).max()) > 2:
        raise ValueError("more than 2 kept values in a group of 4")
    slot = torch.arange(4)
    # rank slots: nonzero kept values first (by position), then the remaining slots by position
    order = torch.argsort((~nonzero).long() * 4 + slot, dim=-1, stable=True)[..., :2]
    positions, _ = order.sort(dim=-1)
    kept = groups.gather(-1, positions)
    return positions.reshape(n_rows, -1), kept.reshape(n_rows, -1)
