"""Distributed checkpoints with ``torch.distributed.checkpoint`` (DCP) that reshard.

Every rank writes its own shards of the model and optimizer state, keyed by parameter name
with their global shapes, so a checkpoint saved with one layout (FSDP over 2 ranks, a
pipeline, ...) loads into another (tensor parallel, one process, ...): DCP reads whichever
pieces each rank's shards need.

Layout of ``run_dir/checkpoint-<step:08d>/``: DCP's files (``.metadata``, ``*.distcp``),
``trainer_state.pt`` (step, scheduler, loss scaler, data position, ``extra``; rank 0's) and
``manifest.json`` written last (format ``seekdeep-dcp-checkpoint``, byte sizes). Everything
is written into a hidden ``.checkpoint-<step>.tmp-dcp`` directory and renamed into place by
rank 0 only after every rank has finished, so an interrupted save never looks like a
checkpoint. RNG states are not saved (they are per rank and do not map across layouts).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor

from seekdeep.errors import CheckpointError, ConfigError
from seekdeep.files import write_json_atomic
from seekdeep.train.checkpoint import MANIFEST_NAME, TrainingState, checkpoint_name, list_checkpoints

FORMAT = "seekdeep-dcp-checkpoint"
TRAINER_STATE_NAME = "trainer_state.pt"


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------- full state dicts


@torch.no_grad()
def load_full_state_dict(module: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Copy a full (unsharded) state dict into ``module``'s local shards: each rank keeps the
    slice its DTensor placements say it owns (no communication). Keys the module does not
    hold (other pipeline stages) are ignored; a key it holds but ``full`` lacks is an error."""
    for name, target in module.state_dict().items():
        if name not in full:
            raise CheckpointError(f"full state dict lacks {name!r} (has {len(full)} keys, e.g. {list(full)[:3]})")
        source = full[name].to(device=target.device, dtype=target.dtype)
        if isinstance(target, DTensor):
            local = distribute_tensor(source, target.device_mesh, target.placements, src_data_rank=None).to_local()
            target.to_local().copy_(local)
        else:
            target.copy_(source)


def model_state_dict(parts: list[nn.Module]) -> dict[str, Any]:
    """Name-keyed (sharded) state of the local parts, as DCP saves it."""
    merged: dict[str, Any] = {}
    for part in parts:
        merged.update(get_model_state_dict(part))
    return merged


def full_model_state_dict(parts: list[nn.Module]) -> dict[str, torch.Tensor]:
    """Unsharded CPU copy of the local parts' state (a collective over their meshes; every rank
    gets it). For a pipeline, each stage's ranks get their stage's keys only."""
    out: dict[str, torch.Tensor] = {}
    for name, value in model_state_dict(parts).items():
        out[name] = (value.full_tensor() if isinstance(value, DTensor) else value).detach().cpu().clone()
    return out


# ----------------------------------------------------------------------------- save


def _optimizer_state(parts: list[nn.Module], optimizer) -> dict[str, Any]:
    from seekdeep.parallel.optim import PartsOptimizer

    if isinstance(optimizer, PartsOptimizer):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    if len(parts) != 1:
        raise ConfigError("optimizer", "several model parts need a PartsOptimizer (one optimizer per part)")
    return get_optimizer_state_dict(parts[0], optimizer, options=StateDictOptions(flatten_optimizer_state_dict=True))


def _load_optimizer_state(parts: list[nn.Module], optimizer, state: dict[str, Any]) -> None:
    from seekdeep.parallel.optim import PartsOptimizer

    if isinstance(optimizer, PartsOptimizer):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(parts[0], optimizer, optim_state_dict=state,
                             options=StateDictOptions(flatten_optimizer_state_dict=True))


