"""Any-precision linears (docs/FORMAT.md, "Any-precision linears"): nested codes stored as bitplanes.

An any-precision linear stores its widest codes (`bits` B) as B bitplanes, most significant first; the top b
planes are the codes of a valid b-bit delta, with that precision's own `scales{b}` and `zeros{b}`. Loading
at precision b reads the 2:4 patterns, planes 0..b−1 and the b-bit scales/zeros into an ordinary b-bit
`PackedLinear`: the kernels see nothing new.
"""

from __future__ import annotations

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
    """The streams of an any-precision linear: patterns (2:4), plane0.., then scales{b}/zeros{b} per b."""
    top = linear.top
    streams = {}
    if top.sparse24:
        streams["patterns"] = pattern_stream(top.positions())
    for name, plane in zip(plane_names(top.bits), planes_of(top.codes(), top.bits), strict=True):
        streams[name] = plane
    for bits in linear.precisions:
        streams[f"scales{bits}"] = linear.views[bits].scales.to(torch.float16)
        streams[f"zeros{bits}"] = linear.views[bits].zeros.to(torch.float16)
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
    scales = as_tensor(streams[f"scales{precision}"], torch.float16, [n, k // group])
    zeros = as_tensor(streams[f"zeros{precision}"], torch.float16, [n, k // group])
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
    if stream.startswith(("scales", "zeros")):
        return stream in (f"scales{precision}", f"zeros{precision}")
    return True
