"""Host memory for swap-in (issue 10): one block per load, backed by huge pages where the kernel allows.

A fresh 4 KiB page costs a fault when first written (about 2 µs each on the measured VM: 3 ms for a 6 MB
delta, as much as decoding it). `host_block` maps large blocks anonymously with MADV_HUGEPAGE (transparent
huge pages in "madvise" or "always" mode; 2 MiB per fault), aligned to 2 MiB; small ones come from torch's
allocator. `Arena` carves an artifact's tensors out of one block, so a decoded delta is a few huge pages.
Where THP is off the advice is ignored and pages fault as before (the same bytes, only slower).
"""

from __future__ import annotations

import math
import mmap

import torch

HUGE_PAGE = 2 << 20
HUGE_MIN = 2 * HUGE_PAGE  # smaller blocks: torch.empty (a huge page would be mostly unused)
ALIGN = 64


def host_block(nbytes: int) -> torch.Tensor:
    """A writable uint8 tensor of `nbytes` (contents undefined), huge-page advised when large."""
    if nbytes < HUGE_MIN or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(nbytes, dtype=torch.uint8)
    try:
        region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:
        return torch.empty(nbytes, dtype=torch.uint8)
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # THP not built in: ordinary pages
        pass
    whole = torch.frombuffer(region, dtype=torch.uint8)  # keeps the mapping alive while any view lives
    start = -whole.data_ptr() % HUGE_PAGE
    return whole[start:start + nbytes]


class Arena:
    """Tensors carved in order out of one host_block (each 64-byte aligned), sized for `shapes` up front.

    One as_strided per tensor on a per-dtype view of the block (slicing and viewing cost three torch calls:
    a few hundred tensors per delta made that milliseconds)."""

    def __init__(self, shapes: list[tuple[list[int] | tuple[int, ...], torch.dtype]]) -> None:
        self._block = host_block(sum(_aligned(_nbytes(shape, dtype)) for shape, dtype in shapes))
        self._typed: dict[torch.dtype, tuple[torch.Tensor, int, int]] = {}  # view, its offset, itemsize
        self._pos = 0

    def take(self, shape: list[int] | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The next tensor of the plan (uninitialised)."""
        typed = self._typed.get(dtype)
        if typed is None:
            view = self._block.view(dtype)
            typed = self._typed[dtype] = (view, view.storage_offset(), dtype.itemsize)
        view, base, itemsize = typed
        if len(shape) == 2:
            strides: tuple[int, ...] = (shape[1], 1)
        else:
            strides = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        out = view.as_strided(tuple(shape), strides, base + self._pos // itemsize)
        self._pos += _aligned(math.prod(shape) * itemsize)
        return out


def _nbytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _aligned(size: int) -> int:
    return -(-size // ALIGN) * ALIGN