def save_distributed_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    parts: list[nn.Module],
    optimizer: Any = None,
    scheduler: Any = None,
    scaler: Any = None,
    data_state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    keep_last: int | None = 2,
) -> Path:
    """Every rank calls this with its model parts (and optimizer); returns the checkpoint path.
    ``data_state`` / ``extra`` must be JSON-serialisable and are taken from rank 0."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ConfigError("step", f"must be an int >= 0, got {step!r}")
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ConfigError("keep_last", f"must be an int >= 1 or None (keep all), got {keep_last!r}")
    run_dir = Path(run_dir)
    final = run_dir / checkpoint_name(step)
    tmp = run_dir / f".{final.name}.tmp-dcp"
    rank = _rank()
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    state: dict[str, Any] = {"model": model_state_dict(parts)}
    if optimizer is not None:
        state["optimizer"] = _optimizer_state(parts, optimizer)
    dcp.save(state, checkpoint_id=str(tmp), no_dist=not (dist.is_available() and dist.is_initialized()))
    if rank == 0:
        trainer = {
            "step": step,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "data_state_json": json.dumps(data_state or {}),
            "extra_json": json.dumps(extra or {}),
            "has_optimizer": optimizer is not None,
        }
        torch.save(trainer, tmp / TRAINER_STATE_NAME)
        files = {p.name: {"bytes": p.stat().st_size} for p in sorted(tmp.iterdir()) if p.is_file()}
        write_json_atomic(tmp / MANIFEST_NAME, {"format": FORMAT, "version": 1, "step": step, "files": files,
                                                "world_size": dist.get_world_size() if dist.is_initialized() else 1})
        old = None
        if final.exists():
            old = run_dir / f".{final.name}.old-dcp"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if keep_last is not None:
            others = [p for p in list_checkpoints(run_dir) if p != final]
            for path in others[: max(0, len(others) - (keep_last - 1))]:
                doomed = run_dir / f".{path.name}.old-dcp"
                os.rename(path, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
    _barrier()
    return final


# ----------------------------------------------------------------------------- load


def is_distributed_checkpoint(path: str | os.PathLike) -> bool:
    manifest = Path(path) / MANIFEST_NAME
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def _verify(path: Path) -> dict[str, Any]:
    if not is_distributed_checkpoint(path):
        raise CheckpointError(f"{path}: not a complete {FORMAT} (no {MANIFEST_NAME} with that format)")
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    for name, info in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: listed in {MANIFEST_NAME} but missing")
        if file.stat().st_size != int(info["bytes"]):
            raise CheckpointError(f"{file}: {file.stat().st_size} bytes, {MANIFEST_NAME} says {info['bytes']} (truncated?)")
    return manifest


def read_trainer_state(path: str | os.PathLike) -> TrainingState:
    """Step, data position and ``extra`` of a distributed checkpoint (no tensors loaded)."""
    path = Path(path)
    _verify(path)
    trainer = torch.load(path / TRAINER_STATE_NAME, map_location="cpu", weights_only=True)
    return TrainingState(step=int(trainer["step"]), data_state=json.loads(trainer["data_state_json"]),
                         extra=json.loads(trainer["extra_json"]), path=path)


#: (name a model part may ask for, the name a tied checkpoint stores it under)
_TIED_ALIASES = (("lm_head.weight", "model.embed_tokens.weight"),)


def _alias_tied_keys(state: dict[str, dict[str, Any]], path: Path) -> list[tuple[str, str, str]]:
    """A checkpoint of a model with tied embeddings may hold the shared matrix (and its
    optimizer state) under the embedding's name only, while a pipeline's last stage holds its
    own copy as ``lm_head.weight``: read that copy from the embedding's entries."""
    from torch.distributed.checkpoint import FileSystemReader

    available = set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    moved = []
    for section, entries in state.items():
        for key in list(entries):
            if f"{section}.{key}" in available:
                continue
            for wanted, stored in _TIED_ALIASES:
                alt = key.replace(wanted, stored)
                if alt != key and f"{section}.{alt}" in available and alt not in entries:
                    entries[alt] = entries.pop(key)
                    moved.append((section, alt, key))
                    break
    return moved


def load_distributed_checkpoint(
    path: str | os.PathLike,
    parts: list[nn.Module],
    optimizer: Any = None,
    scheduler: Any = None,
    scaler: Any = None,
    no_dist: bool | None = None,
) -> TrainingState:
    """Load into this rank's parts (any layout, any world size). ``no_dist``: read without
    collectives (default: when no process group is initialised), e.g. rank 0 alone
    consolidating a full model."""
    path = Path(path)
    _verify(path)
    if no_dist is None:
        no_dist = not (dist.is_available() and dist.is_initialized())
    trainer = torch.load(path / TRAINER_STATE_NAME, map_location="cpu", weights_only=True)
    state: dict[str, Any] = {"model": model_state_dict(parts)}
    if optimizer is not None:
        if not trainer.get("has_optimizer"):
            raise CheckpointError(f"{path}: holds no optimizer state (it was saved with optimizer=None)")
        state["optimizer"] = _optimizer_state(parts, optimizer)
    moved = _alias_tied_keys(state, path)
    try:
        dcp.load(state, checkpoint_id=str(path), no_dist=no_dist)
    except Exception as exc:  # DCP raises plain exceptions naming missing keys / shapes
        raise CheckpointError(f"{path}: does not fit this model ({exc})") from exc
    for section, saved_key, wanted_key in moved:
        state[section][wanted_key] = state[section].pop(saved_key)
    for part in parts:
        names = set(part.state_dict())
        set_model_state_dict(part, {k: v for k, v in state["model"].items() if k in names})
    if optimizer is not None:
        _load_optimizer_state(parts, optimizer, state["optimizer"])
    if scheduler is not None and trainer.get("scheduler") is not None:
        scheduler.load_state_dict(trainer["scheduler"])
    if scaler is not None and trainer.get("scaler") is not None:
        scaler.load_state_dict(trainer["scaler"])
    return TrainingState(step=int(trainer["step"]), data_state=json.loads(trainer["data_state_json"]),
                         extra=json.loads(trainer["extra_json"]), path=path)
