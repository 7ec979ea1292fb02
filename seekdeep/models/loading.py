"""Loading and saving models in the Hugging Face layout.

config.json + model.safetensors (or shards with model.safetensors.index.json) +
generation_config.json. Models are built on the meta device and the checkpoint tensors are
assigned directly (``load_state_dict(assign=True)``), so loading peaks near one copy of the
weights.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from seekdeep.errors import CheckpointError, ConfigError
from seekdeep.files import atomic_write, read_json, write_json_atomic
from seekdeep.files import resolve_model_dir as resolve
from seekdeep.models import family

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
GENERATION_CONFIG_NAME = "generation_config.json"
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_model_dir(path_or_id: str | os.PathLike) -> Path:
    return resolve(path_or_id, _HUB_PATTERNS, CONFIG_NAME)


def config_from_dict(d: dict[str, Any], source: str | None = None):
    model_type = d.get("model_type")
    if model_type is None:
        raise ConfigError("model_type", "required key is missing", source=source)
    config_cls, _ = family(model_type, source)
    return config_cls.from_hf_dict(d, source=source)


def load_config(path_or_id: str | os.PathLike, **overrides: Any):
    model_dir = resolve_model_dir(path_or_id)
    d = read_json(model_dir / CONFIG_NAME)
    d.update(overrides)
    return config_from_dict(d, source=str(model_dir / CONFIG_NAME))


def parse_dtype(dtype: Any, config_dict: dict[str, Any] | None = None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        name = (config_dict or {}).get("dtype") or (config_dict or {}).get("torch_dtype") or "float32"
        return _DTYPES.get(name, torch.float32)
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ConfigError("dtype", f"unsupported {dtype!r}; accepted: a torch.dtype, 'auto', {', '.join(_DTYPES)}")


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / WEIGHTS_INDEX_NAME
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConfigError("weight_map", "missing or empty", source=str(index))
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: shard(s) listed in weight_map are missing: {', '.join(missing)}")
        return files
    single = model_dir / WEIGHTS_NAME
    if single.is_file():
        return [single]
    raise CheckpointError(f"{model_dir}: no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} found")


def read_checkpoint_state(model, model_dir: Path, dtype: torch.dtype | None = None, device=None):
    """Read every tensor of a Hugging Face layout directory into ``model``'s names, checking
    names and shapes against the model. Returns ``(state, fresh)``: ``fresh`` lists the
    backend parameters the checkpoint may lack (they need initialising); any other missing
    tensor is a CheckpointError. ``dtype=None`` keeps the stored dtypes."""
    adapter = model.adapter_class(model.config)
    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(model_dir):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for hf_key in f.keys():
                    for key, tensor in adapter.from_hf(hf_key, f.get_tensor(hf_key)):
                        if key not in expected:
                            raise CheckpointError(f"{file}: unexpected tensor {hf_key!r} (no such parameter in {type(model).__name__})")
                        if tuple(tensor.shape) != tuple(expected[key].shape):
                            raise CheckpointError(
                                f"{file}: shape mismatch for {hf_key!r}: checkpoint {tuple(tensor.shape)}, "
                                f"config.json implies {tuple(expected[key].shape)}"
                            )
                        target = torch.float32 if adapter.keeps_fp32(key) else (dtype or tensor.dtype)
                        state[key] = tensor.to(device=device, dtype=target if tensor.is_floating_point() else tensor.dtype)
        except CheckpointError:
            raise
        except Exception as exc:  # truncated / corrupt file
            raise CheckpointError(f"{file}: unreadable safetensors file ({exc})") from exc
    # a model that nests its LM (a VLM) names its tied head itself
    tied = set(getattr(model, "tied_weight_keys", ("lm_head.weight",))) if model.config.tie_word_embeddings else set()
    missing = [k for k in expected if k not in state and k not in tied]
    fresh = [k for k in missing if adapter.is_optional(k)]
    hard_missing = [k for k in missing if k not in fresh]
    if hard_missing:
        raise CheckpointError(f"{model_dir}: checkpoint lacks {len(hard_missing)} tensor(s), e.g. {hard_missing[:3]}")
    return state, fresh


def load_pretrained(path_or_id, dtype=None, device=None, expected_class=None, **overrides: Any):
    """Build the model named by config.json on the meta device and assign the checkpoint."""
    model_dir = resolve_model_dir(path_or_id)
    config_path = model_dir / CONFIG_NAME
    raw = read_json(config_path)
    raw.update(overrides)
    config = config_from_dict(raw, source=str(config_path))
    _, model_cls = family(config.model_type)
    if expected_class is not None and not issubclass(model_cls, expected_class):
        raise ConfigError("model_type", f"{config.model_type!r} builds {model_cls.__name__}, not {expected_class.__name__}", source=str(config_path))
    torch_dtype = parse_dtype(dtype, raw)
    device = torch.device(device) if device is not None else torch.device("cpu")
    with torch.device("meta"):
        model = model_cls(config)
    quantization = raw.get("quantization_config")
    if quantization is not None:  # swap in the quantised modules (still on meta) the checkpoint holds
        from seekdeep.quantization import prepare_for_load

        prepare_for_load(model, quantization, dtype=torch_dtype, source=str(config_path))
    state, fresh = read_checkpoint_state(model, model_dir, dtype=torch_dtype, device=device)
    model.load_state_dict(state, strict=False, assign=True)
    if fresh:  # backend parameters (DSA indexer, attention gate) a plain checkpoint has no values for
        _materialise_fresh(model, fresh, device, torch_dtype)
    if isinstance(model.lm_head, torch.nn.Linear):  # a quantised lm_head is tied through its embedding module
        model.tie_weights()
    model.eval()
    return model


def _materialise_fresh(model, keys: list[str], device, dtype) -> None:
    """Allocate and initialise the attention backends (the ``*.inner`` modules) whose
    parameters the checkpoint does not hold; each backend's ``reset_parameters`` knows its
    own initialisation."""
    modules = dict(model.named_modules())
    for name in sorted({re.sub(r"(\.inner)\..*$", r"\1", key) for key in keys}):
        module = modules[name]
        module.to_empty(device=device)
        with torch.no_grad():
            module.reset_parameters()
        module.to(dtype)


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        if size <= 0:
            raise ConfigError("max_shard_size", f"must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise ConfigError("max_shard_size", f"cannot parse {size!r}; accepted: an int (bytes) or e.g. '500MB', '5GB'")
    unit = m.group(2).upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * mult)


def save_pretrained(model, save_directory, max_shard_size: int | str = "5GB") -> None:
    adapters = model.list_adapters() if hasattr(model, "list_adapters") else []
    if adapters:
        raise ConfigError(
            "model",
            f"has adapters attached ({', '.join(adapters)}); save them with save_adapter(), or fold them into the "
            "weights with merge_and_unload() before save_pretrained()",
        )
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    limit = _parse_size(max_shard_size)
    adapter = model.adapter_class(model.config)
    state = {k: v.detach().contiguous() for k, v in adapter.to_hf(model.state_dict()).items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    for stale in list(out.glob("model*.safetensors")) + [out / WEIGHTS_INDEX_NAME]:
        if stale.exists():
            stale.unlink()
    dtype = next(iter(state.values())).dtype if state else torch.float32
    metadata = {"format": "pt"}
    if len(shards) == 1:
        atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(shards[0], tmp, metadata=metadata))
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            atomic_write(out / name, lambda tmp, s=shard: save_file(s, tmp, metadata=metadata))
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        write_json_atomic(out / WEIGHTS_INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    config = model.config.to_hf_dict()
    config["dtype"] = str(dtype).removeprefix("torch.")
    if getattr(model, "quantization_config", None) is not None:  # integer tensors + the float dtype of the rest
        config["quantization_config"] = model.quantization_config
        config["dtype"] = str(model.dtype).removeprefix("torch.")
    write_json_atomic(out / CONFIG_NAME, config)
    gen = {k: getattr(model.config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if getattr(model.config, k, None) is not None}
    write_json_atomic(out / GENERATION_CONFIG_NAME, gen)
