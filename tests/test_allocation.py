"""Byte-budget allocation (`--target-ratio` / `--budget-bytes`): Lagrangian picks, bad targets, end to end."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from factories import compress_inputs

from deltazip.compress import compress_model
from deltazip.compress.allocate import (
    Profile,
    allocate,
    check_floor,
    check_reachable,
    floor_bytes,
    relative_error,
)
from deltazip.config import CompressConfig
from deltazip.errors import DeltazipError
from deltazip.format import load_delta, read_manifest


def _profile() -> Profile:
    p = Profile()
    # tensor a is sensitive (error falls steeply with bytes), b is not
    for name, errors in (("a", (0.5, 0.1, 0.02)), ("b", (0.02, 0.015, 0.01))):
        layouts = ((2, "0.9"), (2, "2:4"), (4, "2:4"))
        for (bits, sparsity), nbytes, err in zip(layouts, (100, 300, 600), errors, strict=True):
            p.add(name, (bits, sparsity), nbytes, err)
    return p


def test_allocation_fits_the_budget_and_spends_it_where_it_pays():
    p = _profile()
    assert p.bounds() == (200, 1200)
    for budget in (200, 400, 700, 900, 1200):
        plan = allocate(p, budget)
        assert sum(p.rows[n][c][0] for n, c in plan.items()) <= budget
    plan = allocate(p, 700)
    assert plan["a"] == (4, "2:4") and plan["b"] == (2, "0.9")  # bytes go to the sensitive tensor
    assert allocate(p, 10_000) == {"a": (4, "2:4"), "b": (4, "2:4")}
    with pytest.raises(ValueError):
        allocate(p, 100)


def test_unreachable_targets_name_the_achievable_range():
    p = _profile()
    fp16 = 20_000
    with pytest.raises(DeltazipError, match=r"--target-ratio 50 cannot be met: this model's achievable range "
                                            r"is 13\.33x–40\.00x \(500–1500 bytes\)"):
        check_reachable(fp16, 400, 300, p, 50.0, 0)
    with pytest.raises(DeltazipError, match="below the 300-byte floor"):
        check_reachable(fp16, 250, 300, p, 80.0, 0)
    with pytest.raises(DeltazipError, match="--budget-bytes 5000 cannot be met"):
        check_reachable(fp16, 5000, 300, p, 0.0, 5000)
    check_reachable(fp16, 1000, 300, p, 20.0, 0)  # inside the range: no error
    with pytest.raises(DeltazipError, match=r"--target-ratio 900 cannot be met \(below the 120-byte floor .*"
                                            r"achievable range is below 166\.67x"):
        check_floor(fp16, 22, 120, 900.0, 0)
    assert floor_bytes({"a": (10,), "w": (4, 4)}, {}) == 20 + 2


def test_relative_error_is_scale_free():
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(8, 16, generator=gen)
    x = torch.randn(50, 16, generator=gen)
    h = x.T @ x
    approx = delta + 0.1 * torch.randn(8, 16, generator=gen)
    assert relative_error(delta, approx, h) == pytest.approx(relative_error(3 * delta, 3 * approx, 7 * h),
                                                             rel=1e-4)
    assert relative_error(delta, delta, None) == 0.0


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return compress_inputs(tmp_path_factory.mktemp("synthetic-alloc"))


FAST = CompressConfig(n_samples=8, seq_len=32, tune_steps=0)


def test_target_ratio_end_to_end(synthetic, tmp_path):
    import dataclasses

    plain = compress_model(synthetic / "base", synthetic / "ft", tmp_path / "plain.dz", FAST,
                           calib=synthetic / "calib.jsonl")
    plain_ratio = read_manifest(plain)["stats"]["ratio"]
    target = round(plain_ratio * 1.3, 2)
    out = compress_model(synthetic / "base", synthetic / "ft", tmp_path / "r.dz",
                         dataclasses.replace(FAST, target_ratio=target), calib=synthetic / "calib.jsonl")
    manifest = read_manifest(out)
    assert manifest["stats"]["ratio"] >= target
    assert manifest["stats"]["budget_bytes"] == int(manifest["stats"]["fp16_bytes"] / target)
    assert manifest["settings"]["target_ratio"] == target
    layouts = {(e["bits"], e["sparse24"]) for e in manifest["tensors"].values() if e["kind"] == "linear"}
    assert len(layouts) >= 1
    delta = load_delta(out)  # loads, and every tensor is a layout the kernels serve (2:4 or dense codes)
    assert all(p.bits in (2, 3, 4) for p in delta.linears.values())
    # format version 5: log scales (no zeros stream) and the tensor table compressed in manifest.json
    assert manifest["version"] == 5 and read_manifest(plain)["version"] == 4
    assert "tensors_zstd" in json.loads((out / "manifest.json").read_text())
    assert all({s[0] for s in e["streams"]} >= {"scale0", "lscales"} for e in manifest["tensors"].values()
               if e["kind"] == "linear")
    budget = manifest["stats"]["artifact_bytes"] + 2000
    out = compress_model(synthetic / "base", synthetic / "ft", tmp_path / "b.dz",
                         dataclasses.replace(FAST, budget_bytes=budget), calib=synthetic / "calib.jsonl")
    assert read_manifest(out)["stats"]["artifact_bytes"] <= budget


def test_unreachable_target_ratio_is_one_clear_line(synthetic, tmp_path):
    import dataclasses

    for ratio in (500.0, 1.5):
        match = r"cannot be met.*achievable range is (below [0-9.]+x|[0-9.]+x–[0-9.]+x)"
        with pytest.raises(DeltazipError, match=match) as err:
            compress_model(synthetic / "base", synthetic / "ft", tmp_path / "u.dz",
                           dataclasses.replace(FAST, target_ratio=ratio), calib=synthetic / "calib.jsonl")
        assert "\n" not in str(err.value)
    assert not (tmp_path / "u.dz").exists()


def test_cli_target_ratio_flag(synthetic, tmp_path):
    from deltazip.cli import cli

    result = CliRunner().invoke(cli, ["compress", "--base", str(synthetic / "base"), "--target",
                                       str(synthetic / "ft"), "--out", str(tmp_path / "c.dz"), "--calib",
                                       str(synthetic / "calib.jsonl"), "--n-samples", "4",
                                       "--target-ratio", "500"])
    assert result.exit_code == 2, result.output
    assert "achievable range" in result.output


def test_distillation_lowers_the_kl_and_keeps_layouts_masks_and_bytes(synthetic, tmp_path):
    """The end-to-end stage (compress/distill.py) on a budgeted artifact: KL(fine-tune ‖ base + Δ̂), measured
    here independently of the stage's own loss, drops; layouts and masks stay; the bytes do not grow."""
    import dataclasses

    import torch.nn.functional as F

    from deltazip.compress.allocate import token_weights
    from deltazip.compress.calibration import calibration_tokens
    from deltazip.compress.distill import distill, stored_bytes
    from deltazip.format import decompress
    from deltazip.hf import add_delta, load_model

    out = compress_model(synthetic / "base", synthetic / "ft", tmp_path / "r.dz",
                         dataclasses.replace(FAST, target_ratio=12.0, distill_steps=0),
                         calib=synthetic / "calib.jsonl")
    art = load_delta(out)
    tokens = calibration_tokens(synthetic / "base", synthetic / "calib.jsonl", 8, 32)
    target, _ = load_model(synthetic / "ft")
    base, _ = load_model(synthetic / "base")
    with torch.no_grad():
        teacher = F.log_softmax(target(input_ids=tokens).logits, -1)
        weights = token_weights(teacher, F.log_softmax(base(input_ids=tokens).logits, -1), tokens, "gain")

    def kl(linears, exact) -> float:
        model, _ = load_model(synthetic / "base")
        add_delta(model, decompress(dataclasses.replace(art, linears=linears, exact=exact)))
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=tokens).logits, -1)
        return float(((teacher.exp() * (teacher - logp)).sum(-1) * weights).sum() / weights.sum())

    stats: dict = {}
    linears, exact = distill(synthetic / "base", synthetic / "ft", tokens, art.linears, art.exact, 60,
                             stats=stats)
    assert stats["distill_kl_after"] < stats["distill_kl_before"]
    assert kl(linears, exact) < kl(art.linears, art.exact)
    assert stored_bytes(linears, exact, "zstd") <= stored_bytes(art.linears, art.exact, "zstd")
    for name, packed in art.linears.items():
        new = linears[name]
        assert (new.bits, new.sparse24, new.group_size) == (packed.bits, packed.sparse24, packed.group_size)
        assert not torch.any((new.dequantize() != 0) & (packed.dequantize() == 0))  # no pruned value revived
    assert exact.keys() == art.exact.keys()
    # in the pipeline (on by default for budgeted runs): recorded in the manifest, the ratio still met
    out = compress_model(synthetic / "base", synthetic / "ft", tmp_path / "d.dz",
                         dataclasses.replace(FAST, target_ratio=12.0, distill_steps=30),
                         calib=synthetic / "calib.jsonl")
    manifest = read_manifest(out)
    assert CompressConfig().distill_steps > 0 and manifest["settings"]["distill_steps"] == 30
    assert manifest["stats"]["distill_kl_after"] <= manifest["stats"]["distill_kl_before"]
    assert manifest["stats"]["ratio"] >= 12.0
