"""Adapters on disk in peft's layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are the module path in the base model under ``base_model.model.``, without the adapter
name: ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``; DoRA's magnitude is
``...q_proj.lora_magnitude_vector``; a ``modules_to_save`` copy is saved under the module's own
path (``base_model.model.lm_head.weight``); prompt tuning is one ``prompt_embeddings`` tensor.
Files written by transformers' own adapter integration (keys without the prefix) load too.
The config is written last, so a directory with a config holds a complete adapter.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from seekdeep.errors import CheckpointError, ConfigError
from seekdeep.files import atomic_write, read_json, resolve_model_dir, write_json_atomic

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_HUB_PATTERNS = [CONFIG_NAME, WEIGHTS_NAME]


def adapter_tensors(model, adapter_name: str) -> dict[str, torch.Tensor]:
    """The live tensors of one adapter under their peft file keys (not copies)."""
    from seekdeep.peft.layers import ModulesToSaveWrapper

    if adapter_name not in model.peft_config:
        raise ConfigError("adapter_name", f"no adapter named {adapter_name!r}; adapters: {', '.join(model.peft_config) or 'none'}")
    out: dict[str, torch.Tensor] = {}
    for path, layer in model._tuner_layers():
        for slot in layer.slot_names:
            modules = getattr(layer, slot)
            if adapter_name not in modules:
                continue
            for key, tensor in modules[adapter_name].state_dict(keep_vars=True).items():
                if isinstance(layer, ModulesToSaveWrapper):
                    out[f"{PREFIX}{path}.{key}"] = tensor
                elif slot == "lora_magnitude_vector":
                    out[f"{PREFIX}{path}.lora_magnitude_vector"] = tensor
                else:
                    out[f"{PREFIX}{path}.{slot}.{key}"] = tensor
    prompts = model._prompt_encoders()
    if prompts is not None and adapter_name in prompts:
        out["prompt_embeddings"] = prompts[adapter_name].embedding.weight
    return out


def _pick_name(model, adapter_name: str | None) -> str:
    if adapter_name is not None:
        return adapter_name
    names = model.list_adapters()
    if len(names) == 1:
        return names[0]
    if len(model.active_adapters) == 1:
        return model.active_adapters[0]
    raise ConfigError("adapter_name", f"the model holds adapters {names}; name the one to save")


def adapter_config_dict(model, adapter_name: str) -> dict:
    from seekdeep.peft.config import PromptTuningConfig

    config = model.peft_config[adapter_name]
    if isinstance(config, PromptTuningConfig):
        return config.to_peft_dict(model.config)
    return config.to_dict()


def save_adapter(model, save_directory: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write one adapter of ``model`` to ``save_directory`` (created if needed); returns it."""
    name = _pick_name(model, adapter_name)
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in adapter_tensors(model, name).items()}
    if not tensors:
        raise ConfigError("adapter_name", f"adapter {name!r} holds no tensors")
    out = Path(save_directory)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: is a file; expected a directory for {CONFIG_NAME} and {WEIGHTS_NAME}")
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).unlink(missing_ok=True)  # a crash below leaves no config: not an adapter
    atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_json_atomic(out / CONFIG_NAME, adapter_config_dict(model, name))
    return out


def read_adapter_config(path: str | os.PathLike):
    """(adapter directory, parsed config) for a local directory or a hub id."""
    from seekdeep.peft.config import AdapterConfig

    directory = resolve_model_dir(path, _HUB_PATTERNS, CONFIG_NAME)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_NAME}; not an adapter directory (a full model? load it with "
                              "seekdeep.AutoModel)")
    return directory, AdapterConfig.from_dict(read_json(config_path), source=str(config_path))


def _file_key(key: str) -> str:
    # transformers' integration saves without the PeftModel prefix; older peft kept ".weight" on DoRA
    if not key.startswith(PREFIX) and key != "prompt_embeddings":
        key = PREFIX + key
    if key.endswith(".lora_magnitude_vector.weight"):
        key = key.removesuffix(".weight")
    return key


