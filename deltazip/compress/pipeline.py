"""compress_model: base + fine-tune → delta artifact, block by block with sequential propagation.

This module is over 400 lines: the one block loop (device, checkpoints and replay for --resume, scale
tuning, the budgeted profile-then-plan run) shares its state; the pieces are read together.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

from deltazip.compress import allocate as alloc
from deltazip.compress.anyprec import solve_any_precision
from deltazip.compress.blocks import (
    EMBED,
    FINAL_NORM,
    LM_HEAD,
    BlockRunner,
    hessian_of,
    input_hessians,
    sequential_groups,
)
from deltazip.compress.calibration import calibration_tokens
from deltazip.compress.defaults import scale_defaults
from deltazip.compress.device import resolve_device
from deltazip.compress.distill import distill
from deltazip.compress.obs import NotDefinite, solve_delta
from deltazip.compress.resume import Checkpoints
from deltazip.compress.stream import (
    bound_heap,
    cat_rows,
    compressed_weight,
    delta_norms,
    float_delta,
    is_large,
    packed_rows,
    trim,
)
from deltazip.compress.tune import ScaleSet, streamed_delta, tune_head_streamed, tune_scales
from deltazip.config import CompressConfig
from deltazip.errors import DeltazipError
from deltazip.format import fingerprint_model, merge_tensor, save_delta
from deltazip.format.codec import encode_tensors
from deltazip.format.logscale import log_snapped
from deltazip.format.manifest import check_name
from deltazip.format.precision import AnyPrecisionLinear, snapped
from deltazip.format.spool import Spool
from deltazip.hf import ModelConfig, ModelWeights, read_config
from deltazip.packed import PackedLinear
from deltazip.threads import fixed_threads, work_threads
from deltazip.ui import progress

log = logging.getLogger(__name__)
# ‖target − base‖ / ‖base‖ above this does not look like a fine-tune (unrelated models give ≈ 1.4).
FINETUNE_REL_NORM_WARN = 0.5
# Scale tuning: Adam learning rate on log-scales, and calibration sequences per step.
TUNE_LR = 0.03
TUNE_BATCH = 16


def check_compatible(base: ModelWeights, target: ModelWeights, base_cfg: ModelConfig,
                     target_cfg: ModelConfig) -> None:
    """Same architecture, tensor names and shapes; the error names the first mismatching tensor."""
    for key in ("model_type", "architectures"):
        if base_cfg.raw.get(key) != target_cfg.raw.get(key):
            raise DeltazipError(f"base and target differ in config '{key}': {base_cfg.raw.get(key)!r} vs "
                                f"{target_cfg.raw.get(key)!r}")
    for name in sorted(set(base.names()) | set(target.names())):
        if name not in target:
            raise DeltazipError(f"tensor {name} is in the base but not in the target")
        if name not in base:
            raise DeltazipError(f"tensor {name} is in the target but not in the base")
        if base.shape(name) != target.shape(name):
            raise DeltazipError(f"tensor {name} has shape {list(base.shape(name))} in the base but "
                                f"{list(target.shape(name))} in the target")


def check_dtypes(base: ModelWeights, target: ModelWeights) -> None:
    """Base and fine-tune store every tensor in the same dtype; the error names the first that differs."""
    for name in base.names():
        if base.dtype(name) != target.dtype(name):
            raise DeltazipError(f"base and target differ in dtype: tensor {name} is "
                                f"{str(base.dtype(name)).removeprefix('torch.')} in the base but "
                                f"{str(target.dtype(name)).removeprefix('torch.')} in the target (save both "
                                "in one dtype)")


def resolve_calib(base_dir: Path, calib: str | Path | None) -> Path:
    """--calib, else the family's calib.jsonl beside the base dir's family.json, else an error."""
    if calib:
        path = Path(calib)
        if not path.is_file():
            raise DeltazipError(f"calibration file not found: {path}")
        return path
    family_calib = base_dir.resolve().parent / "calib.jsonl"
    if (base_dir.resolve().parent / "family.json").is_file() and family_calib.is_file():
        return family_calib
    raise DeltazipError(f"no calibration data for {base_dir}: pass --calib FILE.jsonl")


def exact_delta(base: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """target − base, stored as float32 when that is exact, else float64 (see docs/FORMAT.md)."""
    delta = target.double() - base.double()
    narrow = delta.float()
    return narrow if torch.equal(narrow.double(), delta) else delta


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


class _Solver:
    """Compress one delta matrix with the run's settings, naming the tensor in any user error.

    `plan` (param → (bits, sparsity)) overrides the settings per tensor (budget allocation); with `profile`
    every candidate layout is solved and recorded (bytes, relative error) and the settings' layout returned.
    """

    def __init__(self, settings: CompressConfig, plan: dict | None = None,
                 profile: alloc.Profile | None = None, sensitivity: alloc.Sensitivity | None = None) -> None:
        self.settings, self.plan, self.profile = settings, plan or {}, profile
        self.sensitivity = sensitivity

    def __call__(self, name: str, delta: torch.Tensor, hessian: torch.Tensor | None,
                 consume: bool = False) -> PackedLinear:
        """`consume`: delta and hessian may be overwritten (obs.NotDefinite: recompute H, call again)."""
        s = self.settings
        try:
            if s.any_precision:
                return solve_any_precision(delta, hessian, list(range(2, s.bits + 1)), s.sparsity == "2:4",
                                           s.group_size, s.damp, s.block_size)
            if self.profile is not None:
                self._profile(name, delta, hessian)
            bits, sparsity = self.plan.get(name, (s.bits, s.sparsity))
            return solve_delta(delta, hessian, bits, sparsity, s.group_size, s.damp, s.block_size,
                               consume=consume and self.profile is None)
        except NotDefinite:
            raise
        except ValueError as e:
            raise DeltazipError(f"cannot compress {name}: {e}") from None

    def _profile(self, name: str, delta: torch.Tensor, hessian: torch.Tensor | None) -> None:
        s = self.settings
        for bits, sparsity in alloc.CANDIDATES:
            if sparsity == "2:4" and delta.shape[1] % 32:
                continue
            packed = solve_delta(delta, hessian, bits, sparsity, s.group_size, s.damp, s.block_size)
            error = alloc.relative_error(delta, packed.dequantize(), hessian)
            self.profile.add(name, (bits, sparsity), alloc.stored_bytes(packed), error)
            if self.sensitivity is not None and (bits, sparsity) == alloc.PROBE and error > 0:
                kl = self.sensitivity.kl(name, packed.dequantize() - delta)
                if kl == kl:  # not NaN (a tensor the model does not name)
                    self.profile.gains[name] = max(kl, 1e-12) / error


def compress_model(base_dir: str | Path, target_dir: str | Path, out_dir: str | Path,
                   settings: CompressConfig, name: str | None = None, calib: str | Path | None = None,
                   overwrite: bool = False, resume: bool = False) -> Path:
    """Compress target − base into the artifact directory `out_dir` (written atomically) and return it.

    Every finished decoder block is checkpointed beside `out_dir` (compress/resume.py); `resume` continues
    an interrupted run with the same settings from its first unfinished block.
    """
    started = time.perf_counter()
    base_dir, target_dir, out_dir = Path(base_dir), Path(target_dir), Path(out_dir)
    validate_settings(settings)
    device = resolve_device(settings.device)
    if resume and (settings.bits == 16 or settings.any_precision or settings.target_ratio > 0
                   or settings.budget_bytes > 0):
        raise DeltazipError("--resume works with one layout for every tensor: not with --bits 16, "
                            "--any-precision, --target-ratio or --budget-bytes")
    name = name or out_dir.name.removesuffix(".dz")
    check_name(name)
    if out_dir.exists() and not overwrite:
        raise DeltazipError(f"{out_dir} already exists (pass --force to replace it)")
    base, target = ModelWeights(base_dir), ModelWeights(target_dir)
    target_cfg = read_config(target_dir)
    check_compatible(base, target, read_config(base_dir), target_cfg)
    check_dtypes(base, target)
    settings = scale_defaults(settings, sum(math.prod(target.shape(n)) for n in target.names()))
    norms = [0.0, 0.0]  # Σ‖t − b‖², Σ‖b‖² over matrices (norm vectors near 1 would mask an unrelated model)

    warned = []

    def take_delta(param: str, rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        b, t = base.get(param, rows), target.get(param, rows)
        if b.dim() >= 2:
            diff, norm = delta_norms(b, t)
            norms[0] += diff
            norms[1] += norm
        return b, t

    def warn_if_unrelated() -> None:  # once, as early as the first block (a 7B run takes hours)
        rel_norm = math.sqrt(norms[0] / max(norms[1], 1e-30))
        if rel_norm > FINETUNE_REL_NORM_WARN and not warned:
            warned.append(rel_norm)
            log.warning("the target does not look like a fine-tune of the base: relative delta norm "
                        "‖target − base‖/‖base‖ = %.3f (> %.1f); compressing anyway",
                        rel_norm, FINETUNE_REL_NORM_WARN)

    linears: dict[str, PackedLinear] = {}
    exact: dict[str, torch.Tensor] = {}
    calib_path = checkpoints = spool = None
    budgeted = settings.bits != 16 and (settings.target_ratio > 0 or settings.budget_bytes > 0)
    if settings.bits == 16:
        for param in progress(base.names(), desc="exact delta"):
            b, t = take_delta(param)
            exact[param] = exact_delta(b, t)
            if not _same_bits(merge_tensor(b, exact[param], exact=True), t):
                raise DeltazipError(f"tensor {param}: base + delta cannot reproduce the target bit for bit")
    else:
        calib_path = resolve_calib(base_dir, calib or settings.calib)
        tokens = calibration_tokens(base_dir, calib_path, settings.n_samples, settings.seq_len)
        checkpoints = None
        if not (settings.any_precision or budgeted):
            run = {"settings": {**dataclasses.asdict(settings), "device": str(device)},
                   "base": str(base_dir.resolve()), "target": str(target_dir.resolve()),
                   "calib": str(calib_path.resolve()), "name": name}
            checkpoints = Checkpoints(out_dir, run, resume)
            checkpoints.norms = norms
            # one layout for every tensor: each finished tensor goes to the spool (encoded, on disk), so the
            # memory held does not grow with the number of blocks. Budgeted runs (the plan and distillation
            # need every delta) and any-precision (snapped at save) keep the whole delta until the save.
            spool = Spool(out_dir.parent, settings.lossless)
        with fixed_threads(work_threads(target_cfg.hidden_size)):
            if budgeted:
                keys = ("compress_seconds", "relative_delta_norm", "budget_bytes", "budget_rounds")
                estimate = _manifest_info(base_dir, target_dir, target_cfg, settings, calib_path,
                                          dict.fromkeys(keys, 1 / 3))
                estimate["name"] = name
                budget_stats = _compress_budgeted(base, target, tokens, settings, linears, exact, take_delta,
                                                  warn_if_unrelated, estimate)
                if settings.distill_steps > 0:  # scales, codes, norm deltas fitted on the whole model
                    done = distill(base_dir, target_dir, tokens, linears, exact, settings.distill_steps,
                                   settings.lossless, stats=budget_stats)
                    linears.update(done[0])
                    exact.update(done[1])
            else:
                try:
                    _compress_sequential(base, target, tokens, settings, linears, exact, take_delta,
                                         warn_if_unrelated, checkpoints=checkpoints, spool=spool)
                except BaseException:
                    if spool is not None:
                        spool.close()
                    raise
    warn_if_unrelated()
    rel_norm = math.sqrt(norms[0] / max(norms[1], 1e-30))
    info = _manifest_info(base_dir, target_dir, target_cfg, settings, calib_path,
                          {"compress_seconds": round(time.perf_counter() - started, 3),
                           "relative_delta_norm": rel_norm})
    if budgeted:
        info["stats"].update(budget_stats)
    if spool is not None:  # the lm_head and the tensors outside the blocks join the spooled ones
        try:
            spool.add(linears, exact)
            spool.save(out_dir, name, fingerprint_model(base_dir), info, overwrite=overwrite)
        finally:
            spool.close()
        if checkpoints is not None:
            checkpoints.finish()
        return out_dir
    fingerprint = fingerprint_model(base_dir)
    linears = {k: snapped(v) if isinstance(v, AnyPrecisionLinear) else v for k, v in linears.items()}
    if budgeted:
        linears = {k: log_snapped(v) for k, v in linears.items()}  # the scales the artifact stores
    save_delta(out_dir, name, fingerprint, linears, exact, info, settings.lossless, overwrite=overwrite,
               compact=budgeted)  # every byte counts: format version 5 (log scales, zstd tensor table)
    if settings.bits != 16 and checkpoints is not None:
        checkpoints.finish()
    return out_dir


def _manifest_info(base_dir: Path, target_dir: Path, target_cfg: ModelConfig, settings: CompressConfig,
                   calib_path: Path | None, stats: dict) -> dict:
    """The manifest fields other than tensors and files."""
    return {
        "base": {"name": base_dir.name},
        "target": target_dir.name,
        "model": {"model_type": target_cfg.model_type, "hidden_size": target_cfg.hidden_size,
                  "num_hidden_layers": target_cfg.num_layers, "vocab_size": target_cfg.vocab_size,
                  "dtype": target_cfg.dtype},
        "settings": {**dataclasses.asdict(settings), "calib": calib_path.name if calib_path else None},
        "stats": stats,
    }


def _compress_budgeted(base: ModelWeights, target: ModelWeights, tokens: torch.Tensor,
                       settings: CompressConfig, linears: dict, exact: dict, take_delta, after_first_block,
                       info: dict) -> dict:
    """Profile every candidate layout of every tensor, allocate the byte budget (allocate.py), then compress
    with the plan; the budget shrinks by any overshoot of the estimate and the plan is redone (≤ 2 times)."""
    fp16_bytes = 2 * sum(math.prod(target.shape(n)) for n in target.names())
    budget = alloc.budget_for(fp16_bytes, settings.target_ratio, settings.budget_bytes)
    floor = alloc.floor_bytes({n: tuple(target.shape(n)) for n in target.names()}, info)
    alloc.check_floor(fp16_bytes, budget, floor, settings.target_ratio, settings.budget_bytes)
    profile = alloc.Profile()
    scratch_linears: dict = {}
    scratch_exact: dict = {}

    def plain_delta(param: str, rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return base.get(param, rows), target.get(param, rows)

    quick = dataclasses.replace(settings, tune_steps=0)
    sensitivity = weights = None  # both load the whole fine-tune: small models only (else relative error)
    if fp16_bytes // 2 <= alloc.SENSITIVITY_MAX_PARAMS:
        sensitivity = alloc.Sensitivity(target.dir, tokens, base.dir)
        weights = alloc.calibration_weights(target.dir, base.dir, tokens)  # OBS fits the learned tokens
    else:
        log.info("budget allocation: %d parameters, above %d: relative output error without the measured "
                 "sensitivity", fp16_bytes // 2, alloc.SENSITIVITY_MAX_PARAMS)
    _compress_sequential(base, target, tokens, quick, scratch_linears, scratch_exact, plain_delta,
                         lambda: None, solver=_Solver(quick, profile=profile, sensitivity=sensitivity),
                         weights=weights)
    overhead = alloc.overhead_bytes(scratch_linears, scratch_exact, info)
    alloc.check_reachable(fp16_bytes, budget, overhead, profile, settings.target_ratio, settings.budget_bytes)
    linear_budget = budget - overhead
    for rounds in range(1, 4):
        plan = alloc.allocate(profile, linear_budget)
        linears.clear()
        exact.clear()
        _compress_sequential(base, target, tokens, settings, linears, exact, take_delta, after_first_block,
                             solver=_Solver(settings, plan=plan), weights=weights)
        _, entries = encode_tensors(linears, {}, settings.lossless, compact=True)
        used = sum(s[2] for e in entries.values() for s in e["streams"])
        log.info("budget round %d: linears %d bytes planned, %d used, %d allowed", rounds,
                 sum(profile.rows[n][c][0] for n, c in plan.items()), used, budget - overhead)
        if used <= budget - overhead or rounds == 3:
            break
        linear_budget -= used - (budget - overhead) + linear_budget // 200  # overshoot + 0.5%
        take_delta = plain_delta  # norms were accumulated in the first round
    return {"budget_bytes": budget, "budget_rounds": rounds}


@torch.no_grad()
def _compress_sequential(base: ModelWeights, target: ModelWeights, tokens: torch.Tensor,
                         settings: CompressConfig, linears: dict, exact: dict, take_delta,
                         after_first_block, solver: _Solver | None = None,
                         checkpoints: Checkpoints | None = None, weights: torch.Tensor | None = None,
                         spool: Spool | None = None) -> None:
    """Embedding → blocks → final norm → lm_head; each stage sees the already compressed earlier stages.

    Two hidden streams run side by side: `hidden` through the compressed model and `hidden_ft` through the
    fine-tune, the teacher of scale tuning (settings.tune_steps). Everything runs on settings.device; one
    block's weights are in memory at a time. Blocks finished by an interrupted run (`checkpoints`) are
    replayed (forward passes only). With a `spool`, each block's deltas (block 0's with the embedding's)
    leave `linears` and `exact` for it once the block is done: what stays is the lm_head and the tensors
    outside the blocks, and the packed deltas held do not grow with the number of blocks.
    """
    solve = solver or _Solver(settings)
    device = resolve_device(settings.device)
    if device.type == "cuda":
        log.warning("compressing on %s: the CUDA path is unverified (CPU is the tested path)", device)
    runner = BlockRunner(target.dir)
    tokens = tokens.to(device)
    # Memory: base weights stay in their stored dtype (fp16/bf16: half of fp32) and become fp32 per use (the
    # same values); the embedding's base is dropped once block 0 (the only block that re-embeds) is done.
    # Large tensors (stream.LARGE_BYTES) are solved by row chunks read from disk (`rowwise`: layouts whose
    # rows are independent) and not kept: a large embedding keeps only the calibration tokens' rows
    # (`etok` indexes them, `take` cuts a delta to them).
    rowwise = (solve.profile is None and not solve.plan and not settings.any_precision
               and settings.sparsity in ("2:4", "none"))
    if any(is_large(target.shape(n)) for n in target.names()):
        bound_heap()
    big_embed = rowwise and is_large(target.shape(EMBED))
    if big_embed:
        uniq, etok = torch.unique(tokens, return_inverse=True)

        def take(packed: PackedLinear) -> PackedLinear:
            return packed_rows(packed, uniq.cpu())
        embed_base, embed_ft = _table_rows(base, EMBED, uniq.cpu()), _table_rows(target, EMBED, uniq.cpu())
        b = t = None
    else:
        etok = tokens

        def take(packed: PackedLinear) -> PackedLinear:
            return packed
        b, t = take_delta(EMBED)
        embed_base, embed_ft = b, t
    embed_base, embed_ft = embed_base.to(device), embed_ft.to(device)
    # Tuning's time budget is spent once, by block 0; its step count then holds for every later block and
    # the head (saved with block 0), so the artifact does not depend on the speed of the later blocks and
    # a resumed run reproduces an uninterrupted one.
    tuning = settings
    if checkpoints is not None and checkpoints.has(0):  # the (tuned) embedding delta is saved with block 0
        linears["model.embed_tokens"] = checkpoints.load(0)[0]["model.embed_tokens"]
        if checkpoints.tune_steps is not None:
            tuning = dataclasses.replace(settings, tune_steps=checkpoints.tune_steps, tune_seconds=0.0)
    elif big_embed:  # no Hessian: magnitude + RTN, row by row
        linears["model.embed_tokens"] = _solve_rows(solve, EMBED, take_delta, target.shape(EMBED)[0], None,
                                                    device)
    else:  # no Hessian: magnitude + RTN
        linears["model.embed_tokens"] = solve(EMBED, t.to(device).float() - embed_base.float(), None)
    hidden = _embed(etok, embed_base, take(linears["model.embed_tokens"]))
    hidden_ft = F.embedding(etok, embed_ft).float()  # rows first: no fp32 copy of the whole table
    del b, t, embed_ft
    trim()

    started = time.perf_counter()
    for index in progress(range(runner.num_layers), desc="block", total=runner.num_layers):
        prefix = f"model.layers.{index}."
        layer = runner.layer(index, target).to(device)
        out_ft = runner.run(layer, hidden_ft)
        if checkpoints is not None and checkpoints.has(index):
            hidden = _replay_block(runner, layer, index, base, checkpoints, linears, exact, etok,
                                   embed_base, hidden, take)
            hidden_ft = out_ft
            if spool is not None:
                _spool_block(spool, linears, exact, prefix, index)
            if index == 0:
                after_first_block()
                embed_base = None
            continue
        base_weights = {}
        for group in sequential_groups(runner, layer, hidden):
            hessians = input_hessians(runner, layer, hidden, group, weights)
            for lin in group:
                param = f"{prefix}{lin}.weight"
                b, t = take_delta(param)
                delta = float_delta(t.to(device), b.to(device))  # t − b, fp32
                base_weights[lin] = _base_source(base, param, b, device)
                del b, t
                try:
                    packed = solve(param, delta, hessians.pop(lin), consume=rowwise)
                except NotDefinite:  # H was factorised in place and gave up: again, out of place
                    delta = float_delta(target.get(param).to(device), base.get(param).to(device))
                    packed = solve(param, delta, input_hessians(runner, layer, hidden, [lin], weights)[lin])
                del delta
                linears[f"{prefix}{lin}"] = packed
                _install(layer, lin, base_weights[lin], packed)
                trim()
        if index == 0 and big_embed and tuning.tune_steps > 0:  # tuned on its calibration rows only
            full_embed = linears["model.embed_tokens"]
            linears["model.embed_tokens"] = take(full_embed)
        if tuning.tune_steps > 0:
            taken: list[int] = []
            names = [f"{prefix}{lin}" for lin in base_weights]
            names += ["model.embed_tokens"] if index == 0 else []
            views: dict[str, dict] = {n: {} for n in names}
            for bits in _precisions(linears[names[0]]):  # any-precision: each precision tuned on its own
                view = {**linears, **{n: _view(linears[n], bits) for n in names}}
                tuned_hidden = _tune_block(runner, layer, base_weights, view, prefix, etok, embed_base,
                                           hidden, out_ft, tuning, tune_embedding=index == 0, taken=taken)
                for n in names:  # the widest precision goes last: its weights stay installed in `layer`
                    views[n][bits] = view[n]
            for n in names:
                linears[n] = _joined(linears[n], views[n])
            if index == 0 and big_embed:
                linears["model.embed_tokens"] = _with_rows(full_embed, uniq.cpu(),
                                                           linears["model.embed_tokens"])
            hidden = tuned_hidden
            view = views = None  # (they hold this block's deltas)
            if tuning.tune_seconds > 0:
                tuning = dataclasses.replace(settings, tune_steps=min(taken), tune_seconds=0.0)
                log.info("scale tuning: %d step(s) per block within the %.0f s budget (fixed from block %d "
                         "on)", tuning.tune_steps, settings.tune_seconds, index + 1)
        compressed = {f"{prefix}{lin}.weight" for lin in _linear_set(layer)}
        for param in target.names():
            if param.startswith(prefix) and param not in compressed:
                exact[param] = exact_delta(*take_delta(param))
        hidden, hidden_ft = runner.run(layer, hidden), out_ft
        if checkpoints is not None:
            done = {n: p for n, p in linears.items() if n.startswith(prefix)}
            if index == 0:
                done["model.embed_tokens"] = linears["model.embed_tokens"]
            checkpoints.save(index, done, {n: v for n, v in exact.items() if n.startswith(prefix)},
                             checkpoints.norms, tune_steps=tuning.tune_steps if index == 0 else None)
            del done
        if spool is not None:
            _spool_block(spool, linears, exact, prefix, index)
            full_embed = None
        del base_weights
        trim()
        if index == 0:
            after_first_block()
            embed_base = None
        seconds = time.perf_counter() - started
        log.info("block %d/%d done (%.1f s); ETA %.0f s", index + 1, runner.num_layers, seconds,
                 seconds / (index + 1) * (runner.num_layers - index - 1))

    for param in target.names():  # final norm and anything else outside the blocks (biases, extra norms)
        if not param.startswith("model.layers.") and param not in (EMBED, LM_HEAD):
            exact[param] = exact_delta(*take_delta(param))
    if LM_HEAD in target:
        final_norm = runner.final_norm(target.get(FINAL_NORM)).to(device)
        normed, normed_ft = final_norm(hidden), final_norm(hidden_ft)
        if rowwise and is_large(target.shape(LM_HEAD)):  # by row chunks, streamed from disk
            linears["lm_head"] = _solve_rows(solve, LM_HEAD, take_delta, target.shape(LM_HEAD)[0],
                                             hessian_of(normed, weights), device)
            if tuning.tune_steps > 0:
                linears["lm_head"] = tune_head_streamed(linears["lm_head"], base, target, normed, normed_ft,
                                                        tuning.tune_steps, TUNE_LR, TUNE_BATCH,
                                                        tuning.tune_seconds)
        else:
            b, t = take_delta(LM_HEAD)
            b, t = b.float().to(device), t.float().to(device)
            linears["lm_head"] = solve(LM_HEAD, t - b, hessian_of(normed, weights))
            if tuning.tune_steps > 0:
                head = linears["lm_head"]
                tuned = {bits: _tune_head(_view(head, bits), b, t, normed, normed_ft, tuning.tune_steps,
                                          tuning.tune_seconds) for bits in _precisions(head)}
                linears["lm_head"] = _joined(head, tuned)


def _spool_block(spool: Spool, linears: dict, exact: dict, prefix: str, index: int) -> None:
    """Move block `index`'s finished deltas (and, after block 0, the embedding's) to the spool, in the order
    the artifact lists them (`linears` keeps the embedding first)."""
    names = [n for n in linears if n.startswith(prefix) or (index == 0 and n == "model.embed_tokens")]
    spool.add({n: linears.pop(n) for n in names},
              {n: exact.pop(n) for n in [n for n in exact if n.startswith(prefix)]})


def _embed(tokens: torch.Tensor, embed_base: torch.Tensor, packed: PackedLinear) -> torch.Tensor:
    """Token embeddings through base + Δ̂ (one expression for the first run and a resumed one)."""
    return F.embedding(tokens, embed_base.float() + packed.dequantize().to(embed_base.device))


def _replay_block(runner: BlockRunner, layer: torch.nn.Module, index: int, base: ModelWeights,
                  checkpoints: Checkpoints, linears: dict, exact: dict, tokens: torch.Tensor,
                  embed_base: torch.Tensor, hidden: torch.Tensor, take) -> torch.Tensor:
    """A block finished by the interrupted run: take its results, install base + Δ̂ in `layer` (the same
    expression as the first run) and return the block's output on the compressed stream."""
    prefix = f"model.layers.{index}."
    done, done_exact, norms = checkpoints.load(index)
    linears.update(done)
    exact.update(done_exact)
    checkpoints.norms[:] = norms
    for lin in _linear_set(layer):
        param = f"{prefix}{lin}.weight"
        _install(layer, lin, _base_source(base, param, base.get(param), hidden.device), linears[param[:-7]])
    if index == 0:
        hidden = _embed(tokens, embed_base, take(linears["model.embed_tokens"]))
    return runner.run(layer, hidden)


