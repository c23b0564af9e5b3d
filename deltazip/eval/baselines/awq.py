"""4-bit groupwise AWQ on the full fine-tuned weights through NVIDIA Model Optimizer (fake-quantized model).

Falls back to round-to-nearest 4-bit groupwise (labelled "RTN") only where modelopt cannot be imported.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from deltazip.eval.baselines import BaselineResult, is_block_linear
from deltazip.hf import load_model, unique_parameters

GROUP_SIZE = 128  # modelopt INT4_AWQ_CFG block size


def int4_group_bytes(n_rows: int, n_cols: int, group_size: int, pre_quant_scale: bool) -> int:
    """4 bits per weight + an fp16 scale per group (symmetric) + an optional fp16 per-input AWQ scale."""
    groups = n_rows * -(-n_cols // group_size)
    return -(-n_rows * n_cols * 4 // 8) + groups * 2 + (n_cols * 2 if pre_quant_scale else 0)


def awq_int4(base_dir: Path, finetune_dir: Path, calib_ids,
             budget_bytes: int | None = None) -> BaselineResult:
    """modelopt `INT4_AWQ_CFG` calibrated on `calib_ids`; lm_head/embed/norms stay fp16 (its default)."""
    import torch

    model, _ = load_model(finetune_dir)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import modelopt.torch.quantization as mtq
    except ImportError:
        return _rtn_int4(model)

    def forward_loop(m):
        with torch.no_grad():
            for row in calib_ids.split(8):
                m(input_ids=row)

    mtq.quantize(model, mtq.INT4_AWQ_CFG, forward_loop)
    size, counted = 0, set()
    for name, module in model.named_modules():
        quantizer = getattr(module, "weight_quantizer", None)
        if quantizer is None or not quantizer.is_enabled:
            continue
        n_rows, n_cols = module.weight.shape
        group = (quantizer.block_sizes or {}).get(-1) or n_cols
        pre_scale = getattr(module.input_quantizer, "pre_quant_scale", None) is not None
        size += int4_group_bytes(n_rows, n_cols, group, pre_scale)
        counted.add(f"{name}.weight")
    size += sum(p.numel() * 2 for n, p in unique_parameters(model).items() if n not in counted)
    return BaselineResult("AWQ 4-bit g128 (modelopt)", model.eval(), size,
                          note="fake-quantized; lm_head/embed/norms fp16")


def _rtn_int4(model) -> BaselineResult:
    """Round-to-nearest symmetric 4-bit per group of 128 on block linears (used only without modelopt)."""
    import torch

    weights, size = {}, 0
    for name, param in unique_parameters(model).items():
        if not is_block_linear(name, param) or param.shape[1] % min(GROUP_SIZE, param.shape[1]):
            weights[name] = param.detach().clone()
            size += param.numel() * 2
            continue
        n_rows, n_cols = param.shape
        group = min(GROUP_SIZE, n_cols)
        grouped = param.detach().float().reshape(n_rows, n_cols // group, group)
        scale = (grouped.abs().amax(-1, keepdim=True) / 7).clamp(min=1e-8).half().float()
        weights[name] = (torch.clamp(torch.round(grouped / scale), -8, 7) * scale).reshape(n_rows, n_cols)
        size += int4_group_bytes(n_rows, n_cols, group, pre_quant_scale=False)
    return BaselineResult("RTN 4-bit g128 (modelopt unavailable)", weights, size, note="not AWQ")
