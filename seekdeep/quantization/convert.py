"""Converting a float model, in two steps (gpt-fast's ``QuantHandler``):

1. offline: :func:`quantized_state_dict` turns the float weights (and, for ``static``, the
   calibrated activation ranges) into the new tensors;
2. :func:`swap_modules` replaces the float modules with empty quantised ones built on the
   meta device, and the new tensors are loaded with ``load_state_dict(assign=True)``.

Loading a saved quantised checkpoint is step 2 alone: :func:`prepare_for_load` swaps the
modules named in config.json's ``quantization_config`` and the loader assigns the tensors.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from seekdeep.errors import ConfigError
from seekdeep.quantization.config import QUANT_METHOD_TAG, LayerScheme, QuantConfig, resolve_plan
from seekdeep.quantization.modules import LAYER_CLASSES, TiedEmbedding
from seekdeep.quantization.observers import Observer
from seekdeep.train.evaluation import model_device as _model_device


# ----------------------------------------------------------------------------- input checks


def iter_token_batches(model: nn.Module, data: Any, field: str = "calibration_data",
                       method: str = "static") -> Iterator[torch.Tensor]:
    """Validate and yield the (batch, seq) integer tensors of ``data``; raises ConfigError
    naming ``field[i]`` for a bad item and ``field`` when there is no batch at all."""
    if data is None:
        raise ConfigError(field, f"method {method!r} needs an iterable of input-id tensors of shape (batch, seq)")
    if isinstance(data, torch.Tensor):
        raise ConfigError(field, f"expected an iterable of (batch, seq) tensors, got one tensor of shape "
                          f"{tuple(data.shape)}; wrap it in a list: [ids]")
    try:
        iterator = iter(data)
    except TypeError:
        raise ConfigError(field, f"expected an iterable of (batch, seq) tensors, got {type(data).__name__}") from None
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    count = 0
    for i, batch in enumerate(iterator):
        where = f"{field}[{i}]"
        if not isinstance(batch, torch.Tensor):
            raise ConfigError(where, f"expected a tensor of input ids, got {type(batch).__name__}")
        if batch.dtype.is_floating_point or batch.dtype.is_complex or batch.dtype == torch.bool:
            raise ConfigError(where, f"expected integer token ids, got dtype {batch.dtype}")
        if batch.dim() != 2 or batch.numel() == 0:
            raise ConfigError(where, f"expected shape (batch, seq) with both > 0, got {tuple(batch.shape)}")
        if vocab is not None and (int(batch.min()) < 0 or int(batch.max()) >= vocab):
            raise ConfigError(where, f"token ids must be in [0, {vocab}), got [{int(batch.min())}, {int(batch.max())}]")
        count += 1
        yield batch.long()
    if count == 0:
        raise ConfigError(field, "is empty; pass at least one (batch, seq) tensor of input ids")


# ----------------------------------------------------------------------------- calibration


@torch.no_grad()
def calibrate(model: nn.Module, plan: dict[str, LayerScheme], data: Any, cfg: QuantConfig) -> dict[str, tuple[float, int]]:
    """Run up to ``cfg.observe_steps`` batches through the float model and return the int8
    (scale, zero_point) of the input of every ``int8_static`` layer that saw data."""
    names = [name for name, scheme in plan.items() if scheme.kind == "int8_static"]
    observers = {name: Observer(cfg.observer, cfg.percentile, seed=i) for i, name in enumerate(names)}
    handles = []
    for name in names:
        def hook(module, args, observer=observers[name]):
            observer.observe(args[0])
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    device = _model_device(model)
    steps = 0
    try:
        for batch in iter_token_batches(model, data, method="static"):
            model(batch.to(device))
            steps += 1
            if steps >= cfg.observe_steps:
                break
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    symmetric = cfg.activation_symmetric()
    return {name: obs.qparams(symmetric) for name, obs in observers.items() if obs.observed}


# ----------------------------------------------------------------------------- the two steps


@torch.no_grad()
def quantize_module_weights(model: nn.Module, plan: dict[str, LayerScheme],
                            activations: dict[str, tuple[float, int]] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Step 1, per module: ``{module name: {local key: tensor}}`` for every planned module."""
    out = {}
    for name, scheme in plan.items():
        if scheme.kind == "tied":
            out[name] = {}
            continue
        module = model.get_submodule(name)
        act = (activations or {}).get(name)
        out[name] = LAYER_CLASSES[scheme.kind].quantize_weights(module, scheme, act)
    return out


def quantized_state_dict(model: nn.Module, plan: dict[str, LayerScheme],
                         activations: dict[str, tuple[float, int]] | None = None) -> dict[str, torch.Tensor]:
    """Step 1 for the whole model: the state dict the quantised model will have (float
    entries of untouched modules as they are)."""
    per_module = quantize_module_weights(model, plan, activations)
    state = {}
    for key, tensor in model.state_dict().items():
        if not any(key.startswith(name + ".") for name in plan):
            state[key] = tensor
    for name, local in per_module.items():
        state.update({f"{name}.{key}": tensor for key, tensor in local.items()})
    return state