def _base_source(base: ModelWeights, param: str, stored: torch.Tensor, device: torch.device):
    """A linear's base weight as kept during its block: the tensor (stored dtype) when small, else a
    reader `rows → tensor` (re-read from disk at each use: the block's base is never held whole)."""
    if not is_large(stored.shape):
        return stored.to(device)

    def read(rows: slice | None = None) -> torch.Tensor:
        return base.get(param, rows).to(device)
    return read


def _install(layer: torch.nn.Module, lin: str, base_weight, packed: PackedLinear) -> None:
    """Make `layer`'s linear `lin` compute with base + Δ̂ (built once when small, at each call when large)."""
    module = layer.get_submodule(lin)
    if callable(base_weight):
        module.source = lambda: compressed_weight(base_weight(), packed)
    else:
        weight = compressed_weight(base_weight, packed)
        module.source = lambda: weight


def _solve_rows(solve: _Solver, name: str, take_delta, n_rows: int, hessian: torch.Tensor | None,
                device: torch.device, rows: int = 4096) -> PackedLinear:
    """Solve a large matrix (embedding, lm_head) by row chunks read from disk (its rows are independent)."""
    parts = []
    for r in range(0, n_rows, rows):
        b, t = take_delta(name, slice(r, r + rows))
        parts.append(solve(name, float_delta(t.to(device), b.to(device)), hessian))
        del b, t
        trim()
    return cat_rows(parts)


