"""OBS solver speed and quality on a synthetic layer (the reference DeltaZip solver's benchmark setup).

    .venv/bin/python benchmarks/solver.py [--threads 2] [--sizes 1024x1024,4096x4096,11008x4096]
                                          [--settings 2:2:4,4:2:4] [--repeats 1] [--no-write]

The layer: a seeded Gaussian delta Δ [N, K] (σ = 0.01) and seeded Gaussian inputs X, correlated
through a seeded mixing matrix (--inputs iid: independent), with 8 outlier channels (×10); 256 × 128 =
32768 calibration tokens give H = 2/n·XᵀX; per-row scales (group -1), block size 128, damp 0.01.
Timed: one `solve_delta` call (damping + Cholesky + OBS + scale fit), on `--threads` torch threads,
best of `--repeats`. Output error: ‖(Ŵ − Δ)Xₜᵀ‖² / ‖ΔXₜᵀ‖² on 4096 held-out
tokens from the same distribution. Writes the "Solver" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks._results import command_line, markdown_table, write_section  # noqa: E402

DEFAULT_SOLVER = "deltazip.compress.obs:solve_delta"
CALIB_TOKENS = 256 * 128
HELD_OUT_TOKENS = 4096
OUTLIERS = 8
OUTLIER_GAIN = 10.0
TARGET_PARAMS_PER_S = 6.3e6  # the reference DeltaZip solver at 4096², 2 threads (issue 14)
REFERENCE = {(2, "2:4"): 0.30, (4, "2:4"): 0.079}  # its output error on the same layer


def inputs(k: int, tokens: int, seed: int, kind: str = "mixed"):
    """Inputs [tokens, K]: Gaussian, correlated through a seeded mixing matrix (kind "mixed") or not
    ("iid"), then OUTLIERS channels (the same for every seed) scaled by OUTLIER_GAIN."""
    import torch

    x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(seed))
    if kind == "mixed":
        x = x @ (torch.randn(k, k, generator=torch.Generator().manual_seed(4321)) / k**0.5)
    outliers = torch.randperm(k, generator=torch.Generator().manual_seed(1234))[:OUTLIERS]
    x[:, outliers] *= OUTLIER_GAIN
    return x


def hessian(k: int, kind: str = "mixed"):
    """H = 2/n · XᵀX over the calibration tokens, accumulated in chunks (fp32)."""
    import torch

    h = torch.zeros(k, k)
    chunk = 4096
    for i, start in enumerate(range(0, CALIB_TOKENS, chunk)):
        x = inputs(k, min(chunk, CALIB_TOKENS - start), seed=100 + i, kind=kind)
        h.addmm_(x.T, x)
    return h * (2.0 / CALIB_TOKENS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", default="1024x1024,4096x4096,11008x4096", help="NxK,... (out x in)")
    parser.add_argument("--settings", default="2:2:4,4:2:4", help="bits:sparsity,... e.g. 2:2:4,4:none")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--inputs", choices=("mixed", "iid"), default="mixed",
                        help="calibration inputs correlated through a mixing matrix, or independent")
    parser.add_argument("--solver", default=DEFAULT_SOLVER,
                        help="module:function or file.py:function with solve_delta's signature, to time "
                             "another solver (e.g. the one before: git show "
                             "1827b54:deltazip/compress/obs.py > /tmp/obs_old.py)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()

    import importlib
    import importlib.util

    from deltazip.threads import early_env

    early_env()  # OpenMP threads wait passively (as every deltazip command runs): set before torch loads
    import torch

    module, _, function = args.solver.partition(":")
    if module.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(module).stem, module)
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
    else:
        loaded = importlib.import_module(module)
    solve_delta = getattr(loaded, function)
    torch.set_num_threads(args.threads)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    settings = [(int(s.split(":", 1)[0]), s.split(":", 1)[1]) for s in args.settings.split(",")]
    hessians, held_out = {}, {}
    rows = []
    load = os.getloadavg()[0]
    for n, k in sizes:
        if k not in hessians:
            hessians[k] = hessian(k, args.inputs)
            held_out[k] = inputs(k, HELD_OUT_TOKENS, seed=7, kind=args.inputs)
        delta = 0.01 * torch.randn(n, k, generator=torch.Generator().manual_seed(n * 7 + k))
        reference_out = delta @ held_out[k].T
        for bits, sparsity in settings:
            best, best_cpu = float("inf"), float("inf")
            for _ in range(args.repeats):
                start, start_cpu = time.perf_counter(), time.process_time()
                packed = solve_delta(delta, hessians[k], bits, sparsity, -1, 0.01, 128)
                best = min(best, time.perf_counter() - start)
                best_cpu = min(best_cpu, time.process_time() - start_cpu)
            err = ((packed.dequantize() - delta) @ held_out[k].T).pow(2).sum() / reference_out.pow(2).sum()
            rate = n * k / best
            ref_err = REFERENCE.get((bits, sparsity), "")
            rows.append([f"{n}x{k}", f"{bits}-bit {sparsity}", round(best, 3), f"{rate / 1e6:.2f}",
                         round(best_cpu, 3), f"{n * k / best_cpu / 1e6:.2f}", round(float(err), 4), ref_err])
            print(rows[-1], flush=True)
    load = max(load, os.getloadavg()[0])
    table = markdown_table(["layer [N x K]", "setting", "seconds", "M params/s", "CPU seconds",
                            "M params per CPU-s", "output error", "reference error"], rows)
    notes = (f"{args.threads} torch threads; load average (1 min) up to {load:.2f} during the run on "
             f"{os.cpu_count()} cores (figures taken under load are pessimistic; CPU seconds, all threads "
             "together, depend less on load). Output error = "
             "‖(Ŵ − Δ)Xᵀ‖² / ‖ΔXᵀ‖² on held-out tokens. Target (issue 14): ≥ "
             f"{TARGET_PARAMS_PER_S / 1e6:.1f} M params/s at 4096x4096 (the reference DeltaZip solver's "
             "rate) "
             "with 2-bit 2:4 error ≤ 0.16; reference errors from the same layer. The solver before issue 14 "
             "(two sweeps): `git show 1827b54:deltazip/compress/obs.py > /tmp/obs_old.py` and "
             "`--solver /tmp/obs_old.py:solve_delta`.")
    if not args.no_write:
        title = "Solver: OBS speed and output error (synthetic layer"
        title += ")" if args.inputs == "mixed" else ", independent inputs)"
        if args.solver != DEFAULT_SOLVER:
            title += f" — {Path(module).name}"
        write_section(title, command_line(), table, notes)


if __name__ == "__main__":
    main()