def swap_modules(model: nn.Module, plan: dict[str, LayerScheme], dtype: torch.dtype | None = None) -> None:
    """Step 2a: replace every planned module by an empty quantised one on the meta device.
    ``dtype``: the float dtype embeddings output (default: the replaced weight's)."""
    tied = []
    for name, scheme in plan.items():
        old = model.get_submodule(name)
        if scheme.kind == "tied":
            tied.append((name, old))
            continue
        cls = LAYER_CLASSES[scheme.kind]
        with torch.device("meta"):
            new = cls.empty(old, scheme, dtype) if isinstance(old, nn.Embedding) else cls.empty(old, scheme)
        _set_submodule(model, name, new)
    for name, old in tied:
        head = model.get_submodule("lm_head")
        _set_submodule(model, name, TiedEmbedding(head, dtype or old.weight.dtype))


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def quantization_record(cfg: QuantConfig, plan: dict[str, LayerScheme], **extra: Any) -> dict[str, Any]:
    """What config.json stores as ``quantization_config``."""
    return {"quant_method": QUANT_METHOD_TAG, **cfg.to_dict(), **extra,
            "modules": {name: scheme.to_dict() for name, scheme in plan.items()}}


def convert(model: nn.Module, cfg: QuantConfig, plan: dict[str, LayerScheme],
            activations: dict[str, tuple[float, int]] | None = None, **record: Any) -> nn.Module:
    """Both steps for ``plan``: new tensors offline, meta swap, ``assign=True`` load."""
    device = _model_device(model)
    per_module = quantize_module_weights(model, plan, activations)
    swap_modules(model, plan)
    for name, local in per_module.items():
        if local:
            model.get_submodule(name).load_state_dict({k: v.to(device) for k, v in local.items()}, assign=True)
    model.quantization_config = quantization_record(cfg, plan, **record)
    return model


def quantize(model: nn.Module, cfg: QuantConfig, calibration_data: Any = None) -> nn.Module:
    """``QuantConfig.apply``: quantise ``model`` in place and return it."""
    if not isinstance(cfg, QuantConfig):
        raise ConfigError("config", f"expected a QuantConfig, got {type(cfg).__name__}")
    if not isinstance(model, nn.Module):
        raise ConfigError("model", f"expected a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, "quantization_config", None) is not None:
        raise ConfigError("model", "is already quantised (it has a quantization_config); quantise the float model")
    if any(p.is_meta for p in model.parameters()):
        raise ConfigError("model", "has weights on the meta device; load or initialise it first")
    if cfg.method == "qat":
        from seekdeep.quantization.qat import quantization_aware_finetune

        return quantization_aware_finetune(model, cfg, calibration_data)
    plan = resolve_plan(model, cfg)
    if not plan:
        raise ConfigError("skip", "leaves no module to quantise")
    activations = None
    if cfg.method == "static":
        activations = calibrate(model, plan, calibration_data, cfg)
        unseen = [name for name, s in plan.items() if s.kind == "int8_static" and name not in activations]
        for name in unseen:  # e.g. MoE experts no calibration token was routed to
            plan[name] = LayerScheme("int8_dynamic", per_channel=plan[name].per_channel)
        if unseen:
            warnings.warn(f"{len(unseen)} layer(s) saw no calibration input and use dynamic int8 activations: "
                          f"{unseen[:3]}", stacklevel=3)
    elif calibration_data is not None:
        warnings.warn(f"method {cfg.method!r} does not use calibration_data; it was ignored", stacklevel=3)
    return convert(model, cfg, plan, activations)


# ----------------------------------------------------------------------------- loading


def parse_record(record: Any, source: str | None = None) -> tuple[QuantConfig, dict[str, LayerScheme]]:
    if not isinstance(record, dict):
        raise ConfigError("quantization_config", f"must be an object, got {type(record).__name__}", source=source)
    if record.get("quant_method") != QUANT_METHOD_TAG:
        raise ConfigError("quantization_config.quant_method",
                          f"{record.get('quant_method')!r} is not supported; accepted: {QUANT_METHOD_TAG!r}", source=source)
    modules = record.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise ConfigError("quantization_config.modules", "missing or empty", source=source)
    cfg = QuantConfig.from_dict(record)
    plan = {name: LayerScheme.from_dict(d, name) for name, d in modules.items()}
    return cfg, plan


def prepare_for_load(model: nn.Module, record: dict[str, Any], dtype: torch.dtype | None = None,
                     source: str | None = None) -> None:
    """Swap the modules a quantised checkpoint names (``record``: config.json's
    ``quantization_config``) on a model built on the meta device, before the loader assigns
    the checkpoint's tensors."""
    _, plan = parse_record(record, source)
    present = dict(model.named_modules())
    for name, scheme in plan.items():
        module = present.get(name)
        expected = nn.Embedding if scheme.kind in ("int8_embedding", "int4_embedding", "bf16_embedding", "tied") else nn.Linear
        if not isinstance(module, expected):
            raise ConfigError(f"quantization_config.modules.{name}",
                              f"the model has no {expected.__name__} of that name (found {type(module).__name__})", source=source)
    swap_modules(model, plan, dtype)
    model.quantization_config = record


# ----------------------------------------------------------------------------- size


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of the model's state (what save_pretrained writes), shared tensors counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in model.state_dict().values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if tensor.device.type != "meta" and key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def iter_cycle(batches: Iterable[torch.Tensor], steps: int) -> Iterator[torch.Tensor]:
    """``steps`` batches, cycling over a re-iterable ``batches``."""
    batches = list(batches)
    for i in range(steps):
        yield batches[i % len(batches)]
