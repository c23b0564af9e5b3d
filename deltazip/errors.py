"""User-facing errors: the CLI prints their message as one line and exits with code 2."""


class DeltazipError(Exception):
    """A problem with the user's input (file, flag, artifact, request), not a bug."""


class ConfigError(DeltazipError):
    """deltazip.toml is missing, unreadable, or has an unknown key or a wrong type."""


class ArtifactError(DeltazipError):
    """An artifact that is malformed, of an unknown format or version, or missing a file."""


class ChecksumError(ArtifactError):
    """A file of the artifact does not match the size or sha256 in its manifest."""


class FingerprintError(DeltazipError):
    """The artifact was made against a different base model."""


class RequestError(DeltazipError):
    """A request that can never run as given (unknown delta, bad parameters, prompt too long)."""


def shorten(value: object, limit: int = 64) -> str:
    """repr() of a value from a request, cut to `limit` characters: errors never echo megabytes back."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} chars)"
