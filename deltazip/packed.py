"""The in-memory packed form of one linear layer's delta, shared by compression, kernels and converters.

A delta Δ of dense shape [N, K] (out_features, in_features) is stored as:

* ``qweight`` int32 [N, ceil(C / VPW)]: C codes per row, VPW = 32 // bits codes per word, the first code
  in the lowest bits. C = K // 2 when 2:4-sparse (only kept values, never zero codes), else C = K.
* ``meta`` int32 [N, K // 32] (2:4 only): for kept value j, its 2-bit position inside dense group j // 2,
  16 positions per word, lowest bits first. The two kept positions of a group are ascending.
* ``scales``, ``zeros`` fp16 [N, K // group_size]: w = (q − z) · s, group of dense column k = k // group_size.

Dense column of kept value j: (j // 2) * 4 + position[j]. K must be a multiple of 32 when 2:4-sparse.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

PACKED_KEYS = ("qweight", "meta", "scales", "zeros")


def codes_per_word(bits: int) -> int:
    """How many `bits`-wide codes one int32 word holds (3-bit: 10, leaving 2 bits unused)."""
    return 32 // bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes [..., C] in [0, 2**bits) → int32 words [..., ceil(C / VPW)], lowest bits first."""
    if codes.device.type != "cpu":
        return _pack_codes_torch(codes, bits)
    *lead, c = codes.shape
    words = pack_codes_np(codes.detach().reshape(math.prod(lead), c).numpy(), bits)
    return torch.from_numpy(words).reshape(*lead, words.shape[-1])


