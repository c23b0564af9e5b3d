"""Tile configurations of the delta GEMM, as data (picked by the launcher and the AOT compile)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class TileConfig:
    """Block sizes and launch options of one delta GEMM configuration."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2
    max_m_splits: int = 64  # programs per segment along M (long prefill segments); 1 = one loop per segment

    def constexprs(self) -> dict[str, int]:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k}

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


# Shipped GPU tile: fp16 tl.dot -> mma.sync m16n8k16 on sm_80/sm_90a; 16x32x32 with 4 warps compiles
# without register spills (128 registers, 7 KiB shared; AOT check in tests/test_kernels_aot.py).
# 16x64x32/4w is also spill-free (~230 registers); 16x64x64/4w and 32x64x64/4w spill (Triton 3.9).
SHIPPED = TileConfig(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=2)

# Interpreter (CPU tests): cost is per program x K-step, nearly independent of tile size -> big tiles.
INTERPRETER = TileConfig(block_m=32, block_n=128, block_k=128, num_warps=4, num_stages=1, max_m_splits=1)
