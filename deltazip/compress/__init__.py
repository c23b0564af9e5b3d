"""Delta compression: extraction, OBS solver (joint 2:4 prune + quantize), packing into the artifact."""

from deltazip.compress.pipeline import compress_model

__all__ = ["compress_model"]
