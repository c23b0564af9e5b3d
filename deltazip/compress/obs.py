"""OBS column sweep (SparseGPT + GPTQ): jointly prunes (2:4 or a fraction) and quantizes one delta matrix.

One sweep, GPTQ-style: the columns are visited once (by groups of 4, in decreasing input energy when the
scale is per row), each column's quantization error is fed back to the columns not yet visited through
the upper Cholesky factor U of H⁻¹ — within a block of `block_size` columns by rank-1 updates (inside a
sub-block) and small GEMMs, to the rest of the matrix by one GEMM per block ("lazy batch" updates).
The 2:4 mask of each group of 4 is chosen when the sweep reaches it, on the error-updated weights,
keeping the two values whose quantized value removes the most output error. After the sweep the
per-row scales are refit in closed form (least squares under H, sketched for large K), keeping a row's
new scale only where it lowers the estimated error.

Layout: the sweep runs on Wᵀ [K, N] so a column is a contiguous row; the per-column work runs on one
thread (tiny ops lose more to thread hand-off than they gain), the GEMMs on all of torch's threads.
This module is over 400 lines: the sweep, the factorisation it needs, the scale refit and the 2:4 packing
are one solver and are read together.
"""

from __future__ import annotations

import contextlib

import torch

from deltazip.compress.quantize import fit_scale, likely_kept, zero_code
from deltazip.compress.stream import cat_rows
from deltazip.packed import PackedLinear
from deltazip.threads import fixed_threads

SUB_BLOCK = 32  # columns per rank-1-update sub-block inside a block (multiple of 4)
SECOND_SWEEP_MAX = 1 << 22  # layers up to this many parameters (and K ≤ 2·SKETCH) get a second sweep
SKETCH = 256  # columns of the random sketch of H used by the per-row scale refit when K > 2·SKETCH
FIT_COLUMNS = 1024  # at most this many columns (whole groups of 4) feed the initial per-row scale fit


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU) after damping (damp · mean diag); dead inputs: H_jj = 1."""
    return _factors(hessian, damp)[0]


def _factors(hessian: torch.Tensor, damp: float, owned: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, L): U the upper Cholesky factor of the damped H⁻¹, L the Cholesky factor of P H P (damped).

    With P the reversal permutation and P H P = L Lᵀ: H⁻¹ = (P L⁻¹ P)ᵀ (P L⁻¹ P) and H = (P L)(P L)ᵀ —
    one Cholesky and one triangular inverse (by GEMMs), in float32. `owned`: damp `hessian` in place.
    """
    h = _damped(hessian, damp, owned).flip(0, 1)
    lower = _cholesky_growing_damping(h, damp)
    del h
    return _lower_inverse(lower).flip(0, 1), lower


def _cholesky_growing_damping(h: torch.Tensor, damp: float) -> torch.Tensor:
    """The lower Cholesky factor of `h`, its diagonal grown in place while it is numerically indefinite."""
    eye = torch.arange(h.shape[0], device=h.device)
    for attempt in range(6):
        lower, info = torch.linalg.cholesky_ex(h)
        if info == 0:
            return lower
        h[eye, eye] += damp * torch.mean(torch.diag(h)) * 10**attempt + 1e-6
    raise ValueError("the input Hessian is not positive definite even after damping")


