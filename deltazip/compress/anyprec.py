"""Any-precision deltas: one set of nested codes from which a valid b-bit delta is read for every b it stores.

The kept values (one 2:4 mask shared by every precision) use a *midrise* uniform grid at each precision b:
w = (q − z_b) · s_b with z_b = 2^(b−1) − ½, q ∈ [0, 2^b). Codes are nested: the (b+1)-bit code of a value is
2·q_b or 2·q_b + 1, so q_b is the top b bits of the widest code — stored as bitplanes, most significant
first, the top b planes are the b-bit codes. Each precision has its own scales (refit by least squares to
its codes), so each view is an ordinary b-bit `PackedLinear` that every delta kernel serves as is.

Solving goes bottom-up ("incremental upscaling"): an OBS sweep at the lowest precision chooses the 2:4 mask
and the codes; each higher precision is a second OBS sweep over the same mask in which every kept value may
only pick one of its parent's two children. The lowest precision is therefore as good as a dedicated midrise
solve, and the higher ones keep OBS error compensation within the nesting constraint.
"""

from __future__ import annotations

import torch

from deltazip.compress.obs import check_layout, inverse_hessian_factor, output_error, refit_scales
from deltazip.format.precision import AnyPrecisionLinear, midrise_zero
from deltazip.packed import PackedLinear

SWEEPS = 2


def solve_any_precision(delta: torch.Tensor, hessian: torch.Tensor | None, precisions: list[int],
                        sparse24: bool, group_size: int, damp: float, block_size: int) -> AnyPrecisionLinear:
    """Nested midrise codes for delta [N, K] at every b in `precisions` (ascending, consecutive)."""
    precisions = sorted(precisions)
    if precisions != list(range(precisions[0], precisions[-1] + 1)):
        raise ValueError(f"any-precision needs consecutive precisions, not {precisions}")
    n_rows, n_cols = delta.shape
    group, block_size = check_layout(n_cols, group_size, sparse24, block_size)
    w0 = delta.float().clone()
    if hessian is None:
        h_inv, h = torch.eye(n_cols), torch.eye(n_cols)
    else:
        w0[:, torch.diag(hessian) == 0] = 0
        h_inv, h = inverse_hessian_factor(hessian, damp), hessian.float()
    target = delta.float()
    views: dict[int, PackedLinear] = {}
    pruned, parent, parent_scales = None, None, None
    for bits in precisions:
        fixed = None if parent_scales is None else parent_scales / 2
        best, best_err = None, None
        for _ in range(SWEEPS):
            codes, mask, scales = _sweep(w0.clone(), h_inv, bits, sparse24, group, block_size, fixed, pruned,
                                         parent)
            steps = torch.where(mask, 0.0, codes - midrise_zero(bits))
            scales = refit_scales(target, steps, scales, h, group)
            err = output_error(target, steps, scales, h, group).sum()
            if best_err is None or err < best_err:
                best, best_err = (codes, mask, scales), err
            fixed = scales
        codes, mask, scales = best
        pruned, parent, parent_scales = mask, codes, scales
        views[bits] = _pack(codes.long(), mask, scales, bits, group, sparse24)
    return AnyPrecisionLinear(views)


def _quantize(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale + midrise_zero(bits)), 0, (1 << bits) - 1)


def _fit_scale(w: torch.Tensor, bits: int, keep: torch.Tensor) -> torch.Tensor:
    """Per-row midrise scale [N, 1] minimizing the squared error of the kept values over a shrink grid."""
    amax = (w.abs() * keep).amax(dim=1, keepdim=True).clamp_min(1e-12)
    best_err = torch.full_like(amax, float("inf"))
    best = amax / (1 << (bits - 1))
    for shrink in torch.linspace(0.3, 1.0, 15).tolist():
        scale = amax * shrink / midrise_zero(bits) / 1.0
        approx = (_quantize(w, scale, bits) - midrise_zero(bits)) * scale
        err = ((approx - w).pow(2) * keep).sum(1, keepdim=True)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, scale, best)
    return best.to(torch.float16).clamp_min(torch.finfo(torch.float16).tiny).float()