def unpack_codes(words: torch.Tensor, bits: int, count: int,
                 dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Inverse of pack_codes: int32 words [..., W] → codes [..., count] (int64 unless `dtype` says).

    The one code-unpacking routine: on CPU it runs unpack_codes_np (a byte lookup table), elsewhere the same
    shifts in torch int32 math. Kernels, converters and the artifact codec all unpack through here.
    """
    if words.device.type != "cpu":
        return _unpack_codes_torch(words, bits, count).to(dtype)
    *lead, w = words.shape
    codes = unpack_codes_np(words.detach().contiguous().reshape(math.prod(lead), w).numpy(), bits, count)
    return torch.from_numpy(codes).to(dtype).reshape(*lead, count)


def pack_codes_np(codes: np.ndarray, bits: int) -> np.ndarray:
    """numpy codes [R, C] (any integer dtype, values < 2**bits) → int32 words [R, ceil(C / VPW)]."""
    vpw = codes_per_word(bits)
    rows, c = codes.shape
    n_words = -(-c // vpw)
    if 8 % bits == 0:  # whole codes per byte: build bytes in uint8, then read 4 bytes as one word
        per = 8 // bits
        grid = np.zeros((rows, n_words * vpw), dtype=np.uint8)
        grid[:, :c] = codes
        grid = grid.reshape(rows, n_words * 4, per)
        packed = grid[..., 0].copy()
        for i in range(1, per):
            packed |= grid[..., i] << np.uint8(i * bits)
        return packed.view("<i4").astype(np.int32, copy=False).reshape(rows, n_words)
    grid = np.zeros((rows, n_words * vpw), dtype=np.uint32)
    grid[:, :c] = codes
    grid = grid.reshape(rows, n_words, vpw)
    words = grid[..., 0].copy()
    for i in range(1, vpw):
        words |= grid[..., i] << np.uint32(i * bits)
    return words.view(np.int32)


def unpack_codes_np(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of pack_codes_np: int32 words [R, W] → uint8 codes [R, count]."""
    rows, w = words.shape
    if bits == 8:  # one code per byte: the words' little-endian bytes are the codes
        codes = np.array(words, dtype="<i4", order="C").view(np.uint8).reshape(rows, w * 4)  # a copy
    elif 8 % bits == 0:
        per = 8 // bits
        stream = np.ascontiguousarray(words).astype("<i4", copy=False).view(np.uint8)
        codes = _byte_lut(bits, per)[stream].view(np.uint8).reshape(rows, w * 4 * per)
    else:
        shifts = np.arange(codes_per_word(bits), dtype=np.uint32) * np.uint32(bits)
        codes = ((words.view(np.uint32)[..., None] >> shifts) & np.uint32((1 << bits) - 1)).astype(np.uint8)
        codes = codes.reshape(rows, w * codes_per_word(bits))
    if count > codes.shape[1]:
        raise ValueError(f"{w} words hold fewer than {count} {bits}-bit codes")
    return codes[:, :count]


@functools.cache
def _byte_lut(bits: int, per: int) -> np.ndarray:
    """[256] of `per`-byte items: byte b → its `per` codes of `bits` bits, one per byte, lowest bits first.

    One gather of `per`-byte items is much faster than gathering rows of a [256, per] uint8 table.
    """
    byte = np.arange(256, dtype=np.uint8)[:, None]
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    table = ((byte >> shifts) & np.uint8((1 << bits) - 1)).astype(np.uint8)
    return np.ascontiguousarray(table).view(f"<u{per}").reshape(256)


def _pack_codes_torch(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """pack_codes on a non-CPU device (plain torch int64 math)."""
    vpw = codes_per_word(bits)
    *lead, c = codes.shape
    n_words = -(-c // vpw)
    padded = torch.zeros(*lead, n_words * vpw, dtype=torch.int64, device=codes.device)
    padded[..., :c] = codes.to(torch.int64)
    shifts = torch.arange(vpw, dtype=torch.int64, device=codes.device) * bits
    words = (padded.reshape(*lead, n_words, vpw) << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as signed int32
    return words.to(torch.int32)


def _unpack_codes_torch(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """unpack_codes on a non-CPU device: int32 shifts (arithmetic shift + mask = logical), int32 codes."""
    shifts = torch.arange(codes_per_word(bits), dtype=torch.int32, device=words.device) * bits
    codes = (words.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*words.shape[:-1], -1)[..., :count]


def kept_dense_columns(positions: torch.Tensor) -> torch.Tensor:
    """2:4 positions [N, K/2] (0..3) → the dense column index of each kept value [N, K/2]."""
    j = torch.arange(positions.shape[-1], device=positions.device)
    return (j // 2 * 4) + positions.to(torch.int64)


@dataclass(frozen=True)
class PackedLayout:
    """The shape logic of a packed [N, K] delta: which tensors it has and their shapes (one place).

    PackedLinear (one delta) and DeltaSlots (deltas stacked [S, ...]) are both described by one layout.
    """

    out_features: int
    in_features: int
    bits: int
    group_size: int
    sparse24: bool

    def __post_init__(self) -> None:
        k = self.in_features
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"bits must be 2, 3, 4 or 8, not {self.bits}")
        if self.group_size <= 0 or k % self.group_size:
            raise ValueError(f"group_size {self.group_size} does not divide in_features {k}")
        if self.sparse24 and k % 32:
            raise ValueError(f"2:4 deltas need in_features % 32 == 0 (in_features={k})")

    @property
    def n_codes(self) -> int:
        """Codes stored per row: K/2 for 2:4, else K."""
        return self.in_features // 2 if self.sparse24 else self.in_features

    @property
    def n_words(self) -> int:
        """int32 words of codes per row."""
        return -(-self.n_codes // codes_per_word(self.bits))

    @property
    def n_groups(self) -> int:
        """Scale groups per row."""
        return self.in_features // self.group_size

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Shape of each packed tensor by key (meta only when 2:4)."""
        n = self.out_features
        out = {"qweight": (n, self.n_words), "scales": (n, self.n_groups), "zeros": (n, self.n_groups)}
        if self.sparse24:
            out["meta"] = (n, self.in_features // 32)
        return out

    def check(self, tensors: dict[str, torch.Tensor | None], lead: tuple[int, ...] = ()) -> None:
        """Raise ValueError naming the first tensor whose shape or dtype is not this layout's."""
        if self.sparse24 and tensors.get("meta") is None:
            raise ValueError(f"2:4 deltas need metadata (in_features={self.in_features})")
        for name, shape in self.shapes().items():
            t = tensors[name]
            got, want = tuple(t.shape), (*lead, *shape)
            if got != want:
                raise ValueError(f"{name} has shape {got}, expected {want}")
            dtype = torch.float16 if name in ("scales", "zeros") else torch.int32
            if t.dtype != dtype:
                raise ValueError(f"{name} has dtype {t.dtype}, expected {dtype}")


@dataclass
class PackedLinear:
    """One linear layer's delta: low-bit codes, optional 2:4 structure, fp16 scales and zeros."""

    out_features: int
    in_features: int
    bits: int
    group_size: int
    sparse24: bool
    qweight: torch.Tensor  # int32 [N, ceil(C / VPW)]
    meta: torch.Tensor | None  # int32 [N, K / 32], 2:4 only
    scales: torch.Tensor  # fp16 [N, K / group_size]
    zeros: torch.Tensor  # fp16 [N, K / group_size]

    def __post_init__(self) -> None:
        layout = self.layout
        for name, shape in layout.shapes().items():  # shapes only: dtypes are checked where data is consumed
            t = getattr(self, name)
            if t is None:
                raise ValueError(f"2:4 deltas need in_features % 32 == 0 and metadata "
                                 f"(in_features={self.in_features})")
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")

    @property
    def layout(self) -> PackedLayout:
        return PackedLayout(self.out_features, self.in_features, self.bits, self.group_size, self.sparse24)

    @property
    def n_codes(self) -> int:
        """Codes stored per row: K/2 for 2:4, else K."""
        return self.layout.n_codes

    @property
    def nbytes(self) -> int:
        """Resident bytes of the packed form."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The packed tensors by key (meta only when 2:4)."""
        out = {"qweight": self.qweight, "scales": self.scales, "zeros": self.zeros}
        if self.meta is not None:
            out["meta"] = self.meta
        return out

    def to(self, device: torch.device | str) -> PackedLinear:
        """This delta on `device` (itself when already there: no copy, no re-validation)."""
        device = torch.device(device)
        if all(t.device == device for t in self.tensors().values()):
            return self
        moved = {k: v.to(device) for k, v in self.tensors().items()}
        return PackedLinear(self.out_features, self.in_features, self.bits, self.group_size, self.sparse24,
                            moved["qweight"], moved.get("meta"), moved["scales"], moved["zeros"])

    def codes(self) -> torch.Tensor:
        """Unpacked codes [N, C] (int64)."""
        return unpack_codes(self.qweight, self.bits, self.n_codes)

    def positions(self) -> torch.Tensor:
        """2:4 positions [N, K/2] (int64, 0..3) of the kept values."""
        if self.meta is None:
            raise ValueError("a dense delta has no 2:4 positions")
        return unpack_codes(self.meta, 2, self.in_features // 2)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense delta [N, K]: the reference semantics every kernel must match."""
        n, k = self.out_features, self.in_features
        codes = self.codes().to(torch.float32)
        if self.sparse24:
            cols = kept_dense_columns(self.positions())
        else:
            cols = torch.arange(k, device=codes.device).expand(n, k)
        groups = cols // self.group_size
        values = (codes - self.zeros.float().gather(1, groups)) * self.scales.float().gather(1, groups)
        dense = torch.zeros(n, k, dtype=torch.float32, device=codes.device).scatter_(1, cols, values)
        return dense.to(dtype)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                   group_size: int, positions: torch.Tensor | None = None,
                   in_features: int | None = None) -> PackedLinear:
        """Pack codes [N, C] (and 2:4 positions [N, K/2] when sparse) into a PackedLinear."""
        n = codes.shape[0]
        sparse = positions is not None
        k = in_features or (codes.shape[1] * 2 if sparse else codes.shape[1])
        meta = pack_codes(positions, 2) if sparse else None
        return cls(n, k, bits, group_size, sparse, pack_codes(codes, bits), meta,
                   scales.to(torch.float16).contiguous(), zeros.to(torch.float16).contiguous())
