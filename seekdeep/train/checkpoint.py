"""Crash-safe training checkpoints.

Layout of ``run_dir/checkpoint-<step:08d>/``:

- the model in the Hugging Face layout (``model.save_pretrained``: config.json +
  safetensors), so ``seekdeep.AutoModel.from_pretrained`` opens it directly;
- ``training_state.pt``: optimizer, scheduler and scaler state dicts, the python / numpy /
  torch (and CUDA) RNG states, the step, the data-loader state and ``extra``; readable with
  ``torch.load(weights_only=True)``;
- ``manifest.json``, written last: byte size and sha256 of every other file.

A checkpoint is written into ``run_dir/.checkpoint-<step>.tmp-<pid>/`` and renamed into place
only once complete and fsynced, so a crash leaves at most a hidden temp directory, which the
next save removes. A directory without a manifest is never a checkpoint, and loading checks
every file against the manifest before reading anything.

Only one process may save into a run directory (rank 0 under torchrun).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seekdeep.errors import CheckpointError, ConfigError
from seekdeep.files import atomic_write, read_json, write_json_atomic

MANIFEST_NAME = "manifest.json"
TRAINING_STATE_NAME = "training_state.pt"
FORMAT = "seekdeep-checkpoint"
FORMAT_VERSION = 1
_CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
_TEMP_RE = re.compile(r"\.checkpoint-\d+\.(tmp|old)-\d+")


@dataclass
class TrainingState:
    """What :func:`load_checkpoint` hands back besides the restored objects."""

    step: int
    data_state: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


# -- discovery


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}"


def _step_of(path: Path) -> int | None:
    m = _CHECKPOINT_RE.fullmatch(path.name)
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (named ``checkpoint-<step>`` and holding a manifest) in
    ``run_dir``, oldest step first. Content is not verified here; :func:`load_checkpoint`
    does that."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [
        (step, p) for p in run_dir.iterdir()
        if (step := _step_of(p)) is not None and p.is_dir() and (p / MANIFEST_NAME).is_file()
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step in ``run_dir``, or None when there is
    none (or ``run_dir`` does not exist). Temp directories and directories without a
    manifest are skipped."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: is a file; expected a run directory holding checkpoint-<step>/ directories")
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


# -- saving


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms that cannot open a directory (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _hash_and_sync(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
        os.fsync(f.fileno())
    return size, digest.hexdigest()


def _rng_state() -> dict[str, Any]:
    import numpy as np

    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        # numpy arrays are not on torch.load's weights_only allow-list: the key goes as a tensor.
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": np_state["bit_generator"],
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda_states = state["cuda"]
        for device, rng in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(rng, device)


def _loads_weights_only(obj: Any) -> bool:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    try:
        torch.load(buf, weights_only=True)
    except Exception:
        return False
    return True


def _encode_user_entry(name: str, value: dict[str, Any] | None, state: dict[str, Any]) -> None:
    """Store ``value`` as is when ``torch.load(weights_only=True)`` reads it back, else as JSON
    text; anything neither can hold is refused rather than pickled."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(name, f"must be a dict, got {type(value).__name__}")
    if _loads_weights_only(value):
        state[name] = value
        return
    try:
        state[name + "_json"] = json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            name,
            f"cannot be stored safely ({exc}); accepted: tensors, numbers, strings, bools, None and "
            "lists / tuples / dicts of them",
        ) from exc


