"""Baselines on a small synthetic base + perturbed fine-tune: each runs and its size accounting is right."""

from __future__ import annotations

import math

import factories
import pytest
import torch

from deltazip.compress.calibration import calib_ids
from deltazip.eval.baselines import is_block_linear, run_baseline
from deltazip.eval.baselines.awq import _rtn_int4, int4_group_bytes
from deltazip.eval.baselines.bitdelta import bitdelta_bytes
from deltazip.eval.baselines.sparsegpt import sparse24_bytes, sparsegpt_solve
from deltazip.eval.baselines.svd import lowrank_bytes, pick_rank
from deltazip.eval.scoring import candidate_model
from deltazip.hf import load_model


@pytest.fixture(scope="module")
def synthetic_pair(tmp_path_factory):
    """A random tiny Llama (base) and a perturbed copy (fine-tune), saved in HF format with a tokenizer."""
    tokenizer = factories.family_tokenizer()
    base, ft = factories.finetune_pair(tmp_path_factory.mktemp("synthetic"), tokenizer, spread="std")
    calib = calib_ids(tokenizer, ["reverse abcd=dcba", "sort dcab=abcd", "upper abc=ABC"] * 40, 8, 32)
    return base, ft, calib


def _params(model_dir):
    model, _ = load_model(model_dir)
    return dict(model.named_parameters())


def test_bitdelta_size_and_signs(synthetic_pair):
    base_dir, ft_dir, calib = synthetic_pair
    result = run_baseline("bitdelta", base_dir, ft_dir, calib, budget_bytes=0)
    base, ft = _params(base_dir), _params(ft_dir)
    expected = sum(bitdelta_bytes(p.numel()) if is_block_linear(n, p) else 2 * p.numel()
                   for n, p in ft.items())
    assert result.size_bytes == expected
    q = "model.layers.0.self_attn.q_proj.weight"
    assert bitdelta_bytes(ft[q].numel()) == math.ceil(ft[q].numel() / 8) + 2
    delta = ft[q] - base[q]
    approx = result.weights[q] - base[q]
    alpha = delta.abs().mean()
    assert torch.allclose(approx.abs(), torch.full_like(approx, alpha.item()), rtol=1e-3)
    assert torch.equal(torch.sign(approx), torch.where(delta >= 0, 1.0, -1.0))
    assert torch.equal(result.weights["lm_head.weight"], ft["lm_head.weight"])  # kept full, as BitDelta does


def test_svd_rank_fits_byte_budget(synthetic_pair):
    base_dir, ft_dir, calib = synthetic_pair
    ft = _params(ft_dir)
    shapes = [tuple(p.shape) for p in ft.values() if p.dim() == 2]
    exact = sum(2 * p.numel() for p in ft.values() if p.dim() != 2)
    budget = exact + lowrank_bytes(shapes, 5) + 100  # just above rank 5
    result = run_baseline("svd", base_dir, ft_dir, calib, budget)
    assert result.details["rank"] == 5 == pick_rank(shapes, budget - exact)
    assert result.size_bytes == exact + lowrank_bytes(shapes, 5) <= budget
    assert exact + lowrank_bytes(shapes, 6) > budget
    base = _params(base_dir)
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.linalg.matrix_rank(result.weights[name] - base[name], rtol=1e-3) <= 5
    assert pick_rank(shapes, 10) == 0


def test_sparsegpt_solve_is_24_sparse_4bit_and_beats_magnitude_rtn():
    torch.manual_seed(1)
    n_rows, n_cols = 32, 64
    weight = torch.randn(n_rows, n_cols)
    x = torch.randn(512, n_cols) @ torch.randn(n_cols, n_cols) * 0.3  # correlated inputs
    hessian = 2 * x.T @ x / x.shape[0]
    solved = sparsegpt_solve(weight, hessian, bits=4)
    groups = solved.reshape(n_rows, n_cols // 4, 4)
    assert int((groups != 0).sum(-1).max()) <= 2
    assert max(len(torch.unique(row[row != 0])) for row in solved) <= 16
    # magnitude 2:4 + round-to-nearest with the same grid: OBS must give a smaller output error
    keep = weight.abs().reshape(n_rows, -1, 4).topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, keep, True).reshape(n_rows, n_cols)
    lo, hi = weight.min(1, keepdim=True).values, weight.max(1, keepdim=True).values
    scale, zero = (hi - lo) / 15, torch.round(-lo / ((hi - lo) / 15))
    rtn = (torch.clamp(torch.round(weight / scale) + zero, 0, 15) - zero) * scale * mask
    err_obs = ((solved - weight) @ x.T).norm()
    err_rtn = ((rtn - weight) @ x.T).norm()
    assert err_obs < 0.9 * err_rtn


def test_sparsegpt_full_model_size_and_structure(synthetic_pair):
    base_dir, ft_dir, calib = synthetic_pair
    result = run_baseline("sparsegpt", base_dir, ft_dir, calib, budget_bytes=0)
    ft = _params(ft_dir)
    expected = sum(sparse24_bytes(*p.shape, 4) if is_block_linear(n, p) else 2 * p.numel()
                   for n, p in ft.items())
    assert result.size_bytes == expected
    assert sparse24_bytes(64, 64, 4) == 64 * 32 * 6 // 8 + 64 * 4
    w = result.weights["model.layers.1.mlp.up_proj.weight"]
    assert int((w.reshape(w.shape[0], -1, 4) != 0).sum(-1).max()) <= 2
    assert torch.equal(result.weights["model.embed_tokens.weight"], ft["model.embed_tokens.weight"])


def test_awq_modelopt_runs_and_counts_int4_groups(synthetic_pair):
    base_dir, ft_dir, calib = synthetic_pair
    result = run_baseline("awq", base_dir, ft_dir, calib, budget_bytes=0)
    assert "modelopt" in result.method
    ft = _params(ft_dir)
    # block linears: 4 bits/weight + fp16 scale per group of 128 (one per row here) + AWQ input scale
    expected = sum(int4_group_bytes(*p.shape, 128, True) if is_block_linear(n, p) else 2 * p.numel()
                   for n, p in ft.items())
    assert result.size_bytes == expected
    model = candidate_model(base_dir, result.weights)
    reference, _ = load_model(ft_dir)
    with torch.no_grad():
        out, ref = model(input_ids=calib[:2]).logits, reference(input_ids=calib[:2]).logits
    assert 0 < (out - ref).abs().max() < 0.2 * ref.abs().max()


def test_rtn_fallback_is_labelled_and_sized(synthetic_pair):
    _, ft_dir, _ = synthetic_pair
    model, _ = load_model(ft_dir)
    result = _rtn_int4(model)
    assert "RTN" in result.method and "modelopt unavailable" in result.method
    w = result.weights["model.layers.0.mlp.down_proj.weight"]  # [64, 128]: one group of 128 per row
    assert max(len(torch.unique(row)) for row in w) <= 16
