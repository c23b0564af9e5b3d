"""The delta artifact NAME.dz/ (spec: docs/FORMAT.md): manifest, stream codec, payload reader, merge/apply."""

from deltazip.errors import ArtifactError, ChecksumError, FingerprintError
from deltazip.format.artifact import DeltaArtifact, load_delta, save_delta
from deltazip.format.manifest import fingerprint_model, read_manifest, verify_files
from deltazip.format.merge import apply_delta, decompress, merge_tensor

__all__ = ["ArtifactError", "ChecksumError", "DeltaArtifact", "FingerprintError", "apply_delta", "decompress",
           "fingerprint_model", "load_delta", "merge_tensor", "read_manifest", "save_delta", "verify_files"]
