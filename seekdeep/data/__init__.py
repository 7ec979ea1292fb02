"""Data: the embedded default corpus (the running Python's standard library sources)."""

from seekdeep.data.corpus import stdlib_files

__all__ = ["stdlib_files"]
