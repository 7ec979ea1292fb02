"""Typed errors raised by seekdeep's public entry points.

Every error names the offending file, key or field and what would have been accepted, so a
user can fix the input without reading the source.
"""

from __future__ import annotations


class SeekdeepError(Exception):
    """Base class of every error seekdeep raises on bad input."""


class ConfigError(SeekdeepError, ValueError):
    """A configuration field is missing, malformed or out of range."""

    def __init__(self, field: str, message: str, *, source: str | None = None):
        self.field = field
        self.source = source
        where = f" in {source}" if source else ""
        super().__init__(f"{field}{where}: {message}")


class UnknownArchitectureError(ConfigError):
    """config.json names a model_type / architecture seekdeep does not implement."""


class UnknownBackendError(ConfigError):
    """An attention backend name that is not in the registry."""


class CheckpointError(SeekdeepError, OSError):
    """A model directory, weight file or shard is missing, unreadable or inconsistent."""


class ModelNotFoundError(CheckpointError):
    """Neither a local directory nor a reachable hub repository matches the given id."""


class GenerationError(SeekdeepError, ValueError):
    """A sampling / generation parameter is out of range."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class DataError(SeekdeepError, ValueError):
    """Training data is missing, empty, binary or malformed; names the path (and line)."""

    def __init__(self, path: str, message: str, *, line: int | None = None):
        self.path = str(path)
        self.line = line
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