def _sweep(w: torch.Tensor, h_inv: torch.Tensor, bits: int, sparse24: bool, group: int, block_size: int,
           fixed_scales: torch.Tensor | None, pruned_in: torch.Tensor | None,
           parent: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One OBS pass: codes [N, K] (float), pruned mask [N, K], scales [N, G]. With `parent` codes each kept
    value picks 2·parent or 2·parent + 1; with `pruned_in` the mask is fixed."""
    from deltazip.compress.quantize import likely_kept

    n_rows, n_cols = w.shape
    zero = midrise_zero(bits)
    codes = torch.zeros(n_rows, n_cols)
    pruned = torch.zeros(n_rows, n_cols, dtype=torch.bool) if pruned_in is None else pruned_in.clone()
    scales = torch.zeros(n_rows, n_cols // group) if fixed_scales is None else fixed_scales.clone()
    scale = torch.ones(n_rows, 1)
    for start in range(0, n_cols, block_size):
        end = min(start + block_size, n_cols)
        w_block = w[:, start:end]
        h_inv_block = h_inv[start:end, start:end]
        h_inv_diag = torch.diag(h_inv_block)
        err_block = torch.zeros_like(w_block)
        for i in range(end - start):
            col = start + i
            if col % group == 0:
                if fixed_scales is None:
                    span = w[:, col:col + group]
                    keep = (likely_kept(span, sparse24, 1.0) if pruned_in is None
                            else (~pruned[:, col:col + group]).float())
                    scales[:, col // group] = _fit_scale(span, bits, keep)[:, 0]
                scale = scales[:, col // group].unsqueeze(1)
            if sparse24 and pruned_in is None and col % 4 == 0:
                saliency = w_block[:, i:i + 4].pow(2) / h_inv_diag[i:i + 4].pow(2)
                drop = saliency.topk(2, dim=1, largest=False).indices
                pruned[:, col:col + 4].scatter_(1, drop, True)
            column = w_block[:, i]
            s = scale[:, 0]
            if parent is None:
                q = _quantize(column.unsqueeze(1), scale, bits)[:, 0]
            else:
                lo = 2 * parent[:, col]
                v_lo, v_hi = (lo - zero) * s, (lo + 1 - zero) * s
                q = torch.where((column - v_lo).abs() <= (column - v_hi).abs(), lo, lo + 1)
            approx = torch.where(pruned[:, col], 0.0, (q - zero) * s)
            codes[:, col] = torch.where(pruned[:, col], 0.0, q)
            err = (column - approx) / h_inv_diag[i]
            w_block[:, i:] -= err.unsqueeze(1) * h_inv_block[i, i:].unsqueeze(0)
            err_block[:, i] = err
        w[:, end:] -= err_block @ h_inv[start:end, end:]
    return codes, pruned, scales


def _pack(codes: torch.Tensor, pruned: torch.Tensor, scales: torch.Tensor, bits: int, group: int,
          sparse24: bool) -> PackedLinear:
    n_rows, n_cols = codes.shape
    zeros = torch.full_like(scales, midrise_zero(bits))
    if not sparse24:
        return PackedLinear.from_codes(codes, scales, zeros, bits, group)
    keep = ~pruned.reshape(n_rows, -1, 4)
    slot = torch.arange(4)
    order = torch.argsort((~keep).long() * 4 + slot, dim=-1, stable=True)[..., :2]
    positions, _ = order.sort(dim=-1)
    kept = codes.reshape(n_rows, -1, 4).gather(-1, positions)
    return PackedLinear.from_codes(kept.reshape(n_rows, -1), scales, zeros, bits, group,
                                   positions=positions.reshape(n_rows, -1), in_features=n_cols)


def nested_views(top: PackedLinear, precisions: list[int], scales: dict[int, torch.Tensor],
                 zeros: dict[int, torch.Tensor] | None = None) -> AnyPrecisionLinear:
    """The views of widest-code `top` at each precision: its codes' top b bits with the given scales."""
    views = {}
    for bits in precisions:
        codes = top.codes() >> (top.bits - bits)
        z = zeros[bits] if zeros else torch.full_like(scales[bits].float(), midrise_zero(bits))
        positions = top.positions() if top.sparse24 else None
        views[bits] = PackedLinear.from_codes(codes, scales[bits], z, bits, top.group_size,
                                              positions=positions, in_features=top.in_features)
    return AnyPrecisionLinear(views)