def read_adapter_weights(directory: Path) -> dict[str, torch.Tensor]:
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        other = sorted(p.name for p in directory.glob("adapter_model*"))
        hint = f" (found {', '.join(other)}: only safetensors is read)" if other else ""
        raise CheckpointError(f"{directory}: no {WEIGHTS_NAME}{hint}")
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            return {_file_key(k): f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise CheckpointError(f"{weights}: unreadable safetensors file ({exc})") from exc


@torch.no_grad()
def copy_into_adapter(model, adapter_name: str, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy file tensors into the adapter's slots, checking names and shapes first."""
    live = adapter_tensors(model, adapter_name)
    tensors = _load_base_layer_copies(model, tensors, source)
    unexpected = sorted(set(tensors) - set(live))
    if unexpected:
        raise CheckpointError(f"{source}: tensor {unexpected[0]!r} has no place in this model's adapter "
                              f"(the adapter was saved for a base with other module names, e.g. {sorted(live)[:2]})")
    missing = sorted(set(live) - set(tensors))
    if missing:
        raise CheckpointError(f"{source}: lacks {len(missing)} tensor(s) the adapter config implies, e.g. {missing[:3]}")
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(live[key].shape):
            raise CheckpointError(f"{source}: {key!r} has shape {tuple(tensor.shape)} but this model needs "
                                  f"{tuple(live[key].shape)}: the adapter was trained on a base with other shapes")
    for key, tensor in tensors.items():
        live[key].copy_(tensor.to(live[key].dtype))


def _load_base_layer_copies(model, tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """peft saves the base weights of a targeted embedding or output head beside the adapter
    (``...lm_head.base_layer.weight``: its vocabulary may have been resized); like peft, load
    them into the base layer (a warning when that changes the base). Returns the other tensors."""
    import warnings

    layers = dict(model._tuner_layers())
    rest = {}
    for key, tensor in tensors.items():
        path, _, leaf = key.removeprefix(PREFIX).rpartition(".base_layer.")
        layer = layers.get(path)
        target = getattr(getattr(layer, "base_layer", None), leaf, None) if layer is not None else None
        if not isinstance(target, torch.Tensor):
            rest[key] = tensor
            continue
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(f"{source}: {key!r} has shape {tuple(tensor.shape)} but this model's {path}.{leaf} is "
                                  f"{tuple(target.shape)}: the adapter was saved for a base with another vocabulary or size")
        with torch.no_grad():
            if not torch.equal(tensor.to(target.dtype), target):
                warnings.warn(f"{source}: {key} differs from this base's {path}.{leaf}; loading it into the base layer "
                              "as peft does (every adapter on this model now sees it)", stacklevel=3)
                target.copy_(tensor.to(target.dtype))
    return rest


def load_adapter(model, path: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False) -> None:
    """Add the adapter at ``path`` to ``model`` as ``adapter_name`` (see AdapterMixin.load_adapter)."""
    directory, config = read_adapter_config(path)
    tensors = read_adapter_weights(directory)
    if adapter_name in model.peft_config:
        raise ConfigError("adapter_name", f"{adapter_name!r} already exists (adapters: {', '.join(model.peft_config)}); "
                          "load under another adapter_name or delete_adapter it first")
    try:
        model.add_adapter(adapter_name, config)
    except ConfigError as exc:
        raise CheckpointError(f"{directory}: this adapter does not fit {type(model).__name__}: {exc}") from exc
    try:
        copy_into_adapter(model, adapter_name, tensors, str(directory / WEIGHTS_NAME))
    except BaseException:
        model.delete_adapter(adapter_name)
        raise
    state = model._peft_state()
    if not is_trainable:
        state["frozen"].add(adapter_name)
        for param in model._adapter_parameters(adapter_name):
            param.requires_grad_(False)
