"""Any-precision linears (docs/FORMAT.md, "Any-precision linears"): nested codes stored as bitplanes.

An any-precision linear stores its widest codes (`bits` B) as B bitplanes, most significant first; the top b
planes are the codes of a valid b-bit delta on the midrise grid w = (q − z_b)·s_b, z_b = 2^(b−1) − ½, with
that precision's own scales: the widest as fp16 (`scales`), each narrower one as an int8 log-ratio to them
(`ratio{b}`: s_b = fp16(2^(B−b) · s_B · 2^(r/64)), 1.1% steps). Loading at precision b reads the 2:4 patterns,
planes 0..b−1 and the b-bit scales into an ordinary b-bit `PackedLinear`: the kernels see nothing new.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from deltazip.errors import ArtifactError
from deltazip.packed import PackedLinear, pack_codes_np


@dataclass
class AnyPrecisionLinear:
    """Nested codes of one delta: `views[b]` is the b-bit PackedLinear of each stored precision b.

    The views share the 2:4 positions, and the b-bit codes are the top b bits of the widest codes.
    """

    views: dict[int, PackedLinear]

    def __post_init__(self) -> None:
        if not self.views:
            raise ValueError("an any-precision linear needs at least one precision")
        top = self.top
        for bits, view in self.views.items():
            if (view.out_features, view.in_features, view.sparse24, view.group_size) != \
                    (top.out_features, top.in_features, top.sparse24, top.group_size) or view.bits != bits:
                raise ValueError(f"precision {bits} does not have the layout of the widest view")

    @property
    def precisions(self) -> list[int]:
        return sorted(self.views)

    @property
    def top(self) -> PackedLinear:
        return self.views[max(self.views)]

    def check_nested(self) -> None:
        """ValueError unless every view's codes are the top bits of the widest codes (same positions)."""
        top = self.top
        codes = top.codes()
        for bits, view in self.views.items():
            if not torch.equal(view.codes(), codes >> (top.bits - bits)):
                raise ValueError(f"{bits}-bit codes are not the top bits of the {top.bits}-bit codes")
            if top.sparse24 and not torch.equal(view.positions(), top.positions()):
                raise ValueError(f"{bits}-bit view has other 2:4 positions than the {top.bits}-bit view")

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.top.dequantize(dtype)

    def __getattr__(self, item):  # out_features, in_features, sparse24, group_size ... of the widest view
        if item == "views":
            raise AttributeError(item)
        return getattr(self.top, item)


RATIO_STEPS = 64  # int8 log2-ratio steps per octave of the narrower precisions' scales


def midrise_zero(bits: int) -> float:
    """The zero of the b-bit midrise grid: 2^(b−1) − ½ (exact in fp16)."""
    return (1 << (bits - 1)) - 0.5


def scale_ratio(scales: torch.Tensor, top: torch.Tensor, shift: int) -> torch.Tensor:
    """int8 r with scales ≈ 2^shift · top · 2^(r/RATIO_STEPS) (nearest, clamped to int8)."""
    ratio = scales.float() / (top.float() * (1 << shift))
    return torch.round(torch.log2(ratio.clamp_min(1e-30)) * RATIO_STEPS).clamp(-128, 127).to(torch.int8)


def ratio_scales(ratio: torch.Tensor, top: torch.Tensor, shift: int) -> torch.Tensor:
    """fp16 scales of a narrower precision from its int8 ratios (the one formula writer and reader use)."""
    scales = top.float() * (1 << shift) * torch.exp2(ratio.float() / RATIO_STEPS)
    return scales.to(torch.float16).clamp_min(torch.finfo(torch.float16).tiny)


def snapped(linear: AnyPrecisionLinear) -> AnyPrecisionLinear:
    """The linear with each narrower precision's scales rounded to what the artifact stores (int8 ratios)."""
    top = linear.top
    views = {}
    for bits, view in linear.views.items():
        if bits != top.bits:
            shift = top.bits - bits
            view = dataclasses.replace(view, scales=ratio_scales(scale_ratio(view.scales, top.scales, shift),
                                                                 top.scales, shift).contiguous())
        views[bits] = view
    return AnyPrecisionLinear(views)


def plane_names(bits: int) -> list[str]:
    return [f"plane{i}" for i in range(bits)]


