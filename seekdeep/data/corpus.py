"""The embedded default corpus: the running Python's standard-library sources.

Present on every machine with Python, tens of MB of real code, and needs no download.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

# Vendored third-party code and test fixtures are left out (some fixtures are not UTF-8 or
# are deliberately broken source).
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "lib2to3"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None, limit_bytes: int | None = None) -> list[Path]:
    """Sorted ``*.py`` files of the standard library (deterministic across runs).

    ``limit_bytes`` keeps a prefix of the sorted list whose sizes add up to at most that
    many bytes (for quick jobs and tests)."""
    root = root or stdlib_root()
    files = sorted(
        p for p in root.rglob("*.py")
        if not (set(p.relative_to(root).parts[:-1]) & _EXCLUDED_DIRS) and p.is_file()
    )
    if limit_bytes is None:
        return files
    picked, total = [], 0
    for path in files:
        size = path.stat().st_size
        if total + size > limit_bytes:
            continue
        picked.append(path)
        total += size
    return picked
