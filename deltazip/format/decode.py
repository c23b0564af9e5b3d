"""The swap-in decode (issue 10): one stored tensor straight into the layout a device slot holds.

Each stream is inflated (zstd) directly into its final tensor where the stored bytes already are that
layout (`scales`, `zeros`, whole-word `codes`, exact tensors), and the 2-bit 2:4 `nibbles` stream into a
per-thread scratch buffer that one pass turns into the qweight and meta words: native code where
deltazip.kernels.native registered it (NATIVE), else the numpy transform of codec.py — identical bytes.
No dense or unpacked intermediate; zstd and the native pass release the GIL, so the loader runs one tensor
per thread in parallel. Rarer layouts (version 1 `groups`, version 5 log scales, any-precision bitplanes)
go through codec.decode_tensor, the reference decode this one is tested against.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import torch

from deltazip.errors import ArtifactError
from deltazip.format import codec
from deltazip.format.codec import DTYPES, decode_tensor
from deltazip.packed import PackedLinear, codes_per_word

# name → native implementation, filled by deltazip.kernels.native once its library is loaded:
# "nibbles_to_words"(stream uint8 [N*K/4], qweight int32 [N, K/32], meta int32 [N, K/32]) -> 1 if valid 2:4
NATIVE: dict[str, Callable] = {}
_FAST_LINEAR = ({"nibbles", "scales", "zeros"}, {"codes", "scales", "zeros"},
                {"codes", "patterns", "scales", "zeros"})
_THREAD = threading.local()
SMALL_STREAM = 1 << 16


Shapes = dict[str, tuple[list[int], torch.dtype]]


def output_shapes(entry: dict, precision: int | None = None) -> Shapes | None:
    """The tensors decode_into_slot_layout fills for a (validated) entry, by key; None when the entry takes
    the reference decode (which allocates its own)."""
    names = {s[0] for s in entry["streams"]}
    if entry["kind"] == "exact":
        dtype = DTYPES.get(entry.get("dtype"))
        return {"delta": (list(entry["shape"]), dtype)} if names == {"delta"} and dtype else None
    if ("precisions" in entry or names not in _FAST_LINEAR or precision not in (None, entry["bits"])
            or (entry["sparse24"] and entry["shape"][1] % 32)):
        return None
    n, k = entry["shape"]
    bits, group, sparse = entry["bits"], entry["group_size"], entry["sparse24"]
    n_codes = k // 2 if sparse else k
    out = {"qweight": ([n, -(-n_codes // codes_per_word(bits))], torch.int32)}
    if sparse:
        out["meta"] = ([n, k // 32], torch.int32)
    out["scales"] = out["zeros"] = ([n, k // group], torch.float16)
    return out


def decode_into_slot_layout(blob: memoryview | bytes, entry: dict, name: str, precision: int | None = None,
                            out: dict[str, torch.Tensor] | None = None) -> PackedLinear | torch.Tensor:
    """One tensor from its stored blob and (validated) manifest entry, as codec.decode_tensor returns it.

    `out`: the tensors of output_shapes(entry, precision), uninitialised (an Arena's), filled here; None:
    allocated here (or the reference decode, where output_shapes is None).
    """
    if out is None:
        shapes = output_shapes(entry, precision)
        if shapes is None:
            return decode_tensor(blob, entry, name, precision)
        out = {key: torch.empty(shape, dtype=dtype) for key, (shape, dtype) in shapes.items()}
    if entry["kind"] == "exact":
        _inflate_all(blob, entry, name, {"delta": _bytes(out["delta"])})
        return out["delta"]
    n, k = entry["shape"]
    bits, group, sparse = entry["bits"], entry["group_size"], entry["sparse24"]
    n_codes = k // 2 if sparse else k
    try:
        targets = {"scales": _bytes(out["scales"]), "zeros": _bytes(out["zeros"])}
        names = {s[0] for s in entry["streams"]}
        if "codes" in names and bits != 3 and n_codes % codes_per_word(bits) == 0:
            targets["codes"] = _bytes(out["qweight"])  # rows fill whole words: the stream is the words' bytes
        streams = _inflate_all(blob, entry, name, targets)
        if "nibbles" in names:
            _nibbles_to_words(streams["nibbles"], n, k, out["qweight"], out["meta"])
        else:
            if "codes" not in targets:
                words = codec._codes_to_words(streams["codes"], bits, n, n_codes)
                out["qweight"].copy_(torch.from_numpy(words))
            if sparse:
                out["meta"].copy_(torch.from_numpy(codec._patterns_to_meta(streams["patterns"], n, k)))
        return PackedLinear(n, k, bits, group, sparse, out["qweight"], out.get("meta"), out["scales"],
                            out["zeros"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise ArtifactError(f"tensor {name}: streams do not fit its shape ({e})") from None


def _bytes(t: torch.Tensor) -> np.ndarray:
    """A new tensor's storage as a writable uint8 array (the stream's bytes land there)."""
    return t.numpy().reshape(-1).view(np.uint8) if t.numel() else np.empty(0, dtype=np.uint8)


def _scratch(size: int) -> np.ndarray:
    """This thread's reusable buffer of at least `size` bytes (its pages stay mapped and warm in cache)."""
    buf = getattr(_THREAD, "scratch", None)
    if buf is None or buf.size < size:
        buf = _THREAD.scratch = np.empty(max(size, 1 << 16), dtype=np.uint8)
    return buf[:size]


