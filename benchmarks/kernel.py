"""Delta GEMM benchmark: every implementation side by side in one run (ratios to the base: the machine is
noisy).

    .venv/bin/python benchmarks/kernel.py [--repeats 20] [--threads 2] [--steps 3 --rounds 5] [--skip-aot]

Section 1 (CPU, per layer): 16 rows over 1/4/16 distinct 2-bit 2:4 deltas (small preset shapes), torch path
vs the native kernel's strategies (direct, LUT, dense decode + GEMM, auto), each as a ratio to the fp32
base GEMM of the same 16 rows.
Section 2 (CPU): rows per segment on one delta, direct vs rowvec vs dense-decode: where the auto thresholds
come from.
Section 3 (CPU, the issue's target): decode step of 16 sequences over 1/4/16 distinct deltas, small preset
shape (hidden 512, 8 layers; random weights, random 2-bit 2:4 deltas on the writer's symmetric grid),
fp32, torch path vs native, ratio to the base-only step. Targets ≤ 1.5x / 2.0x / 3.0x.
Section 4: registers / spills / shared memory / tensor-core opcodes of the shipped Triton tile (AOT, no GPU).
Section 5 (GPU only — not verified on this machine): Triton kernel vs torch path vs fp16 base GEMM on CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks._results import command_line, markdown_table, write_section  # noqa: E402

# (layer, N, K): the small family preset's linear shapes (hidden 512, intermediate 1536, 8 heads, 2 kv heads)
SHAPES = [("q_proj / o_proj", 512, 512), ("k_proj / v_proj", 128, 512), ("gate_proj / up_proj", 1536, 512),
          ("down_proj", 512, 1536)]
ROWS = 16
DISTINCT_DELTAS = (1, 4, 16)
STRATEGIES = ("direct", "lut", "rowvec", "dense", "auto")
THRESHOLD_STRATEGIES = ("direct", "rowvec", "dense")
TARGETS = {1: 1.5, 4: 2.0, 16: 3.0}


def best_ms(fn, repeats: int, sync=lambda: None) -> float:
    """Best-of-`repeats` wall time of fn() in milliseconds (after one warm-up call)."""
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


@contextlib.contextmanager
def native_strategy(name: str):
    """Force the native kernel's strategy (DELTAZIP_NATIVE_STRATEGY is read on every call)."""
    old = os.environ.get("DELTAZIP_NATIVE_STRATEGY")
    os.environ["DELTAZIP_NATIVE_STRATEGY"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DELTAZIP_NATIVE_STRATEGY", None)
        else:
            os.environ["DELTAZIP_NATIVE_STRATEGY"] = old


def filled_slots(n: int, k: int, num_slots: int, device: str = "cpu", group_size: int = 64):
    import torch

    from deltazip.kernels import DeltaSlots
    from deltazip.kernels.synthetic import random_packed

    gen = torch.Generator().manual_seed(0)
    slots = DeltaSlots(num_slots, n, k, 2, group_size, True, device=device)
    for slot in range(num_slots):
        slots.set(slot, random_packed(n, k, 2, group_size, True, gen, symmetric=True).to(device))
    return slots


def cpu_layers(repeats: int) -> list[list[object]]:
    import torch

    from deltazip.kernels import add_delta_matmul

    rows = []
    for layer, n, k in SHAPES:
        slots = filled_slots(n, k, max(DISTINCT_DELTAS))
        weight, x, out = torch.randn(n, k), torch.randn(ROWS, k), torch.zeros(ROWS, n)
        for distinct in DISTINCT_DELTAS:
            row_slot = (torch.arange(ROWS) % distinct).to(torch.int32)
            # interleaved: every implementation measured in the same round, best of the rounds
            times: dict[str, list[float]] = {}
            for _ in range(3):
                times.setdefault("base", []).append(best_ms(lambda: x @ weight.t(), repeats))  # noqa: B023
                times.setdefault("torch", []).append(best_ms(
                    lambda: add_delta_matmul(out, x, slots, row_slot, impl="torch"), max(2, repeats // 4)))  # noqa: B023
                for strategy in STRATEGIES:
                    with native_strategy(strategy):
                        times.setdefault(strategy, []).append(best_ms(
                            lambda: add_delta_matmul(out, x, slots, row_slot, impl="native"), repeats))  # noqa: B023
            best = {key: min(v) for key, v in times.items()}
            rows.append([f"{layer} [{n}x{k}]", distinct, best["base"],
                         *(best[key] / best["base"] for key in ("torch", *STRATEGIES))])
    return rows


def cpu_threshold(repeats: int) -> list[list[object]]:
    import torch

    from deltazip.kernels import add_delta_matmul

    rows = []
    n, k = 1536, 512
    slots = filled_slots(n, k, 1)
    weight = torch.randn(n, k)
    for m in (1, 4, 8, 9, 16, 32, 64, 128, 256, 512, 1024):
        x, out = torch.randn(m, k), torch.zeros(m, n)
        row_slot = torch.zeros(m, dtype=torch.int32)
        base = best_ms(lambda: x @ weight.t(), repeats)  # noqa: B023
        times = {}
        for strategy in THRESHOLD_STRATEGIES:
            with native_strategy(strategy):
                times[strategy] = best_ms(lambda: add_delta_matmul(out, x, slots, row_slot, impl="native"),  # noqa: B023
                                          repeats)
        rows.append([m, base, *(times[s] / base for s in THRESHOLD_STRATEGIES), min(times, key=times.get)])
    return rows


def synthetic_model(root: Path, num_slots: int, kernel: str):
    """A random small-preset Llama (HF files, fp32 executor) with random 2-bit 2:4 deltas in every slot."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from deltazip.kernels.synthetic import random_packed
    from deltazip.runtime.delta_linear import enable_deltas, set_model_delta
    from deltazip.runtime.model import load_llama

    base = root / "base"
    if not base.exists():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=128, max_position_embeddings=256, hidden_size=512,  # small preset
                          intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                          num_key_value_heads=2)
        LlamaForCausalLM(cfg).to(torch.float16).save_pretrained(base)
    model = load_llama(base, "float32")
    enable_deltas(model, num_slots, kernel)
    gen = torch.Generator().manual_seed(1)
    for slot in range(num_slots):
        linears = {name.removesuffix(".weight"): random_packed(*p.shape, 2, 64, True, gen, symmetric=True)
                   for name, p in model.named_parameters() if p.dim() == 2 and "embed" not in name}
        set_model_delta(model, slot, linears, {})
    return model


def set_kernel(model, kernel: str) -> None:
    from deltazip.runtime.delta_linear import DeltaLinear

    for module in model.modules():
        if isinstance(module, DeltaLinear):
            module.kernel = kernel


def decode_step(steps: int, rounds: int, only: tuple[str, ...] = ()) -> list[list[object]]:
    """Median decode-step ms, 16 sequences over 0 (base) / 1 / 4 / 16 distinct deltas, per implementation,
    all measured interleaved in one run."""
    import torch

    from deltazip.runtime.model import Segment

    with tempfile.TemporaryDirectory(prefix="deltazip-bench-kernel-") as tmp:
        model = synthetic_model(Path(tmp), ROWS, "auto")
    context = 32
    gen = torch.Generator().manual_seed(0)
    caches = [model.new_cache(context + 1) for _ in range(ROWS)]
    kernels = {"torch path": ("torch", None), "native (auto)": ("auto", "auto"),
               "native LUT": ("auto", "lut")}
    kernels = {k: v for k, v in kernels.items() if k == "torch path" or not only or k in only}
    with torch.inference_mode():
        prompt = torch.randint(0, model.args.vocab_size, (ROWS * context,), generator=gen)
        model(prompt, [Segment(c, 0, context) for c in caches])
        tokens = torch.randint(0, model.args.vocab_size, (ROWS,), generator=gen)
        segments = [Segment(c, context, 1) for c in caches]
        layouts = {0: None, **{d: (torch.arange(ROWS) % d).to(torch.int32) for d in DISTINCT_DELTAS}}
        times: dict[tuple[str, int], list[float]] = {}
        for _ in range(rounds):
            for label, (kernel, strategy) in kernels.items():
                set_kernel(model, kernel)
                with native_strategy(strategy or "auto"):
                    for distinct, row_slot in layouts.items():
                        if distinct == 0 and label != "torch path":
                            continue  # one base-only figure: the base step does not call the delta op
                        model(tokens, segments, row_slot)  # warm
                        start = time.perf_counter()
                        for _ in range(steps):
                            model(tokens, segments, row_slot)
                        times.setdefault((label, distinct), []).append((time.perf_counter() - start) / steps)
    base = statistics.median(times[("torch path", 0)]) * 1e3
    rows = [["base only", "—", base, 1.0, "—"]]
    for distinct in DISTINCT_DELTAS:
        for label in kernels:
            ms = statistics.median(times[(label, distinct)]) * 1e3
            rows.append([f"{distinct} distinct deltas", label, ms, ms / base, f"≤ {TARGETS[distinct]}x"])
    return rows


def aot_resources() -> list[list[object]]:
    from deltazip.kernels.aot import compile_in_subprocess

    rows = []
    for bits in (2, 4):
        args = ["--cc", "80", "--cc", "90", "--bits", str(bits), "--group-size", "128"]
        for kernel in compile_in_subprocess(args):
            tile = f"{kernel.block_m}x{kernel.block_n}x{kernel.block_k}/{kernel.num_warps}w"
            rows.append([kernel.target, bits, tile, kernel.registers, kernel.spill_bytes, kernel.shared_bytes,
                         ", ".join(kernel.mma_instructions) or "none"])
    return rows


def gpu_timings(repeats: int) -> list[list[object]]:
    """GPU only — not verified on this machine."""
    import torch

    from deltazip.kernels import add_delta_matmul

    rows = []
    for layer, n, k in SHAPES:
        slots = filled_slots(n, k, max(DISTINCT_DELTAS), device="cuda")
        weight = torch.randn(n, k, device="cuda", dtype=torch.float16)
        x = torch.randn(ROWS, k, device="cuda", dtype=torch.float16)
        out = torch.zeros(ROWS, n, device="cuda", dtype=torch.float16)
        base_ms = best_ms(lambda: x @ weight.t(), repeats, torch.cuda.synchronize)  # noqa: B023
        for distinct in DISTINCT_DELTAS:
            row_slot = (torch.arange(ROWS, device="cuda") % distinct).to(torch.int32)
            got, expect = out.clone(), out.clone()
            add_delta_matmul(got, x, slots, row_slot, impl="triton")
            add_delta_matmul(expect, x, slots, row_slot, impl="torch")
            torch.testing.assert_close(got, expect, rtol=2e-2, atol=2e-2)  # fp16 tensor-core dot vs fp32
            times = {impl: best_ms(lambda: add_delta_matmul(out, x, slots, row_slot, impl=impl),  # noqa: B023
                                   repeats, torch.cuda.synchronize) for impl in ("triton", "torch")}
            rows.append([f"{layer} [{n}x{k}]", distinct, base_ms, times["triton"], times["torch"],
                         times["triton"] / base_ms])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2, help="torch (and native kernel) threads")
    parser.add_argument("--steps", type=int, default=3, help="decode steps per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)")
    parser.add_argument("--skip-aot", action="store_true", help="skip the AOT resource section")
    args = parser.parse_args()
    import torch

    from deltazip.kernels import native

    command = command_line()
    torch.set_num_threads(args.threads)
    state = native.info()
    if not state["available"]:
        raise SystemExit(f"the native kernel did not build: {state['error']}")
    where = (f"fp32; {args.threads} threads (native kernel: {state['usable_cpus']} usable CPUs, "
             f"AVX2 {'on' if state['avx2'] else 'off'}); best of the repeats, implementations interleaved")
    table = markdown_table(["layer [N x K]", "distinct deltas", "base GEMM ms", "torch / base",
                            "native direct / base", "native LUT / base", "native rowvec / base",
                            "native dense / base", "native auto / base"], cpu_layers(args.repeats))
    write_section("Delta GEMM: torch path vs native strategies (CPU, 16 rows)", command, table,
                  "2-bit 2:4 deltas, group 64, symmetric grid; " + where + ". direct = codes decoded in "
                  "registers (8 output rows per AVX2 register, reused by up to 8 activation rows); LUT = "
                  "per-row table of the 96 partial sums of each group of 4 inputs; rowvec = lanes are "
                  "activation rows (x transposed), no permute; dense = decode a tile "
                  "to fp32 and BLAS GEMM; auto = direct below DELTAZIP_NATIVE_ROWVEC_ROWS rows per segment, "
                  "rowvec up to DELTAZIP_NATIVE_DENSE_ROWS, dense from there.")
    print(table)
    columns = ["rows on one delta", "base GEMM ms", *(f"{s} / base" for s in THRESHOLD_STRATEGIES), "fastest"]
    table = markdown_table(columns, cpu_threshold(args.repeats))
    write_section("Delta GEMM: direct vs rowvec vs dense decode by segment rows (CPU)", command, table,
                  "gate/up shape [1536x512], one 2-bit 2:4 delta, " + where + ". Sets the auto "
                  "thresholds DELTAZIP_NATIVE_ROWVEC_ROWS and DELTAZIP_NATIVE_DENSE_ROWS.")
    print(table)
    table = markdown_table(["16 sequences on", "implementation", "decode step ms", "ratio vs base", "target"],
                           decode_step(args.steps, args.rounds))
    write_section("Delta GEMM: mixed-delta decode step, torch path vs native (small-shaped, synthetic)",
                  command, table,
                  "Random small-preset Llama (hidden 512, intermediate 1536, 8 layers, vocab 128), random "
                  "2-bit 2:4 deltas (group 64, symmetric grid) on every linear incl. lm_head; context 32; "
                  f"fp32; {args.threads} threads; median of the rounds, implementations interleaved. "
                  "Targets from the issue: ≤ 1.5x / 2.0x / 3.0x the base-only step.")
    print(table)
    if not args.skip_aot:
        table = markdown_table(["target", "bits", "tile MxNxK/warps", "registers", "spill bytes",
                                "shared bytes", "tensor-core opcodes"], aot_resources())
        write_section("Delta GEMM: AOT resources of the shipped tile (no GPU)", command, table,
                      "fp16 activations, 2:4, group 128; `triton.compile` for GPUTarget cuda 80/90, ptxas -v "
                      "of Triton's bundled ptxas. Compiled only: GPU only — not verified on this machine.")
        print(table)
    if torch.cuda.is_available():
        columns = ["layer [N x K]", "distinct deltas", "base fp16 GEMM ms", "triton ms", "torch ms",
                   "triton / base"]
        table = markdown_table(columns, gpu_timings(args.repeats))
        write_section("Delta GEMM on GPU (16 rows)", command, table, "Measured on CUDA.")
        print(table)
    else:
        print("no CUDA device: GPU timings skipped (GPU only — not verified on this machine)")


if __name__ == "__main__":
    main()
