"""The embedded default corpus: the running Python's standard-library sources.

Present on every machine with Python, tens of MB of real code, and needs no download.
Also the reader of user data (text files, folders, JSONL) that streams documents.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import sys
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from seekdeep.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

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
    files = sorted(_python_files(root, root))
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


# -- the default split ----------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusSplit:
    """Files of a corpus split into training and held-out sides.

    ``fingerprint`` is a short hash of the file list, the sizes, the side of each file and the
    Python version: equal fingerprints mean equal data, so caches key on it."""

    root: Path
    train_files: list[Path]
    heldout_files: list[Path]
    fingerprint: str


def split_files(files: Iterable[str | os.PathLike], root: str | os.PathLike,
                heldout_fraction: float = 0.02) -> tuple[list[Path], list[Path]]:
    """Split ``files`` (all under ``root``) into ``(train, heldout)``, each sorted.

    Whole top-level packages and modules go to one side (modules within one package when
    everything is in a single package). Units are visited in the order of a SHA-256 of their
    dotted name, not Python's salted ``hash``, and added to the held-out side while its bytes
    stay within ``heldout_fraction`` of the total: the split is the same on every run and every
    machine with the same files. When no unit is that small the smallest unit is held out."""
    if isinstance(heldout_fraction, bool) or not isinstance(heldout_fraction, (int, float)) \
            or not 0 <= heldout_fraction < 1:
        raise ConfigError("heldout_fraction", f"must be a number in [0, 1), got {heldout_fraction!r}")
    root = Path(root)
    relative = {}
    for file in sorted({Path(f) for f in files}):
        try:
            relative[file] = file.relative_to(root).parts
        except ValueError:
            raise ConfigError("files", f"{file} is not under the corpus root {root}") from None
    unit_of = {file: _unit_name(parts, package_level=True) for file, parts in relative.items()}
    if len(set(unit_of.values())) < 2:
        unit_of = {file: _unit_name(parts, package_level=False) for file, parts in relative.items()}
    unit_bytes: dict[str, int] = {}
    for file, unit in unit_of.items():
        unit_bytes[unit] = unit_bytes.get(unit, 0) + file.stat().st_size

    held: set[str] = set()
    if heldout_fraction > 0 and len(unit_bytes) >= 2:
        budget = heldout_fraction * sum(unit_bytes.values())
        held_bytes = 0
        for unit in sorted(unit_bytes, key=_unit_rank):
            if held_bytes + unit_bytes[unit] <= budget:
                held.add(unit)
                held_bytes += unit_bytes[unit]
        if not held:
            held.add(min(unit_bytes, key=lambda u: (unit_bytes[u], _unit_rank(u))))
    train = [f for f, unit in unit_of.items() if unit not in held]
    heldout = [f for f, unit in unit_of.items() if unit in held]
    return train, heldout


def default_corpus(heldout_fraction: float = 0.02, limit_bytes: int | None = None) -> CorpusSplit:
    """The standard library's sources split into training and held-out modules.

    limit_bytes: use only a prefix of the sorted files (see ``stdlib_files``), for quick jobs."""
    root = stdlib_root()
    train, heldout = split_files(stdlib_files(root, limit_bytes), root, heldout_fraction)
    if not train:
        raise DataError(str(root), "no standard-library sources found (is limit_bytes too small?)")
    return CorpusSplit(root, train, heldout, _split_fingerprint(root, train, heldout))


def package_files(package_name: str, root: Path | None = None) -> list[Path]:
    """The corpus files of one standard-library package (``"json"``, ``"email.mime"``) or
    module (``"textwrap"``), sorted. Excluded folders (tests, idlelib, ...) are not packages
    of the corpus."""
    root = root or stdlib_root()
    parts = package_name.split(".") if isinstance(package_name, str) else []
    if not parts or not all(p.isidentifier() for p in parts):
        raise ConfigError("package_name", f"expected a dotted module name such as 'json' or "
                          f"'email.mime', got {package_name!r}")
    package_dir = root.joinpath(*parts)
    module_file = root.joinpath(*parts[:-1], parts[-1] + ".py")
    if package_dir.is_dir():
        files = sorted(_python_files(root, package_dir))
    elif module_file.is_file():
        files = [module_file] if not set(parts[:-1]) & _EXCLUDED_DIRS else []
    else:
        raise ConfigError("package_name", f"{package_name!r} is not a standard-library package "
                          f"or module under {root}")
    if not files:
        raise ConfigError("package_name", f"{package_name!r} is excluded from the corpus "
                          f"(folders {sorted(_EXCLUDED_DIRS)} are left out)")
    return files


def _python_files(root: Path, top: Path) -> list[Path]:
    # os.walk prunes the excluded folders instead of listing them (test/ alone is ~40% of files).
    found = []
    for dirpath, dirnames, filenames in os.walk(top):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
        if set(here.relative_to(root).parts) & _EXCLUDED_DIRS:
            continue
        found.extend(here / name for name in filenames if name.endswith(".py") and (here / name).is_file())
    return found


def _unit_name(parts: tuple[str, ...], package_level: bool) -> str:
    names = [*parts[:-1], Path(parts[-1]).stem]
    return names[0] if package_level else ".".join(names)


def _unit_rank(unit: str) -> str:
    return hashlib.sha256(f"seekdeep-heldout:{unit}".encode()).hexdigest()


def _split_fingerprint(root: Path, train: list[Path], heldout: list[Path]) -> str:
    # The root path is left out so the same Python installed elsewhere gives the same value.
    def listing(files: list[Path]) -> list[list[Any]]:
        return [[f.relative_to(root).as_posix(), f.stat().st_size] for f in files]

    data = {"python": [platform.python_implementation(), *sys.version_info[:3]],
            "train": listing(train), "heldout": listing(heldout)}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# -- user data ------------------------------------------------------------------------------


@dataclass
class DocumentStats:
    """What ``iter_documents`` saw; updated while it is consumed.

    skipped: ``(path, reason)`` of files inside folders left out (reason ``"binary"``,
    ``"not utf-8"`` or ``"hidden"``); explicitly named files are never skipped."""

    documents: int = 0
    characters: int = 0
    empty: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


Source = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


def iter_documents(source: Source, stats: DocumentStats | None = None) -> Iterator[str]:
    """Stream the documents of ``source`` one at a time.

    source: a text file (one document), a ``.jsonl`` file (one JSON object per line with a
    string ``text`` field, read line by line), a folder (its files recursively in sorted order,
    ``.jsonl`` files parsed as JSONL, hidden entries and binary files skipped and recorded in
    ``stats``), or a list of these. Empty and whitespace-only documents are counted in
    ``stats.empty`` and not yielded.

    Paths are checked when this is called; contents while iterating. Raises DataError for a
    missing path, an explicitly named binary or non-UTF-8 file, a bad JSONL line (with its
    number) and a source with no documents at all."""
    entries = _source_entries(source)
    return _generate_documents(entries, stats if stats is not None else DocumentStats())


def source_fingerprint(source: Source) -> str:
    """A short hash of the files ``source`` names (paths, sizes, modification times): it
    changes when any of them is added, removed or edited."""
    listing = []
    for entry in _source_entries(source):
        files = _folder_files(entry, DocumentStats()) if entry.is_dir() else [entry]
        for file in files:
            st = file.stat()
            listing.append([str(file.resolve()), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


def _source_entries(source: Source) -> list[Path]:
    if isinstance(source, (str, os.PathLike)):
        items = [source]
    elif isinstance(source, (list, tuple)):
        items = list(source)
        if not items:
            raise ConfigError("source", "is an empty list; give at least one file or folder")
    else:
        raise ConfigError("source", "expected a path (text file, .jsonl file or folder) or a list "
                          f"of paths, got {type(source).__name__}")
    entries = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise ConfigError("source", f"list items must be paths, got {item!r:.100}")
        path = Path(item).expanduser()
        if not path.exists():
            raise DataError(str(path), "no such file or folder")
        if not (path.is_file() or path.is_dir()):
            raise DataError(str(path), "is neither a regular file nor a folder")
        entries.append(path)
    return entries


def _generate_documents(entries: list[Path], stats: DocumentStats) -> Iterator[str]:
    yielded = 0
    empty_before, skipped_before = stats.empty, len(stats.skipped)
    for entry in entries:
        if entry.is_dir():
            for file in _folder_files(entry, stats):
                for text in _file_documents(file, stats, in_folder=True):
                    yielded += 1
                    yield text
        else:
            for text in _file_documents(entry, stats, in_folder=False):
                yielded += 1
                yield text
    if not yielded:
        where = str(entries[0]) if len(entries) == 1 else f"{len(entries)} paths ({entries[0]}, ...)"
        raise DataError(where, f"no documents: {stats.empty - empty_before} empty, "
                        f"{len(stats.skipped) - skipped_before} files skipped (binary, not UTF-8 or "
                        "hidden); expected text files, folders of them or .jsonl with 'text' fields")


def _folder_files(folder: Path, stats: DocumentStats) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        for name in [d for d in dirnames if d.startswith(".")]:
            stats.skipped.append((str(here / name), "hidden"))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                stats.skipped.append((str(here / name), "hidden"))
            elif (here / name).is_file():
                files.append(here / name)
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def _file_documents(path: Path, stats: DocumentStats, in_folder: bool) -> Iterator[str]:
    if path.suffix.lower() == ".jsonl":
        yield from _jsonl_documents(path, stats)
        return
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(str(path), f"cannot be read ({exc.strerror or exc})") from exc
    problem = "binary" if b"\0" in data else None
    if problem is None:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            problem = f"not utf-8 (bad byte at offset {exc.start})"
    if problem is not None:
        if not in_folder:
            raise DataError(str(path), f"is {'a binary file (NUL bytes)' if problem == 'binary' else problem}; "
                            "expected UTF-8 text")
        stats.skipped.append((str(path), problem))
        logger.warning("skipping %s: %s", path, problem)
        return
    if _count(text, stats):
        yield text


def _jsonl_documents(path: Path, stats: DocumentStats) -> Iterator[str]:
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise DataError(str(path), f"cannot be read ({exc.strerror or exc})") from exc
    with f:
        for line_number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8-sig" if line_number == 1 else "utf-8"))
            except UnicodeDecodeError as exc:
                raise DataError(str(path), f"not UTF-8 (bad byte at column {exc.start + 1})",
                                line=line_number) from exc
            except json.JSONDecodeError as exc:
                raise DataError(str(path), f"not valid JSON ({exc.msg}, column {exc.colno})",
                                line=line_number) from exc
            if not isinstance(record, dict):
                raise DataError(str(path), "expected a JSON object with a string 'text' field, got "
                                f"{type(record).__name__}", line=line_number)
            text = record.get("text")
            if not isinstance(text, str):
                got = "no 'text' key" if "text" not in record else f"'text' is {type(text).__name__}"
                raise DataError(str(path), f"expected a string 'text' field, {got} "
                                f"(keys: {sorted(record)[:10]})", line=line_number)
            if _count(text, stats):
                yield text


def _count(text: str, stats: DocumentStats) -> bool:
    if not text.strip():
        stats.empty += 1
        return False
    stats.documents += 1
    stats.characters += len(text)
    return True