def _sketched_factors(hessian: torch.Tensor, order: torch.Tensor | None,
                      damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, F·S) for the sketched path: U as in `_factors` for H permuted by `order`, and the sketch factor
    of `refit_scales` ((P L) S, S the seeded Gaussian [K, SKETCH]) — the same values as `_factors` then
    `refit_scales(lower=L)`, with a smaller working set (K = 11008: 0.45 GiB per K × K matrix): P H P is
    built in one copy (no separate flip), freed after the Cholesky; L is freed once S is applied and the
    inverse formed; the unflipped inverse is freed as soon as U is copied out of it."""
    n = hessian.shape[0]
    order = torch.arange(n, device=hessian.device) if order is None else order
    diag = torch.diag(hessian).float()[order]  # the diagonal in `order`: damping as `_damped` computes it
    dead = diag == 0
    diag[dead] = 1.0
    shift = damp * torch.mean(diag)
    rev = order.flip(0)
    h = hessian.float().index_select(0, rev).index_select(1, rev)  # P H_order P
    eye = torch.arange(n, device=h.device)
    h[eye[dead.flip(0)], eye[dead.flip(0)]] = 1.0
    h[eye, eye] += shift
    lower = _cholesky_growing_damping(h, damp)
    del h
    gen = torch.Generator(device=lower.device).manual_seed(0)
    sketch = torch.randn(n, SKETCH, generator=gen, device=lower.device) / SKETCH**0.5
    factor = (lower @ sketch).flip(0)
    inverse = _lower_inverse(lower)
    del lower
    u = inverse.flip(0, 1)
    del inverse
    return u, factor


class NotDefinite(ValueError):
    """The in-place factorisation met an indefinite Hessian and has overwritten it: recompute H and solve
    again without `consume` (the out-of-place path grows the damping)."""


def _sketched_factors_(hessian: torch.Tensor, order: torch.Tensor | None,
                       damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`_sketched_factors` computed in the Hessian's own buffer (consumed; it becomes U): the same values
    (data movement and the same LAPACK/GEMM calls) with one K × K matrix and row-chunk temporaries."""
    n = hessian.shape[0]
    order = torch.arange(n, device=hessian.device) if order is None else order
    diag = torch.diag(hessian).float()[order]
    dead = diag == 0
    diag[dead] = 1.0
    shift = damp * torch.mean(diag)
    h = hessian
    _permute_(h, order.flip(0))  # P H_order P
    eye = torch.arange(n, device=h.device)
    h[eye[dead.flip(0)], eye[dead.flip(0)]] = 1.0
    h[eye, eye] += shift
    _transpose_(h)  # LAPACK works column-major: h.mT is then the matrix, contiguous for it
    info = torch.zeros((), dtype=torch.int32, device=h.device)
    torch.linalg.cholesky_ex(h.mT, out=(h.mT, info))
    if info != 0:
        raise NotDefinite("the input Hessian is not positive definite after damping")
    _transpose_(h)  # L, row-major
    gen = torch.Generator(device=h.device).manual_seed(0)
    sketch = torch.randn(n, SKETCH, generator=gen, device=h.device) / SKETCH**0.5
    factor = (h @ sketch).flip(0)
    _lower_inverse_(h)
    _flip_(h)
    return h, factor


def _permute_(h: torch.Tensor, perm: torch.Tensor, rows: int = 512) -> None:
    """h ← h[perm][:, perm] in place: rows along the permutation's cycles, columns by row chunks."""
    p = perm.tolist()
    seen = bytearray(len(p))
    for start in range(len(p)):
        if seen[start]:
            continue
        seen[start] = 1
        if p[start] == start:
            continue
        held, i = h[start].clone(), start
        while p[i] != start:
            h[i] = h[p[i]]
            i = p[i]
            seen[i] = 1
        h[i] = held
    for r in range(0, h.shape[0], rows):
        h[r:r + rows] = h[r:r + rows].index_select(1, perm)


def _transpose_(h: torch.Tensor, tile: int = 512) -> None:
    """Square h ← hᵀ in place, tile pair by tile pair."""
    n = h.shape[0]
    for a in range(0, n, tile):
        h[a:a + tile, a:a + tile] = h[a:a + tile, a:a + tile].T.clone()
        for b in range(a + tile, n, tile):
            upper = h[a:a + tile, b:b + tile].clone()
            h[a:a + tile, b:b + tile] = h[b:b + tile, a:a + tile].T
            h[b:b + tile, a:a + tile] = upper.T


