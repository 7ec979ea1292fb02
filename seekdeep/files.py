"""File plumbing shared by every piece that reads or writes artefacts: atomic writes,
JSON reading with typed errors, and resolving a local directory or a hub id."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from seekdeep.errors import CheckpointError, ConfigError, ModelNotFoundError


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, fsync the temp file and rename it over ``path``, so a crash
    never leaves a half-written file behind."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def write_json_atomic(path: str | os.PathLike, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def read_json(path: Path, optional: bool = False) -> dict[str, Any]:
    """A JSON object file; a missing file is a CheckpointError unless ``optional`` ({})."""
    if not path.is_file():
        if optional:
            return {}
        raise CheckpointError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(path.name, f"malformed JSON ({exc})", source=str(path)) from exc
    if not isinstance(data, dict):
        raise ConfigError(path.name, f"must hold a JSON object, got {type(data).__name__}", source=str(path))
    return data


def is_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and not Path(text).exists()


def resolve_model_dir(path_or_id: str | os.PathLike, allow_patterns: list[str], required_file: str) -> Path:
    """A local directory as is; otherwise a hub id fetched through huggingface_hub's cache
    (cache first, then a download when a network exists)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_id)
    if path.exists():
        raise CheckpointError(f"{text}: is a file; expected a directory holding {required_file}")
    if not is_hub_id(text):
        raise ModelNotFoundError(f"{text}: no such directory (and not a hub id of the form 'org/name')")
    from huggingface_hub import snapshot_download

    try:
        cached = Path(snapshot_download(text, allow_patterns=allow_patterns, local_files_only=True))
        if (cached / required_file).is_file():
            return cached
    except Exception:  # not cached: fall through to a download
        pass
    try:
        return Path(snapshot_download(text, allow_patterns=allow_patterns))
    except Exception as exc:  # offline, unknown repo, gated repo...
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelNotFoundError(
            f"{text}: not a local directory, not in the Hugging Face cache, and the hub download failed "
            f"({type(exc).__name__}: {first_line})"
        ) from exc


def check_model_path(field: str, value: str | os.PathLike | None) -> None:
    """A config's model argument, checked before any work starts: a local directory holding
    config.json, or a hub id of the form ``org/name`` (resolved when the model loads)."""
    if value is None:
        return
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ConfigError(field, f"expected a model directory or a hub id 'org/name', got {value!r}")
    path = Path(value).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(field, f"{path} holds no config.json; accepted: a model directory in the Hugging Face "
                              "layout (config.json + *.safetensors) or a hub id 'org/name'")
        return
    if path.exists():
        raise ConfigError(field, f"{path} is a file; accepted: a model directory (config.json + *.safetensors) "
                          "or a hub id 'org/name'")
    if path.is_symlink():
        raise ConfigError(field, f"{path} is a broken symbolic link; accepted: a model directory or a hub id")
    if not is_hub_id(str(value)):
        raise ConfigError(field, f"{path}: no such directory; accepted: a model directory (config.json + "
                          "*.safetensors) or a hub id 'org/name'")


def check_data_path(field: str, value: str | os.PathLike | None) -> None:
    """A config's data argument, checked before any work starts: an existing, readable text
    file, .jsonl file or folder (the documents themselves are checked when they are read)."""
    if value is None:
        return
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ConfigError(field, f"expected a path (text file, .jsonl file or folder), got {value!r}")
    path = Path(value).expanduser()
    if path.is_symlink() and not path.exists():
        raise ConfigError(field, f"{path} is a broken symbolic link; accepted: a text file, .jsonl file or folder")
    if not path.exists():
        raise ConfigError(field, f"{path}: no such file or folder; accepted: a text file, .jsonl file or folder")
    if path.is_dir():
        if not os.access(path, os.R_OK | os.X_OK):
            raise ConfigError(field, f"{path}: folder cannot be read (permissions)")
        return
    if not path.is_file():
        raise ConfigError(field, f"{path} is neither a regular file nor a folder (a device or pipe?); accepted: a "
                          "text file, .jsonl file or folder")
    try:
        with open(path, "rb") as f:
            head = f.read(8192)
    except OSError as exc:
        raise ConfigError(field, f"{path} cannot be read ({exc.strerror or exc})") from exc
    if b"\0" in head:
        raise ConfigError(field, f"{path} is a binary file (NUL bytes); accepted: UTF-8 text, .jsonl or a folder")