def _inflate_all(blob: memoryview | bytes, entry: dict, where: str,
                 targets: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inflate every stream of the blob: into targets[name] where given, the `nibbles` stream into this
    thread's scratch, others into new arrays; sizes checked against the manifest as codec._decode_streams."""
    out, offset, view = {}, 0, memoryview(blob)
    for stream, raw_bytes, stored_bytes in entry["streams"]:
        stored = view[offset:offset + stored_bytes]
        offset += stored_bytes
        target = targets.get(stream)
        if target is None:
            target = _scratch(raw_bytes) if stream == "nibbles" else np.empty(raw_bytes, dtype=np.uint8)
        elif target.size != raw_bytes:
            raise ArtifactError(f"{where}.{stream}: {raw_bytes} raw bytes, its shape needs {target.size}")
        _inflate(stored, entry["encoding"], target, f"{where}.{stream}")
        out[stream] = target
    if offset != len(view):
        raise ArtifactError(f"{where}: streams total {offset} bytes but the stored blob has {len(view)}")
    return out


def _inflate(stored: memoryview, encoding: str, target: np.ndarray, where: str) -> None:
    """One stored stream into `target` (exactly target.size bytes, or an ArtifactError)."""
    if encoding == "raw" or (encoding == "zstd" and not len(stored)):
        if len(stored) != target.size:
            raise ArtifactError(f"{where}: decoded {len(stored)} bytes, manifest says {target.size}")
        target[:] = np.frombuffer(stored, dtype=np.uint8)
        return
    if encoding != "zstd":
        raise ArtifactError(f"{where}: unknown stream encoding {encoding!r}")
    import zstandard

    if target.size <= SMALL_STREAM:  # one call (a stream reader costs more than a small frame's decode)
        try:
            declared = zstandard.frame_content_size(stored)  # -1: not in the header
            if declared not in (-1, target.size):  # refused before decompress would allocate it
                raise ArtifactError(f"{where}: decoded {declared} bytes, manifest says {target.size}")
            data = codec._zstd_decompressor().decompress(stored, max_output_size=target.size,
                                                         allow_extra_data=False)
        except zstandard.ZstdError as e:
            raise ArtifactError(f"{where}: cannot decode zstd stream: {e}") from None
        if len(data) != target.size:
            raise ArtifactError(f"{where}: decoded {len(data)} bytes, manifest says {target.size}")
        target[:] = np.frombuffer(data, dtype=np.uint8)
        return
    try:
        reader = codec._zstd_decompressor().stream_reader(stored, read_across_frames=False)
        got = reader.readinto(target) if target.size else 0
        extra = reader.read(1)  # a frame that holds more than the manifest says
    except zstandard.ZstdError as e:
        raise ArtifactError(f"{where}: cannot decode zstd stream: {e}") from None
    if got != target.size or extra:
        raise ArtifactError(f"{where}: decoded {got + len(extra)}{'+' if extra else ''} bytes, manifest "
                            f"says {target.size}")


def _nibbles_to_words(stream: np.ndarray, n: int, k: int, qweight: torch.Tensor, meta: torch.Tensor) -> None:
    """The `nibbles` stream → qweight and meta int32 [N, K/32] (filled): native if registered, else numpy."""
    if stream.size != n * k // 4:
        raise ValueError(f"nibbles stream has {stream.size} bytes, expected {n * k // 4}")
    native = NATIVE.get("nibbles_to_words")
    if native is None:
        words = codec._nibbles_stream_to_words(stream, n, k)
        qweight.copy_(torch.from_numpy(words[0]))
        meta.copy_(torch.from_numpy(words[1]))
    elif not native(torch.from_numpy(stream), qweight, meta):
        raise ValueError("invalid 2:4 positions (need two distinct ascending positions per group)")


__all__ = ["NATIVE", "decode_into_slot_layout", "output_shapes"]