def _flip_(h: torch.Tensor, chunk: int = 1 << 22) -> None:
    """h ← h.flip(0, 1) in place (for a contiguous matrix: its storage reversed)."""
    flat = h.view(-1)
    total = flat.numel()
    for a in range(0, total // 2, chunk):
        b = min(a + chunk, total // 2)
        left = flat[a:b].clone()
        flat[a:b] = flat[total - b:total - a].flip(0)
        flat[total - b:total - a] = left.flip(0)


def _lower_inverse_(lower: torch.Tensor, leaf: int = 256, rows: int = 1024) -> None:
    """`_lower_inverse` in place: the same blocks and products, the off-diagonal block by row (then
    column) chunks, so the temporaries are chunk-sized."""
    n = lower.shape[0]
    if n <= leaf:
        lower.copy_(_lower_inverse(lower, leaf))
        return
    m = n // 2
    _lower_inverse_(lower[:m, :m], leaf, rows)
    _lower_inverse_(lower[m:, m:], leaf, rows)
    a_inv, c_inv, off = lower[:m, :m], lower[m:, m:], lower[m:, :m]
    for r in range(0, n - m, rows):
        off[r:r + rows] = _mm_lower(off[r:r + rows], a_inv, leaf)
    for c in range(0, m, rows):
        off[:, c:c + rows] = -_lower_mm(c_inv, off[:, c:c + rows], leaf)


def _damped(hessian: torch.Tensor, damp: float, owned: bool = False) -> torch.Tensor:
    h = hessian.float() if owned else hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    diag = torch.arange(h.shape[0], device=h.device)
    h[diag, diag] += damp * torch.mean(torch.diag(h))
    return h


def _lower_inverse(lower: torch.Tensor, leaf: int = 256) -> torch.Tensor:
    """Inverse of a lower-triangular matrix by recursive 2x2 blocking (GEMMs; LAPACK's trtri is slow here)."""
    n = lower.shape[0]
    if n <= leaf:
        eye = torch.eye(n, dtype=lower.dtype, device=lower.device)
        return torch.linalg.solve_triangular(lower, eye, upper=False)
    m = n // 2
    out = torch.zeros_like(lower)
    a_inv = _lower_inverse(lower[:m, :m], leaf)
    c_inv = _lower_inverse(lower[m:, m:], leaf)
    out[:m, :m] = a_inv
    out[m:, m:] = c_inv
    out[m:, :m] = -_lower_mm(c_inv, _mm_lower(lower[m:, :m], a_inv, leaf), leaf)
    return out


def _lower_mm(t: torch.Tensor, d: torch.Tensor, leaf: int) -> torch.Tensor:
    """t @ d for lower-triangular t, skipping its zero upper half (recursively: ~half a GEMM's work)."""
    n = t.shape[0]
    if n <= leaf:
        return t @ d
    m = n // 2
    top = _lower_mm(t[:m, :m], d[:m], leaf)
    bottom = _lower_mm(t[m:, m:], d[m:], leaf).addmm_(t[m:, :m], d[:m])
    return torch.cat([top, bottom])


def _mm_lower(d: torch.Tensor, t: torch.Tensor, leaf: int) -> torch.Tensor:
    """d @ t for lower-triangular t, skipping its zero upper half."""
    n = t.shape[0]
    if n <= leaf:
        return d @ t
    m = n // 2
    left = _mm_lower(d[:, :m], t[:m, :m], leaf).addmm_(d[:, m:], t[m:, :m])
    right = _mm_lower(d[:, m:], t[m:, m:], leaf)
    return torch.cat([left, right], dim=1)



def check_layout(n_cols: int, group_size: int, sparse24: bool, block_size: int) -> tuple[int, int]:
    """(scale group width, OBS block width in whole 2:4 groups); ValueError for a layout that cannot be."""
    group = n_cols if group_size == -1 else group_size
    if n_cols % group:
        raise ValueError(f"group size {group} does not divide in_features {n_cols}")
    if sparse24 and n_cols % 32:
        raise ValueError(f"2:4 sparsity needs in_features % 32 == 0, got {n_cols}")
    return group, max(4, block_size - block_size % 4)

def solve_delta(delta: torch.Tensor, hessian: torch.Tensor | None, bits: int, sparsity: str,
                group_size: int, damp: float, block_size: int, consume: bool = False) -> PackedLinear:
    """Compress delta [N, K] given H [K, K] of its inputs (None: identity, i.e. round-to-nearest).

    `consume`: `delta` (fp32) and `hessian` may be overwritten (same result, less memory: the sketched
    path then factorises H in its own buffer; NotDefinite when that fails: solve again without it).
    """
    n_rows, n_cols = delta.shape
    sparse24 = sparsity == "2:4"
    prune_fraction = 0.0 if sparsity in ("2:4", "none") else float(sparsity)
    group, block_size = check_layout(n_cols, group_size, sparse24, block_size)
    w = delta.float()
    if hessian is None:
        steps, pruned, scales = _round_to_nearest(w, bits, sparse24, prune_fraction, group)
        return _pack(steps, pruned, scales, bits, group, sparse24)

    dead = torch.diag(hessian) == 0
    owned = consume or w.data_ptr() != delta.data_ptr()  # w may be written
    if bool(dead.any()):
        w = w if owned else w.clone()
        w[:, dead] = 0
    per_row = group == n_cols
    order = _act_order(hessian) if per_row and n_cols % 4 == 0 else None
    sketched = per_row and n_cols > 2 * SKETCH
    h = factor = None
    if order is not None and owned:
        for r in range(0, n_rows, 1024):  # permute the columns in place, a row chunk at a time
            w[r:r + 1024] = w[r:r + 1024].index_select(1, order)
    elif order is not None:
        w = w.index_select(1, order)
    if sketched and consume and hessian.dtype == torch.float32 and hessian.is_contiguous():
        u, factor = _sketched_factors_(hessian, order, damp)
        del hessian
    elif sketched:  # H itself is not needed after the factorisation: only U and the sketch factor
        u, factor = _sketched_factors(hessian, order, damp)
    else:
        h = hessian.float()
        if order is not None:
            h = h.index_select(0, order).index_select(1, order)
        u, _ = _factors(h, damp)
    scales = _initial_row_scales(w, bits, sparse24, prune_fraction) if per_row else None
    sketch = None
    if owned and factor is not None:  # the refit needs only w's sketch: w is freed once the sweep copied it
        sketch = torch.cat([w[r:r + 4096] @ factor for r in range(0, n_rows, 4096)])
    steps, pruned, scales = _sweep(w, u, bits, sparse24, prune_fraction, group, block_size, scales,
                                   release=sketch is not None)
    scales = refit_scales(w, steps, scales, h, group, factor=factor, delta_factor=sketch)
    if h is not None and n_rows * n_cols <= SECOND_SWEEP_MAX:
        # a small layer: sweep again against the refit scales and keep, per row, the better (exact error)
        steps2, pruned2, scales2 = _sweep(w, u, bits, sparse24, prune_fraction, group, block_size, scales)
        scales2 = refit_scales(w, steps2, scales2, h, group)
        better = output_error(w, steps2, scales2, h, group) < output_error(w, steps, scales, h, group)
        steps, pruned = torch.where(better, steps2, steps), torch.where(better, pruned2, pruned)
        scales = torch.where(better, scales2, scales)
    del u
    if order is not None:
        inverse = torch.argsort(order)
        steps, pruned = steps.index_select(1, inverse), pruned.index_select(1, inverse)
    return _pack(steps, pruned, scales, bits, group, sparse24)


def _act_order(hessian: torch.Tensor) -> torch.Tensor:
    """Column order: groups of 4 by decreasing largest input energy diag(H) (2:4 groups stay whole)."""
    energy = torch.diag(hessian).float().reshape(-1, 4).amax(1)
    first = torch.argsort(energy, descending=True, stable=True) * 4
    return (first.unsqueeze(1) + torch.arange(4, device=hessian.device)).reshape(-1)


def _initial_row_scales(w: torch.Tensor, bits: int, sparse24: bool, prune_fraction: float) -> torch.Tensor:
    """Per-row scales [N, 1] fitted to the values a magnitude prune would keep (a subsample of columns)."""
    n_rows, n_cols = w.shape
    if n_cols > FIT_COLUMNS and n_cols % 4 == 0:
        stride = -(-n_cols // FIT_COLUMNS)
        w = w.reshape(n_rows, -1, 4)[:, ::stride].reshape(n_rows, -1)
    if sparse24 and w.shape[1] % 4 == 0:  # the fit serves the 2 largest of each 4: fit on those alone
        groups = w.reshape(n_rows, -1, 4)
        return fit_scale(groups.gather(-1, groups.abs().topk(2, dim=-1).indices).reshape(n_rows, -1), bits)
    return fit_scale(w, bits, likely_kept(w, sparse24, 1.0 - prune_fraction))


def _round_to_nearest(w: torch.Tensor, bits: int, sparse24: bool, prune_fraction: float,
                      group: int) -> tuple[torch.Tensor, ...]:
    """No Hessian (H = I): magnitude-aware pruning and round-to-nearest, vectorised over the whole matrix;
    then once more against the least-squares scales, keeping per row the pass with the smaller error."""
    n_rows, n_cols = w.shape
    scales = torch.cat([fit_scale(w[:, g:g + group], bits, likely_kept(w[:, g:g + group], sparse24,
                                                                        1.0 - prune_fraction))
                        for g in range(0, n_cols, group)], dim=1)
    best = None
    for _ in range(2):
        steps, pruned = _rtn_pass(w, scales, bits, sparse24, prune_fraction, group)
        scales = _fp16(_identity_refit(w, steps, scales, group))
        err = (steps * scales.repeat_interleave(group, dim=1) - w).square().sum(1, keepdim=True)
        if best is None:
            best = (steps, pruned, scales, err)
            continue
        better = err < best[3]
        steps, pruned = torch.where(better, steps, best[0]), torch.where(better, pruned, best[1])
        scales = torch.where(better, scales, best[2])
    return steps, pruned, scales


def _identity_refit(w: torch.Tensor, steps: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """Per group, s = Σ u·w / Σ u² (least squares with H = I); the old scale where u is all zero."""
    n_rows = w.shape[0]
    num = (steps * w).reshape(n_rows, -1, group).sum(-1)
    den = steps.square().reshape(n_rows, -1, group).sum(-1)
    return torch.where(den > 0, num / den.clamp_min(1e-30), scales)


def _rtn_pass(w: torch.Tensor, scales: torch.Tensor, bits: int, sparse24: bool, prune_fraction: float,
              group: int) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_cols = w.shape
    full = scales.repeat_interleave(group, dim=1)
    z, top = zero_code(bits), (1 << bits) - 1 - zero_code(bits)
    steps = torch.round(w / full).clamp_(-z, top)
    if sparse24:
        gain = w.square() - (w - steps * full).square()
        drop = gain.reshape(n_rows, -1, 4).topk(2, dim=-1, largest=False).indices
        pruned = torch.zeros(n_rows, n_cols // 4, 4, dtype=torch.bool, device=w.device)
        pruned = pruned.scatter_(-1, drop, True).reshape(n_rows, n_cols)
    elif prune_fraction > 0:
        k = int(w.numel() * prune_fraction)
        pruned = w.abs() <= w.abs().flatten().kthvalue(k).values if k else torch.zeros_like(w).bool()
    else:
        pruned = torch.zeros_like(w, dtype=torch.bool)
    steps[pruned] = 0
    return steps, pruned


def _sweep(w: torch.Tensor, u: torch.Tensor, bits: int, sparse24: bool, prune_fraction: float, group: int,
           block_size: int, fixed_scales: torch.Tensor | None,
           release: bool = False) -> tuple[torch.Tensor, ...]:
    """One OBS pass over the columns of w (not modified): steps (code − zero, int8) [N, K], pruned mask
    [N, K], scales [N, G].

    `fixed_scales` [N, G]: quantize against them; None: fit each group's scale when the sweep reaches the
    group (on the error-updated weights). Working memory: Wᵀ plus two [block, N] buffers.
    """
    n_rows, n_cols = w.shape
    device = w.device
    z, top = zero_code(bits), (1 << bits) - 1 - zero_code(bits)
    wt = w.T.contiguous()  # [K, N]: column k of w is row k of wt
    if release:  # the caller gave w up (solve_delta's `consume`): free its memory now
        w.set_()
    steps = torch.zeros(n_cols, n_rows, dtype=torch.int8 if bits <= 8 else torch.int32, device=device)
    pruned = torch.zeros(n_cols, n_rows, dtype=torch.bool, device=device)
    block_steps = torch.zeros(block_size, n_rows, device=device)
    block_errs = torch.zeros(block_size, n_rows, device=device)
    if fixed_scales is None:
        scales = torch.zeros(n_rows, n_cols // group, device=device)
    else:
        scales = fixed_scales.reshape(n_rows, n_cols // group).float().clone()
    scale = inv_scale = None
    keep = torch.ones(4, n_rows, device=device)
    drop_mask = torch.zeros(4, n_rows, dtype=torch.bool, device=device)
    sub = max(4, SUB_BLOCK - SUB_BLOCK % 4)
    for start in range(0, n_cols, block_size):
        end = min(start + block_size, n_cols)
        if prune_fraction > 0:  # unstructured: a saliency threshold over the block's entries
            saliency = wt[start:end].square() / torch.diag(u)[start:end, None].square()
            k = int(saliency.numel() * prune_fraction)
            if k > 0:
                pruned[start:end] = saliency <= saliency.flatten().kthvalue(k).values
        errs = block_errs[:end - start]
        with fixed_threads(1) if device.type == "cpu" else contextlib.nullcontext():
            for a in range(start, end, sub):
                b = min(a + sub, end)
                u_sub = u[a:b, a:b]
                inv_diag = (1.0 / torch.diag(u_sub)).tolist()
                for g in range(a, b, 4):
                    if g % group == 0:
                        if fixed_scales is None:
                            span = wt[g:g + group].T
                            kept = likely_kept(span, sparse24, 1.0 - prune_fraction)
                            scales[:, g // group] = fit_scale(span, bits, kept)[:, 0]
                        scale, inv_scale = scales[:, g // group], 1.0 / scales[:, g // group]
                    if sparse24:  # keep the 2 of 4 whose quantized values remove the most output error
                        wg = wt[g:g + 4]
                        approx = torch.round(wg * inv_scale).clamp_(-z, top).mul_(scale)
                        gain = (wg.square() - (wg - approx).square()) * torch.diag(u_sub)[g - a:g - a + 4,
                                                                                           None].pow(-2)
                        drop = gain.topk(2, dim=0, largest=False).indices
                        keep.fill_(1.0).scatter_(0, drop, 0.0)
                        drop_mask.fill_(False).scatter_(0, drop, True)
                        pruned[g:g + 4] = drop_mask
                    for j in range(g, min(g + 4, b)):
                        col, step, err = wt[j], block_steps[j - start], errs[j - start]
                        torch.mul(col, inv_scale, out=step)
                        step.round_().clamp_(-z, top)
                        if sparse24:
                            step.mul_(keep[j - g])
                        elif prune_fraction > 0:
                            step.masked_fill_(pruned[j], 0.0)
                        torch.addcmul(col, step, scale, value=-1, out=err)
                        err.mul_(inv_diag[j - a])
                        if j + 1 < b:
                            wt[j + 1:b].addr_(u_sub[j - a, j + 1 - a:], err, alpha=-1)
                if b < end:
                    wt[b:end].addmm_(u[a:b, b:end].T, errs[a - start:b - start], alpha=-1)
        steps[start:end] = block_steps[:end - start]
        if end < n_cols:
            wt[end:].addmm_(u[start:end, end:].T, errs, alpha=-1)
    return steps.T, pruned.T, scales


def refit_scales(delta: torch.Tensor, steps: torch.Tensor, scales: torch.Tensor, h: torch.Tensor | None,
                 group: int, lower: torch.Tensor | None = None, factor: torch.Tensor | None = None,
                 delta_factor: torch.Tensor | None = None) -> torch.Tensor:
    """Refit scales [N, G] to the chosen codes: s_g = (u_gᵀ H_gg Δ_g) / (u_gᵀ H_gg u_g), u = code − zero.

    Least squares for ‖(Ŵ − Δ) X‖² when G = 1 — with `lower` (L of P H P = L Lᵀ, H damped, so F = P L has
    F Fᵀ = H) H is sketched as (F·S)(F·S)ᵀ, S a seeded Gaussian [K, SKETCH]; per group (block-diagonal H)
    otherwise. A row keeps its new scales only where the (estimated) output error drops. `factor`: that
    sketch (P L)·S already computed (`_sketched_factors`), in place of `lower`; `delta_factor`: Δ·(that
    factor), computed in the same 4096-row chunks (then `delta` is not read).
    """
    n_rows, n_cols = steps.shape
    if group == n_cols:
        a = torch.zeros(n_rows, 1, device=steps.device)
        b = torch.zeros(n_rows, 1, device=steps.device)
        if lower is not None:
            gen = torch.Generator(device=lower.device).manual_seed(0)
            sketch = torch.randn(n_cols, SKETCH, generator=gen, device=lower.device) / SKETCH**0.5
            factor = (lower @ sketch).flip(0)  # P L S: E[factor factorᵀ] = H (damped)
        sketched = factor is not None
        for r in range(0, n_rows, 4096):  # row chunks: int8 steps become fp32 a chunk at a time
            rows = slice(r, r + 4096)
            st = steps[rows].float()
            if sketched:
                sx = st @ factor
                dx = delta[rows] @ factor if delta_factor is None else delta_factor[rows]
                a[rows], b[rows] = (sx * sx).sum(1, keepdim=True), (sx * dx).sum(1, keepdim=True)
            else:
                sh = st @ h
                a[rows], b[rows] = (sh * st).sum(1, keepdim=True), (sh * delta[rows]).sum(1, keepdim=True)
        fitted = _fp16(torch.where(a > 0, b / a.clamp_min(1e-30), scales))
        # per row, error(s) − ΔHΔᵀ = a·s² − 2·b·s
        better = a * fitted.square() - 2 * b * fitted < a * scales.square() - 2 * b * scales
        return torch.where(better, fitted, scales)
    fitted = scales.clone()
    for g in range(scales.shape[1]):
        cols = slice(g * group, (g + 1) * group)
        group_steps = steps[:, cols].float()
        steps_h = group_steps @ h[cols, cols]
        num = (steps_h * delta[:, cols]).sum(1)
        den = (steps_h * group_steps).sum(1)
        fitted[:, g] = torch.where(den > 0, num / den.clamp_min(1e-30), scales[:, g])
    fitted = _fp16(fitted)
    better = output_error(delta, steps, fitted, h, group) < output_error(delta, steps, scales, h, group)
    return torch.where(better, fitted, scales)


def _fp16(scales: torch.Tensor) -> torch.Tensor:
    return scales.to(torch.float16).clamp_min(torch.finfo(torch.float16).tiny).float()


def output_error(delta: torch.Tensor, steps: torch.Tensor, scales: torch.Tensor, h: torch.Tensor,
                 group: int) -> torch.Tensor:
    """Per-row ‖(Ŵ − Δ) X‖² / n as (Ŵ − Δ) H (Ŵ − Δ)ᵀ diagonal: [N, 1] (block-diagonal H per group)."""
    diff = scales.repeat_interleave(group, dim=1) * steps - delta
    if group == delta.shape[1]:
        return ((diff @ h) * diff).sum(1, keepdim=True)
    out = torch.zeros(delta.shape[0], 1, device=delta.device)
    for g in range(0, delta.shape[1], group):
        d = diff[:, g:g + group]
        out += ((d @ h[g:g + group, g:g + group]) * d).sum(1, keepdim=True)
    return out


def _pack(steps: torch.Tensor, pruned: torch.Tensor, scales: torch.Tensor, bits: int, group: int,
          sparse24: bool, rows: int = 1024) -> PackedLinear:
    """Steps (code − zero) [N, K] + pruned mask → PackedLinear (2:4: kept codes and canonical positions),
    row chunk by row chunk (the 2:4 canonicalisation's int64 temporaries are 16× the int8 steps)."""
    if steps.shape[0] > rows:
        return cat_rows([_pack_rows(steps[r:r + rows], pruned[r:r + rows], scales[r:r + rows], bits, group,
                                    sparse24) for r in range(0, steps.shape[0], rows)])
    return _pack_rows(steps, pruned, scales, bits, group, sparse24)


def _pack_rows(steps: torch.Tensor, pruned: torch.Tensor, scales: torch.Tensor, bits: int, group: int,
               sparse24: bool) -> PackedLinear:
    n_rows, n_cols = steps.shape
    codes = (steps + zero_code(bits)).to(torch.uint8 if bits <= 8 else torch.int32).cpu()
    scales = scales.cpu()
    zeros = torch.full_like(scales, float(zero_code(bits)))
    if not sparse24:
        return PackedLinear.from_codes(codes, scales, zeros, bits, group)
    positions, kept = canonical_24(codes, ~pruned.cpu(), zero_code(bits))
    return PackedLinear.from_codes(kept, scales, zeros, bits, group, positions=positions, in_features=n_cols)


def _canonical_table() -> torch.Tensor:
    """For each 4-bit mask of nonzero kept slots (≤ 2 set): the 2 positions to store, ascending — the
    nonzero slots, then the lowest free slots."""
    table = torch.zeros(16, 2, dtype=torch.long)
    for mask in range(16):
        nonzero = [i for i in range(4) if mask >> i & 1]
        table[mask] = torch.tensor(sorted((nonzero + [i for i in range(4) if i not in nonzero])[:2]))
    return table


_CANONICAL = _canonical_table()
_POPCOUNT = torch.tensor([bin(m).count("1") for m in range(16)])


def canonical_24(codes: torch.Tensor, keep: torch.Tensor, zero: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept codes [N, K/2] and 2:4 positions [N, K/2]; kept zero codes move to the lowest free slots.

    A kept value whose code is the zero code carries no information, so its position is free: moving it
    to the lowest free slot skews the pattern distribution (better entropy coding), values unchanged.
    """
    n_rows, n_cols = codes.shape
    groups = codes.reshape(n_rows, -1, 4)
    nonzero = keep.reshape(n_rows, -1, 4) & (groups != zero)
    weights = torch.tensor([1, 2, 4, 8], dtype=torch.uint8, device=codes.device)
    mask = (nonzero.to(torch.uint8) * weights).sum(-1, dtype=torch.uint8).long()  # [N, K/4]
    if int(_POPCOUNT.to(mask.device)[mask].max()) > 2:
        raise ValueError("more than 2 kept values in a group of 4")
    positions = _CANONICAL.to(mask.device)[mask]  # [N, K/4, 2]
    kept = groups.gather(-1, positions)
    return positions.reshape(n_rows, -1), kept.reshape(n_rows, -1)
