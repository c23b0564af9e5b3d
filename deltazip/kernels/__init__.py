"""Delta GEMM: stacked packed deltas (DeltaSlots), torch path, OpenAI Triton kernel, AOT compile.

Triton is imported only by the Triton path (deltazip.kernels.delta_gemm) and the AOT module.
"""

from deltazip.kernels.ops import add_delta_matmul
from deltazip.kernels.slots import DeltaSlots

__all__ = ["DeltaSlots", "add_delta_matmul"]
