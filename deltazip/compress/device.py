"""`--device auto|cpu|cuda[:N]` for compress and eval: one parser, one clear error when CUDA is missing.

CPU is the tested path. CUDA runs the same code (calibration forwards, Hessians, OBS, scale tuning on the
device; weights still streamed from disk one block at a time) but is unverified until a GPU run confirms
it (tests/gpu).
"""

from __future__ import annotations

import re

import torch

from deltazip.errors import DeltazipError

DEVICE_CHOICES = "auto | cpu | cuda | cuda:N"
_CUDA = re.compile(r"^cuda(?::(\d+))?$")


def check_device_spec(spec: str) -> str:
    """The spec normalised (lower case, stripped) if it is well formed; no CUDA check."""
    value = (spec or "auto").strip().lower()
    if value in ("auto", "cpu") or _CUDA.match(value):
        return value
    raise DeltazipError(f"--device must be {DEVICE_CHOICES}, not {spec!r}")


def resolve_device(spec: str) -> torch.device:
    """auto → cuda:0 when CUDA is available, else cpu; cuda[:N] → that GPU, or an error naming why not."""
    value = check_device_spec(spec)
    if value == "cpu":
        return torch.device("cpu")
    if value == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise DeltazipError(f"--device {value}: CUDA is not available ({why}); use --device cpu or auto")
    index = int(_CUDA.match(value).group(1) or 0)
    if index >= torch.cuda.device_count():
        raise DeltazipError(f"--device {value}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return torch.device("cuda", index)
