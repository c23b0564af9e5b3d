"""User-facing errors: the CLI prints their message as one line and exits with code 2."""


class DeltazipError(Exception):
    """A problem with the user's input (file, flag, artifact, request), not a bug."""


class ConfigError(DeltazipError):
    """deltazip.toml is missing, unreadable, or has an unknown key or a wrong type."""