def planes_of(codes: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """Codes [N, C] → `bits` uint8 streams: plane i holds bit (bits − 1 − i) of each code, LSB-first bytes."""
    flat = codes.reshape(-1).to(torch.int64).numpy()
    return [torch.from_numpy(np.packbits(((flat >> (bits - 1 - i)) & 1).astype(np.uint8), bitorder="little"))
            for i in range(bits)]


def codes_from_planes(planes: list[bytes], count: int) -> np.ndarray:
    """The top len(planes) planes → uint8 codes [count] of that many bits."""
    codes = np.zeros(count, dtype=np.uint8)
    for raw in planes:
        bitsv = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little", count=count)
        codes = (codes << np.uint8(1)) | bitsv
    return codes


def any_precision_streams(linear: AnyPrecisionLinear, pattern_stream) -> dict[str, torch.Tensor]:
    """The streams of an any-precision linear: patterns (2:4), plane0.., scales (widest), ratio{b} (others).

    The zeros are the midrise grid's (not stored); narrower scales are stored as int8 ratios (snapped())."""
    top = linear.top
    for bits, view in linear.views.items():
        if not torch.all(view.zeros.float() == midrise_zero(bits)):
            raise ValueError(f"any-precision {bits}-bit zeros must be the midrise {midrise_zero(bits)}")
    streams = {}
    if top.sparse24:
        streams["patterns"] = pattern_stream(top.positions())
    for name, plane in zip(plane_names(top.bits), planes_of(top.codes(), top.bits), strict=True):
        streams[name] = plane
    streams["scales"] = top.scales.to(torch.float16)
    for bits in linear.precisions[:-1]:
        streams[f"ratio{bits}"] = scale_ratio(linear.views[bits].scales, top.scales, top.bits - bits)
    return streams


def view_from_streams(entry: dict, streams: dict[str, bytes], precision: int, meta_of,
                      as_tensor) -> PackedLinear:
    """The `precision`-bit PackedLinear of an any-precision entry from its decoded streams."""
    n, k = entry["shape"]
    group, sparse = entry["group_size"], entry["sparse24"]
    n_codes = k // 2 if sparse else k
    codes = codes_from_planes([streams[p] for p in plane_names(entry["bits"])[:precision]], n * n_codes)
    qweight = pack_codes_np(codes.reshape(n, n_codes), precision)
    meta = meta_of(streams["patterns"], n, k) if sparse else None
    scales = as_tensor(streams["scales"], torch.float16, [n, k // group])
    if precision != entry["bits"]:
        ratio = as_tensor(streams[f"ratio{precision}"], torch.int8, [n, k // group])
        scales = ratio_scales(ratio, scales, entry["bits"] - precision)
    zeros = torch.full((n, k // group), midrise_zero(precision), dtype=torch.float16)
    return PackedLinear(n, k, precision, group, sparse, torch.from_numpy(qweight),
                        None if meta is None else torch.from_numpy(meta), scales, zeros)


def entry_precisions(entry: dict) -> list[int]:
    """The precisions a linear entry can be loaded at (its `precisions`, else just its `bits`)."""
    return list(entry.get("precisions") or [entry["bits"]])


def stored_precisions(manifest: dict) -> list[int]:
    """Precisions every linear of the artifact can be loaded at (empty when the linears share none)."""
    common: set[int] | None = None
    for entry in manifest["tensors"].values():
        if entry["kind"] == "linear":
            have = set(entry_precisions(entry))
            common = have if common is None else common & have
    return sorted(common or ())


def check_precision(manifest: dict, precision: int | None, where: str) -> None:
    """ArtifactError naming the stored precisions when `precision` is not one of them (None = as stored)."""
    if precision is None:
        return
    stored = stored_precisions(manifest)
    if precision not in stored:
        have = (", ".join(f"{b}-bit" for b in stored) if stored
                else "none (its tensors have different bit widths)")
        raise ArtifactError(f"{where}: cannot install at {precision}-bit; stored precisions: {have}")


def precision_sizes(manifest: dict) -> dict[int, int]:
    """Stored bytes of the artifact's tensors read at each stored precision (manifest and header excluded)."""
    out = {}
    for precision in stored_precisions(manifest):
        total = 0
        for entry in manifest["tensors"].values():
            for name, _, stored in entry["streams"]:
                if entry["kind"] == "linear" and "precisions" in entry and not _read_at(name, precision):
                    continue
                total += stored
        out[precision] = total
    return out


def _read_at(stream: str, precision: int) -> bool:
    """Whether loading at `precision` reads this stream of an any-precision linear."""
    if stream.startswith("plane"):
        return int(stream[5:]) < precision
    if stream.startswith("ratio"):
        return stream == f"ratio{precision}"
    return True
