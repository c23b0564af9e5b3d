"""The torch runtime: Llama executor, delta layers, delta pool, continuous-batching engine.

Names are imported on first use, so `from deltazip.runtime import RequestError` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Engine": "deltazip.runtime.engine",
    "RequestHandle": "deltazip.runtime.engine",
    "SamplingParams": "deltazip.runtime.sampling",
    "GenerationRequest": "deltazip.runtime.sampling",
    "GenerationResult": "deltazip.runtime.sampling",
    "RequestError": "deltazip.runtime.pool",
    "DeltaPool": "deltazip.runtime.pool",
    "load_llama": "deltazip.runtime.model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'deltazip.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
