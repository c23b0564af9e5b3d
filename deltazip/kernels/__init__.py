"""Delta GEMM: stacked packed deltas (DeltaSlots) and the one operator ``deltazip::add_delta_matmul``.

Implementations: native C++ on CPU (deltazip.kernels.native), the OpenAI Triton kernel on CUDA
(deltazip.kernels.delta_gemm, with AOT compile in deltazip.kernels.aot), and the torch path
(deltazip.kernels.torch_path: the oracle, and the CPU fallback where the native code cannot build).
Triton is imported only by the Triton path and the AOT module.
"""

from deltazip.kernels.ops import add_delta_matmul
from deltazip.kernels.slots import DeltaSlots

__all__ = ["DeltaSlots", "add_delta_matmul"]
