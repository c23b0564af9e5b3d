"""SparseGPT baseline on the FULL fine-tuned weights (not the delta): 2:4 prune + 4-bit quantize via OBS.

A compact re-implementation of SparseGPT (Frantar & Alistarh 2023) with its GPTQ quantizer: per-row asymmetric
min-max 4-bit, block sweep with lazy updates, sequential over transformer blocks (each block is calibrated on
the outputs of the already-compressed blocks before it).
"""

from __future__ import annotations

from pathlib import Path

from deltazip.eval.baselines import BaselineResult, is_block_linear
from deltazip.hf import load_model, unique_parameters


def quantize_rows(w, scale, zero, maxq: int):
    """Fake-quantize columns with per-row scale/zero: scale · (clamp(round(w/scale) + zero) − zero)."""
    import torch

    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return scale * (q - zero)


def row_minmax_params(w, bits: int):
    """Per-row asymmetric min-max scale and zero point [N, 1] (GPTQ's default quantizer)."""
    import torch

    maxq = 2**bits - 1
    lo = torch.clamp(w.min(dim=1, keepdim=True).values, max=0)
    hi = torch.clamp(w.max(dim=1, keepdim=True).values, min=0)
    scale = ((hi - lo) / maxq).clamp(min=1e-8)
    zero = torch.round(-lo / scale)
    return scale.half().float(), zero, maxq


def sparsegpt_solve(weight, hessian, bits: int = 4, prune_n: int = 2, prune_m: int = 4,
                    block_size: int = 128, damp: float = 0.01):
    """Jointly 2:4-prune and quantize one weight [N, K] given its input Hessian [K, K]; returns the new W."""
    import torch

    w = weight.detach().float().clone()
    h = hessian.clone()
    n_cols = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    scale, zero, maxq = row_minmax_params(w, bits)
    h += damp * torch.mean(torch.diag(h)) * torch.eye(n_cols)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    for i1 in range(0, n_cols, block_size):
        i2 = min(i1 + block_size, n_cols)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        pruned = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if i % prune_m == 0:
                saliency = w1[:, i:i + prune_m] ** 2 / torch.diag(hinv1)[i:i + prune_m].reshape(1, -1) ** 2
                drop = torch.topk(saliency, prune_n, dim=1, largest=False).indices
                pruned.scatter_(1, i + drop, True)
            col = w1[:, i]
            q = quantize_rows(col.unsqueeze(1), scale, zero, maxq).squeeze(1)
            q[pruned[:, i]] = 0
            err = (col - q) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w


def sparse24_bytes(n_rows: int, n_cols: int, bits: int) -> int:
    """Structural 2:4 storage: half the values at `bits`, 2-bit position each, fp16 scale+zero per row."""
    kept = n_rows * n_cols // 2
    return -(-kept * (bits + 2) // 8) + n_rows * 4


def sparsegpt_full(base_dir: Path, finetune_dir: Path, calib_ids, budget_bytes: int | None = None,
                   bits: int = 4) -> BaselineResult:
    """SparseGPT 4-bit 2:4 on every block linear of the fine-tune; embed/lm_head/norms stay fp16."""
    import torch
    from torch import nn

    model, _ = load_model(finetune_dir)

    class _Stop(Exception):
        pass

    for layer in model.model.layers:
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        hessians = {n: torch.zeros(m.in_features, m.in_features) for n, m in linears.items()}
        counts = dict.fromkeys(linears, 0)

        def make_hook(name, hessians=hessians, counts=counts):
            def hook(module, inputs, output):
                x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
                hessians[name] += x.T @ x
                counts[name] += x.shape[0]
            return hook

        def stop(module, inputs, output):
            raise _Stop

        handles = [m.register_forward_hook(make_hook(n)) for n, m in linears.items()]
        handles.append(layer.register_forward_hook(stop))
        with torch.no_grad():
            for row in calib_ids.split(8):
                try:
                    model(input_ids=row)
                except _Stop:
                    pass
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for name, module in linears.items():
                hessian = 2 * hessians[name] / max(counts[name], 1)
                module.weight.copy_(sparsegpt_solve(module.weight, hessian, bits=bits))
    size = 0
    for name, param in unique_parameters(model).items():
        size += sparse24_bytes(*param.shape, bits) if is_block_linear(name, param) else param.numel() * 2
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return BaselineResult(f"SparseGPT {bits}-bit 2:4 (full)", weights, size,
                          note="structural 2:4; embed/lm_head/norms fp16")