def _table_rows(weights: ModelWeights, name: str, index: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """Rows `index` (sorted) of a large table, read a chunk at a time."""
    parts = []
    for r in range(0, weights.shape(name)[0], rows):
        sel = index[(index >= r) & (index < r + rows)]
        if len(sel):
            parts.append(weights.get(name, slice(r, r + rows)).index_select(0, sel - r))
    return torch.cat(parts)


def _with_rows(full: PackedLinear, index: torch.Tensor, part: PackedLinear) -> PackedLinear:
    """`full` with the scales of rows `index` taken from `part` (those rows tuned; codes unchanged)."""
    scales = full.scales.clone()
    scales[index] = part.scales
    return dataclasses.replace(full, scales=scales)


def _precisions(packed) -> list[int]:
    return packed.precisions if isinstance(packed, AnyPrecisionLinear) else [packed.bits]


def _view(packed, bits: int) -> PackedLinear:
    return packed.views[bits] if isinstance(packed, AnyPrecisionLinear) else packed


def _joined(packed, views: dict[int, PackedLinear]):
    return AnyPrecisionLinear(views) if isinstance(packed, AnyPrecisionLinear) else next(iter(views.values()))


def _tune_block(runner: BlockRunner, layer: torch.nn.Module, base_weights: dict, linears: dict, prefix: str,
                tokens: torch.Tensor, embed_base: torch.Tensor, hidden: torch.Tensor, out_ft: torch.Tensor,
                settings: CompressConfig, tune_embedding: bool, taken: list | None = None) -> torch.Tensor:
    """Fit the scales of this block's deltas (and the embedding's, for block 0) to the fine-tune's block
    output; installs the tuned weights in `layer` and returns the block's (possibly re-embedded) input."""
    packed = {lin: linears[f"{prefix}{lin}"] for lin in base_weights}
    layer.requires_grad_(False)  # only the scales learn
    if tune_embedding:
        packed["embed"] = linears["model.embed_tokens"]

    # a large block streams its base from disk: each linear's weight is rebuilt in its forward and backward
    streamed = any(callable(w) for w in base_weights.values())

    def loss_fn(scales: ScaleSet, rows: slice) -> torch.Tensor:
        x = (F.embedding(tokens[rows], embed_base.float() + scales.dense("embed")) if tune_embedding
             else hidden[rows])
        if not streamed:
            weights = {f"{lin}.weight": base_weights[lin].float() + scales.dense(lin) for lin in base_weights}
            position = {"position_embeddings": runner.position_embeddings(x)}
            return F.mse_loss(functional_call(layer, weights, (x,), position), out_ft[rows])
        modules = [layer.get_submodule(lin) for lin in base_weights]
        for lin, module in zip(base_weights, modules, strict=True):
            weight = base_weights[lin]  # a reader `rows → tensor`, or the (small) tensor itself
            module.delta = streamed_delta(scales, lin, weight if callable(weight) else weight.__getitem__)
        try:
            out = layer(x, position_embeddings=runner.position_embeddings(x))
        finally:
            for module in modules:
                module.delta = None
        return F.mse_loss(out, out_ft[rows])

    count: dict = {}
    with torch.enable_grad():
        tuned = tune_scales(packed, loss_fn, hidden.shape[0], settings.tune_steps, TUNE_LR, TUNE_BATCH,
                            device=hidden.device, max_seconds=settings.tune_seconds, taken=count,
                            compact=streamed)
    if taken is not None:
        taken.append(count["steps"])
    for lin in base_weights:
        linears[f"{prefix}{lin}"] = tuned[lin]
        _install(layer, lin, base_weights[lin], tuned[lin])
    if not tune_embedding:
        return hidden
    linears["model.embed_tokens"] = tuned["embed"]
    return _embed(tokens, embed_base, tuned["embed"])


def _tune_head(packed: PackedLinear, head_base: torch.Tensor, head_ft: torch.Tensor, normed: torch.Tensor,
               normed_ft: torch.Tensor, steps: int, max_seconds: float = 0.0) -> PackedLinear:
    """Fit the lm_head delta's scales so the compressed model's next-token distribution matches the
    fine-tune's (KL on the calibration tokens)."""
    target_logp = F.log_softmax(normed_ft @ head_ft.T, dim=-1)

    def loss_fn(scales: ScaleSet, rows: slice) -> torch.Tensor:
        logits = normed[rows] @ (head_base + scales.dense("head")).T
        return F.kl_div(F.log_softmax(logits, dim=-1), target_logp[rows], log_target=True,
                        reduction="batchmean")

    with torch.enable_grad():
        return tune_scales({"head": packed}, loss_fn, normed.shape[0], steps, TUNE_LR, TUNE_BATCH,
                           device=normed.device, max_seconds=max_seconds)["head"]


def _linear_set(layer: torch.nn.Module) -> set[str]:
    return {n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


def validate_settings(settings: CompressConfig) -> None:
    """Combinations CompressConfig alone does not reject."""
    sparsity = settings.sparsity
    if sparsity not in ("2:4", "none"):
        try:
            fraction = float(sparsity)
        except ValueError:
            raise DeltazipError(f"--sparsity must be 2:4, none or a fraction, not {sparsity!r}") from None
        if not 0.0 <= fraction < 1.0:
            raise DeltazipError(f"--sparsity fraction must be in [0, 1), not {fraction}")
    if settings.bits == 16 and sparsity != "none":
        raise DeltazipError("--bits 16 is the lossless mode: it needs --sparsity none")
    if settings.block_size < 4:
        raise DeltazipError(f"--block-size must be at least 4, not {settings.block_size}")
    if settings.n_samples < 1 or settings.seq_len < 2:
        raise DeltazipError("--n-samples must be ≥ 1 and --seq-len ≥ 2")
    if settings.damp < 0:
        raise DeltazipError(f"--damp must be ≥ 0, not {settings.damp}")
    if settings.tune_steps < 0:
        raise DeltazipError(f"tune_steps must be ≥ 0, not {settings.tune_steps}")
    if settings.distill_steps < 0:
        raise DeltazipError(f"distill_steps must be ≥ 0, not {settings.distill_steps}")
    budgeted = settings.target_ratio > 0 or settings.budget_bytes > 0
    if budgeted and settings.bits == 16:
        raise DeltazipError("--target-ratio/--budget-bytes allocate lossy layouts: not with --bits 16")
    if settings.any_precision:
        if budgeted:
            raise DeltazipError("--any-precision cannot be combined with --target-ratio/--budget-bytes")
        if settings.bits not in (3, 4) or sparsity not in ("2:4", "none"):
            raise DeltazipError("--any-precision needs --bits 3 or 4 and --sparsity 2:4 or none "
                                f"(got --bits {settings.bits} --sparsity {sparsity})")
