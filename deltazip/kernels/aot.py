"""Ahead-of-time compile of the delta GEMM to PTX/cubin for sm_80 / sm_90a, without a GPU.

`compile_delta_gemm(cc, bits, group_size)` returns an AotKernel for the TensorRT plugin and CI.
Triton cannot compile while the interpreter is active (TRITON_INTERPRET=1, as in the test session),
so then the compile runs in a subprocess: `python -m deltazip.kernels.aot --json`.

Launch ABI (Triton 3.9): the cubin entry `name` takes the non-constexpr arguments of `signature` in
order, then two pointers (global scratch, profile scratch) that may be null when their sizes are 0.
No divisibility hints are compiled in, so any alignment/stride is valid. GPU only — not verified on
this machine: the cubin has never been launched here.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from deltazip.kernels.configs import SHIPPED, TileConfig

TRITON_TYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}

# Which PTX a device of compute capability (major, minor) runs: rows (lowest cc, highest cc, compile cc,
# PTX target). `sm_90a` is an arch-specific target: only a cc 9.0 device can load it. Plain `sm_80` PTX is
# forward compatible (the driver JIT-compiles it for newer GPUs; the kernel uses mma.sync only), so
# Ampere/Ada and Blackwell (10.x, 11.x, 12.x) run the sm_80 PTX. Below 8.0: not supported (no bf16 mma).
PTX_TARGETS = (
    ((8, 0), (8, 9), 80, "sm_80"),    # A100, A10, L4, L40, RTX 30xx/40xx
    ((9, 0), (9, 0), 90, "sm_90a"),   # H100, H200 (wgmma-capable arch-specific PTX)
    ((10, 0), (99, 99), 80, "sm_80"),  # B200, GB200, RTX 50xx and later: forward-compatible PTX, JIT
)
SHIPPED_CCS = tuple(sorted({cc for _, _, cc, _ in PTX_TARGETS}))  # what the plugin compiles: 80 and 90


def ptx_target(major: int, minor: int) -> tuple[int, str]:
    """(compile cc, PTX target) for a device of compute capability major.minor; ValueError below 8.0."""
    for low, high, cc, target in PTX_TARGETS:
        if low <= (major, minor) <= high:
            return cc, target
    raise ValueError(f"compute capability {major}.{minor} is not supported by the delta GEMM (needs >= 8.0)")
DOT_MODES = {"fp16": 1, "bf16": 2, "fp32": 0}  # same codes as delta_gemm.DOT_*


@dataclass
class AotKernel:
    """One compiled delta GEMM: code, resources, and what a host needs to launch it."""

    name: str  # cubin entry point
    cc: int
    target: str  # "sm_80" / "sm_90a"
    ptx: str
    cubin: bytes
    signature: list[tuple[str, str]]  # ordered runtime arguments (name, Triton type)
    constexprs: dict[str, int]
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    shared_bytes: int
    registers: int
    spill_bytes: int  # spill stores + spill loads reported by ptxas
    stack_bytes: int
    mma_instructions: list[str]
    global_scratch_bytes: int = 0
    profile_scratch_bytes: int = 0
    ptxas_log: str = field(default="", repr=False)

    @property
    def threads_per_block(self) -> int:
        return self.num_warps * 32

    def grid(self, num_segments: int, n: int, m_splits: int = 1) -> tuple[int, int, int]:
        """Launch grid: (segments, N blocks, programs per segment along M)."""
        return (num_segments, -(-n // self.block_n), m_splits)

    def to_json(self) -> dict:
        out = asdict(self)
        out["cubin"] = base64.b64encode(self.cubin).decode()
        return out

    @classmethod
    def from_json(cls, data: dict) -> AotKernel:
        data = dict(data, cubin=base64.b64decode(data["cubin"]))
        data["signature"] = [tuple(arg) for arg in data["signature"]]
        return cls(**data)


def kernel_signature(bits: int, group_size: int, sparse24: bool, dtype: str,
                     config: TileConfig) -> tuple[dict[str, str], dict[str, int]]:
    """Triton signature (name → type, constexprs included) and constexpr values of one build."""
    act = TRITON_TYPES[dtype]
    signature = {
        "x_ptr": act, "out_ptr": act, "qweight_ptr": "*i32", "meta_ptr": "*i32",
        "scales_ptr": "*fp16", "zeros_ptr": "*fp16",
        "sorted_rows_ptr": "*i32", "seg_start_ptr": "*i32", "seg_slot_ptr": "*i32",
        "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_om": "i32",
        "stride_qs": "i32", "stride_qn": "i32", "stride_ms": "i32", "stride_mn": "i32",
        "stride_ss": "i32", "stride_sn": "i32",
    }
    constexprs = {"BITS": bits, "GROUP": group_size, "SPARSE24": sparse24, "DOT_MODE": DOT_MODES[dtype],
                  **config.constexprs()}
    signature.update({name: "constexpr" for name in constexprs})
    return signature, constexprs


def _triton_bin(tool: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool)


def _ptxas_report(ptx: str, cc: int) -> tuple[int, int, int, str]:
    """(registers, spill bytes, stack bytes, log) from `ptxas -v` (the ptxas Triton itself uses)."""
    tool = _triton_bin("ptxas" if cc < 90 else "ptxas-blackwell")
    arch = "sm_90a" if cc == 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        run = subprocess.run([tool, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", str(src),
                              "-o", str(Path(tmp) / "k.cubin")], capture_output=True, text=True, check=True)
    log = run.stderr + run.stdout
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    stack = int(re.search(r"(\d+) bytes stack frame", log).group(1))
    return registers, spills, stack, log


_ENTRY = re.compile(r"\.entry\s+(?P<name>[A-Za-z_$][\w$]*)\s*\((?P<params>[^)]*)\)", re.S)
_PARAM = re.compile(r"\.param\s+\.(?P<type>[busf]\d+)\b[^,]*?(?P<name>[A-Za-z_$][\w$]*)\s*$")


def ptx_entry_params(ptx: str, name: str) -> list[tuple[str, str]]:
    """The parameter list of `.entry name(...)` read from the PTX text: [(PTX type, param name)], in order
    (e.g. ("u64", "delta_gemm_kernel_param_0")). ValueError when the PTX has no such entry."""
    for match in _ENTRY.finditer(ptx):
        if match.group("name") != name:
            continue
        params = []
        for decl in match.group("params").split(","):
            decl = decl.strip()
            if not decl:
                continue
            found = _PARAM.search(decl)
            if found is None:
                raise ValueError(f"unparsed PTX parameter of {name}: {decl!r}")
            params.append((found.group("type"), found.group("name")))
        return params
    raise ValueError(f"the PTX has no .entry {name}")


def ptx_params_read(ptx: str, name: str) -> set[str]:
    """Names of the entry's parameters the kernel body reads (`ld.param ... [param]`)."""
    params = {param for _, param in ptx_entry_params(ptx, name)}
    return {p for p in re.findall(r"ld\.param[.\w]*\s+[^,]+,\s*\[([\w$]+)", ptx) if p in params}