def _clean_stale(run_dir: Path) -> None:
    for p in run_dir.iterdir():
        if _TEMP_RE.fullmatch(p.name) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _save_model(model: nn.Module, directory: Path) -> None:
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(directory)
    else:  # a plain nn.Module: one safetensors file (save_model handles tied tensors)
        from safetensors.torch import save_model

        atomic_write(directory / "model.safetensors", lambda tmp: save_model(model, tmp))


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: Any = None,
    scheduler: Any = None,
    scaler: Any = None,
    data_state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    keep_last: int | None = 3,
) -> Path:
    """Write ``run_dir/checkpoint-<step:08d>/`` atomically and return its path.

    ``optimizer`` / ``scheduler`` / ``scaler``: anything with ``state_dict()`` (or None).
    ``data_state``: the data pipeline's resume position; ``extra``: anything else the recipe
    wants back (config, metrics). ``keep_last``: how many complete checkpoints to keep (None
    keeps all); the one just written is never removed. Saving a step that already has a
    checkpoint replaces it.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ConfigError("step", f"must be an int >= 0, got {step!r}")
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ConfigError("keep_last", f"must be an int >= 1 or None (keep all), got {keep_last!r}")
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None and not callable(getattr(obj, "state_dict", None)):
            raise ConfigError(name, f"{type(obj).__name__} has no state_dict(); pass None or an object with one")

    state: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "step": step,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": _rng_state(),
    }
    _encode_user_entry("data_state", data_state, state)
    _encode_user_entry("extra", extra, state)

    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: is a file; expected a run directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    _clean_stale(run_dir)
    final = run_dir / checkpoint_name(step)
    tmp = run_dir / f".{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        _save_model(model, tmp)
        atomic_write(tmp / TRAINING_STATE_NAME, lambda path: torch.save(state, path))
        files = {}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            size, digest = _hash_and_sync(path)
            files[path.relative_to(tmp).as_posix()] = {"bytes": size, "sha256": digest}
        write_json_atomic(tmp / MANIFEST_NAME, {"format": FORMAT, "version": FORMAT_VERSION, "step": step, "files": files})
        _fsync_dir(tmp)
        old = None
        if final.exists():
            old = run_dir / f".{final.name}.old-{os.getpid()}"
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if keep_last is not None:
        _prune(run_dir, keep_last, keep=final)
    return final


def _prune(run_dir: Path, keep_last: int, keep: Path) -> None:
    others = [p for p in list_checkpoints(run_dir) if p != keep]
    for path in others[: max(0, len(others) - (keep_last - 1))]:
        # Rename first: a crash during rmtree leaves a hidden directory, not a checkpoint
        # with missing files.
        doomed = run_dir / f".{path.name}.old-{os.getpid()}"
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


# -- loading


def resume_checkpoint(resume: str | None, run_dir: str | os.PathLike) -> Path | None:
    """What a recipe's ``resume`` setting points at: None -> None (start fresh); ``"auto"`` ->
    the latest complete checkpoint in ``run_dir`` (None, with a note on stderr, when there is
    none yet); anything else -> :func:`resolve_checkpoint` of it (an error when it is not one)."""
    if resume is None:
        return None
    if resume != "auto":
        return resolve_checkpoint(resume)
    path = latest_checkpoint(run_dir)
    if path is None:
        print(f"no checkpoint in {run_dir}; starting from scratch", file=sys.stderr)
    return path


#: what a resumed run may take from the command line instead of the checkpoint: the budget, where
#: it writes, how it shows progress and where it runs; everything else is the run's identity
RUN_FIELDS = ("steps", "max_time", "resume", "output_dir", "progress", "device")


def resumed_config(checkpoint: Path, current: Any, *, command: str, marker: str | None = None,
                   keep: tuple[str, ...] = RUN_FIELDS, saved: dict[str, Any] | None = None) -> Any:
    """The config a resumed ``seekdeep <command>`` run continues with: the run's identity from the
    config saved in ``checkpoint`` (``saved`` when the caller read it already), only the ``keep``
    fields from ``current`` (a config dataclass), never ``overwrite``. ``marker`` is a field only
    this recipe's configs have, so another recipe's checkpoint is refused by name."""
    if saved is None:
        saved = load_checkpoint(checkpoint, restore_rng=False).extra.get("config")
    if not isinstance(saved, dict) or (marker is not None and marker not in saved):
        raise CheckpointError(f"{checkpoint}: not a `seekdeep {command}` checkpoint (no {command} config in it)")
    cls = type(current)
    known = {f.name for f in fields(cls)}
    values = {k: v for k, v in saved.items() if k in known and k not in keep}
    values.update({k: getattr(current, k) for k in keep})
    if "overwrite" in known:
        values["overwrite"] = False
    return cls(**values)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory as is; a run directory -> its latest complete checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such directory; expected a run directory or a checkpoint-<step> directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: is a file; expected a run directory or a checkpoint-<step> directory")
    if (path / MANIFEST_NAME).is_file() or _step_of(path) is not None:
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        incomplete = sorted(p.name for p in path.iterdir() if _step_of(p) is not None)
        hint = f" ({', '.join(incomplete)} lack {MANIFEST_NAME}: interrupted saves)" if incomplete else ""
        raise CheckpointError(
            f"{path}: holds no complete checkpoint{hint}; expected checkpoint-<step>/ directories with {MANIFEST_NAME}"
        )
    return latest


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Check every file of a checkpoint directory against its manifest (presence, byte size,
    sha256); return the manifest or raise :class:`CheckpointError` naming the bad file."""
    path = Path(path)
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise CheckpointError(
            f"{manifest_path}: missing; {path} is not a complete checkpoint (the save was interrupted, or the "
            "directory was not written by save_checkpoint)"
        )
    try:
        manifest = read_json(manifest_path)
    except ConfigError as exc:
        raise CheckpointError(f"{manifest_path}: unreadable ({exc})") from exc
    files = manifest.get("files")
    if manifest.get("format") != FORMAT or not isinstance(files, dict) or not files:
        raise CheckpointError(f"{manifest_path}: not a {FORMAT} manifest (expected 'format' and a non-empty 'files' map)")
    if TRAINING_STATE_NAME not in files:
        raise CheckpointError(f"{manifest_path}: does not list {TRAINING_STATE_NAME}")
    for rel, info in files.items():
        if rel.startswith("/") or ".." in Path(rel).parts:
            raise CheckpointError(f"{manifest_path}: file entry {rel!r} points outside the checkpoint")
        file = path / rel
        if not file.is_file():
            raise CheckpointError(f"{file}: listed in {MANIFEST_NAME} but missing")
        try:
            want_size, want_sha = int(info["bytes"]), str(info["sha256"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{manifest_path}: entry for {rel!r} lacks 'bytes' / 'sha256'") from exc
        size = file.stat().st_size
        if size != want_size:
            raise CheckpointError(f"{file}: {size} bytes, {MANIFEST_NAME} says {want_size} (truncated or overwritten)")
        _, digest = _hash_and_sync(file)
        if digest != want_sha:
            raise CheckpointError(f"{file}: sha256 {digest[:12]}... does not match {MANIFEST_NAME} ({want_sha[:12]}...): corrupt file")
    return manifest


def _load_model(model: nn.Module, path: Path) -> None:
    config = getattr(model, "config", None)
    adapter_class = getattr(model, "adapter_class", None)
    if adapter_class is None or config is None:
        from safetensors.torch import load_model

        try:
            load_model(model, str(path / "model.safetensors"), strict=True)
        except Exception as exc:
            raise CheckpointError(f"{path / 'model.safetensors'}: does not match the model ({exc})") from exc
        return
    from seekdeep.models.loading import read_checkpoint_state

    state, fresh = read_checkpoint_state(model, path)
    if fresh:  # a training checkpoint always holds the backend parameters it trained
        raise CheckpointError(f"{path}: checkpoint lacks {len(fresh)} tensor(s) the model has, e.g. {fresh[:3]}")
    model.load_state_dict(state, strict=False)


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    optimizer: Any = None,
    scheduler: Any = None,
    scaler: Any = None,
    restore_rng: bool = True,
) -> TrainingState:
    """Verify a checkpoint against its manifest, then restore into the given objects.

    ``path``: a checkpoint directory, or a run directory (its latest complete checkpoint).
    Objects passed as None are not restored; an object passed for state the checkpoint does
    not hold is an error. Restores the python / numpy / torch RNG states unless
    ``restore_rng=False``. Returns the step, data_state and extra that were saved.
    """
    ckpt = resolve_checkpoint(path)
    verify_checkpoint(ckpt)
    state_path = ckpt / TRAINING_STATE_NAME
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{state_path}: cannot be read with torch.load(weights_only=True) ({exc})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{state_path}: not a {FORMAT} training state")
    if model is not None:
        _load_model(model, ckpt)
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if obj is None:
            continue
        if state.get(name) is None:
            raise CheckpointError(f"{state_path}: holds no {name} state (it was saved with {name}=None)")
        try:
            obj.load_state_dict(state[name])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{state_path}: {name} state does not fit the given {type(obj).__name__} ({exc})") from exc
    if restore_rng:
        _set_rng_state(state["rng"])
    user = {}
    for name in ("data_state", "extra"):
        user[name] = json.loads(state[name + "_json"]) if name + "_json" in state else state.get(name, {})
    return TrainingState(step=int(state["step"]), data_state=user["data_state"], extra=user["extra"], path=ckpt)