def mma_instructions(ptx: str) -> list[str]:
    """Distinct tensor-core opcodes in the PTX (mma.sync..., wgmma...)."""
    found = set()
    for line in ptx.splitlines():
        op = line.strip().split(" ")[0].rstrip(";")
        if op.startswith(("mma.", "wgmma.", "tcgen05.mma")):
            found.add(op)
    return sorted(found)


def _compile_here(cc: int, bits: int, group_size: int, sparse24: bool, dtype: str,
                  config: TileConfig) -> AotKernel:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from deltazip.kernels.delta_gemm import delta_gemm_kernel

    signature, constexprs = kernel_signature(bits, group_size, sparse24, dtype, config)
    compiled = triton.compile(ASTSource(fn=delta_gemm_kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", cc, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    ptx = compiled.asm["ptx"]
    registers, spills, stack, log = _ptxas_report(ptx, cc)
    meta = compiled.metadata
    return AotKernel(
        name=meta.name, cc=cc, target=re.search(r"^\.target (\S+)", ptx, re.M).group(1), ptx=ptx,
        cubin=compiled.asm["cubin"],
        signature=[(name, kind) for name, kind in signature.items() if kind != "constexpr"],
        constexprs={k: int(v) for k, v in constexprs.items()},
        block_m=config.block_m, block_n=config.block_n, block_k=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages, shared_bytes=meta.shared,
        registers=registers, spill_bytes=spills, stack_bytes=stack, mma_instructions=mma_instructions(ptx),
        global_scratch_bytes=getattr(meta, "global_scratch_size", 0) or 0,
        profile_scratch_bytes=getattr(meta, "profile_scratch_size", 0) or 0, ptxas_log=log,
    )


def compile_delta_gemm(cc: int, bits: int, group_size: int, sparse24: bool = True, dtype: str = "fp16",
                       config: TileConfig = SHIPPED) -> AotKernel:
    """Compile the delta GEMM for compute capability `cc` (80 → sm_80, 90 → sm_90a) without a GPU."""
    if dtype not in TRITON_TYPES:
        raise ValueError(f"dtype must be one of {sorted(TRITON_TYPES)}, not {dtype!r}")
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return _compile_here(cc, bits, group_size, sparse24, dtype, config)
    args = ["--cc", str(cc), "--bits", str(bits), "--group-size", str(group_size), "--dtype", dtype,
            "--config", json.dumps(config.to_dict())] + ([] if sparse24 else ["--dense"])
    return compile_in_subprocess(args)[0]


def compile_in_subprocess(args: list[str]) -> list[AotKernel]:
    """Run `python -m deltazip.kernels.aot --json ARGS` with the interpreter off; parse its kernels."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    run = subprocess.run([sys.executable, "-m", "deltazip.kernels.aot", "--json", *args],
                         capture_output=True, text=True, env=env)
    if run.returncode:
        raise RuntimeError(f"AOT compile failed: {run.stderr.strip()[-2000:]}")
    return [AotKernel.from_json(item) for item in json.loads(run.stdout)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="AOT-compile the deltazip delta GEMM (no GPU needed).")
    parser.add_argument("--cc", type=int, action="append", help="compute capability (default: 80 and 90)")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--dense", action="store_true", help="dense (not 2:4) deltas")
    parser.add_argument("--dtype", default="fp16", choices=sorted(TRITON_TYPES))
    parser.add_argument("--config", help="TileConfig as JSON (default: the shipped one)")
    parser.add_argument("--json", action="store_true", help="print the kernels as JSON (cubin in base64)")
    parser.add_argument("--out", type=Path, help="also write NAME_smXX.{ptx,cubin,json} here")
    args = parser.parse_args(argv)
    config = TileConfig(**json.loads(args.config)) if args.config else SHIPPED
    kernels = [compile_delta_gemm(cc, args.bits, args.group_size, not args.dense, args.dtype, config)
               for cc in args.cc or [80, 90]]
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for kernel in kernels:
            stem = args.out / f"delta_gemm_{kernel.target}"
            stem.with_suffix(".ptx").write_text(kernel.ptx)
            stem.with_suffix(".cubin").write_bytes(kernel.cubin)
            info = {k: v for k, v in kernel.to_json().items() if k not in ("ptx", "cubin", "ptxas_log")}
            stem.with_suffix(".json").write_text(json.dumps(info, indent=1))
    if args.json:
        print(json.dumps([kernel.to_json() for kernel in kernels]))
        return
    for kernel in kernels:
        print(f"{kernel.target}: {kernel.name} regs={kernel.registers} spill={kernel.spill_bytes}B "
              f"stack={kernel.stack_bytes}B shared={kernel.shared_bytes}B "
              f"tile={kernel.block_m}x{kernel.block_n}x{kernel.block_k}/{kernel.num_warps}w "
              f"mma={','.join(kernel.mma_instructions) or 'none'}")


if __name__ == "__main__":
    main()
