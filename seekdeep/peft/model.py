"""Named adapters on the model itself: ``model.add_adapter("task", LoRAConfig(...))``.

:class:`AdapterMixin` is a base of :class:`seekdeep.models.base.CausalLM`. Adapters wrap the
targeted layers in place (``q_proj`` becomes a :class:`LoRALinear` whose ``base_layer`` is the
original ``nn.Linear``), so the model code is not edited and module paths stay those of the
base model. Adding or activating an adapter freezes everything but that adapter, as peft does.

The model's own ``save_pretrained`` writes the module tree as it is; with adapters attached,
save them with :meth:`save_adapter` (peft layout) or fold them in with :meth:`merge_and_unload`
first.
"""

from __future__ import annotations

import dataclasses
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from torch import nn

from seekdeep.errors import ConfigError

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


class AdapterSwitch:
    """Returned by :meth:`AdapterMixin.disable_adapters`: adapters are off from the call on;
    used as a context manager they come back on at exit."""

    def __init__(self, model: "AdapterMixin"):
        self._model = model
        self._was_disabled = model._peft_state()["disabled"]
        model._set_disabled(True)

    def __enter__(self) -> "AdapterSwitch":
        return self

    def __exit__(self, *exc) -> None:
        self._model._set_disabled(self._was_disabled)


class AdapterMixin:
    """add / load / save / set / disable / delete / merge adapters (see the module docstring)."""

    # -- bookkeeping
    def _peft_state(self) -> dict[str, Any]:
        state = self.__dict__.get("_peft")
        if state is None:
            state = {"configs": {}, "active": [], "disabled": False, "frozen": set(), "hooks": None, "bridges": None}
            self.__dict__["_peft"] = state
        return state

    @property
    def peft_config(self) -> dict[str, Any]:
        """Adapter name -> its config, in the order they were added."""
        return self._peft_state()["configs"]

    @property
    def active_adapters(self) -> list[str]:
        return list(self._peft_state()["active"])

    @property
    def active_adapter(self) -> str | None:
        active = self._peft_state()["active"]
        return active[0] if active else None

    @property
    def adapters_disabled(self) -> bool:
        return self._peft_state()["disabled"]

    def list_adapters(self) -> list[str]:
        return list(self.peft_config)

    def _tuner_layers(self) -> Iterator[tuple[str, nn.Module]]:
        from seekdeep.peft.layers import TunerLayer

        for name, module in self.named_modules():
            if isinstance(module, TunerLayer):
                yield name, module

    def _prompt_encoders(self) -> nn.ModuleDict | None:
        return self._modules.get("prompt_encoder")

    def _adapter_parameters(self, name: str) -> list[nn.Parameter]:
        params = [p for _, layer in self._tuner_layers() for p in layer.adapter_parameters(name)]
        prompts = self._prompt_encoders()
        if prompts is not None and name in prompts:
            params.extend(prompts[name].parameters())
        return params

    def _require_adapter(self, name: Any, field: str = "adapter_name") -> str:
        if name not in self.peft_config:
            known = ", ".join(self.peft_config) or "none (add one with add_adapter)"
            raise ConfigError(field, f"no adapter named {name!r}; adapters on this model: {known}")
        return name

    # -- adding
    def add_adapter(self, adapter_name: Any, config: Any = None) -> None:
        """Add adapter ``adapter_name`` built from ``config`` (:class:`LoRAConfig`,
        :class:`BottleneckConfig` or :class:`PromptTuningConfig`); it becomes the active and the
        only trainable adapter, with the base model frozen. ``add_adapter(config)`` (the
        transformers order) names it ``"default"``."""
        from seekdeep.peft.config import AdapterConfig

        if isinstance(adapter_name, AdapterConfig) and config is None:
            adapter_name, config = "default", adapter_name
        if not isinstance(adapter_name, str) or not _NAME_RE.fullmatch(adapter_name):
            raise ConfigError("adapter_name", f"must be a name of letters, digits, '_' or '-' (no dots), got {adapter_name!r}")
        if adapter_name in self.peft_config:
            raise ConfigError("adapter_name", f"{adapter_name!r} already exists (adapters: {', '.join(self.peft_config)}); "
                              f"pick another name or delete_adapter({adapter_name!r}) first")
        if adapter_name in ("base_layer", "original_module"):
            raise ConfigError("adapter_name", f"{adapter_name!r} is reserved for the wrapped base layer")
        if not isinstance(config, AdapterConfig):
            raise ConfigError("config", f"expected a LoRAConfig, BottleneckConfig or PromptTuningConfig, got {type(config).__name__}")
        config = dataclasses.replace(config)  # the model keeps its own copy
        if getattr(config, "base_model_name_or_path", None) is None:
            source = getattr(getattr(self, "config", None), "source", None)
            config.base_model_name_or_path = str(Path(source).parent) if source else None
        self.unmerge_adapter()
        _inject(self, adapter_name, config)
        state = self._peft_state()
        if state["bridges"] is None:
            from seekdeep.peft.lora import enable_quantized_input_grads

            state["bridges"] = enable_quantized_input_grads(self)
        self.peft_config[adapter_name] = config
        self._activate([adapter_name], trainable=True)

    # -- switching
    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make ``adapter_name`` (or several) the active adapters; they become trainable and
        everything else frozen (adapters loaded with ``is_trainable=False`` stay frozen)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if not names:
            raise ConfigError("adapter_name", "give at least one adapter name")
        for name in names:
            self._require_adapter(name)
        self._activate(names, trainable=True)

    def _activate(self, names: list[str], trainable: bool) -> None:
        from seekdeep.peft.config import PromptTuningConfig

        prompts = [n for n in names if isinstance(self.peft_config[n], PromptTuningConfig)]
        if len(prompts) > 1:
            raise ConfigError("adapter_name", f"only one prompt-tuning adapter can be active at a time, got {prompts}")
        state = self._peft_state()
        if any(layer.merged for _, layer in self._tuner_layers()) and list(names) != state["active"]:
            self.unmerge_adapter()
        state["active"] = list(names)
        for _, layer in self._tuner_layers():
            layer.active = list(names)
        if trainable:
            for param in self.parameters():
                param.requires_grad_(False)
            for name in names:
                if name not in state["frozen"]:
                    for param in self._adapter_parameters(name):
                        param.requires_grad_(True)

    @contextmanager
    def use_adapter(self, adapter_name: str | list[str]) -> Iterator[None]:
        """Route calls through ``adapter_name`` inside the block (trainable flags untouched)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            self._require_adapter(name)
        before = self.active_adapters
        self._activate(names, trainable=False)
        try:
            yield
        finally:
            self._activate(before, trainable=False)

    def disable_adapters(self) -> AdapterSwitch:
        """Run the base model alone: ``with model.disable_adapters(): ...`` (back on at exit), or
        call it bare and :meth:`enable_adapters` later."""
        return AdapterSwitch(self)

    def enable_adapters(self) -> None:
        self._set_disabled(False)

    def _set_disabled(self, disabled: bool) -> None:
        self._peft_state()["disabled"] = disabled
        for _, layer in self._tuner_layers():
            layer.disabled = disabled

    # -- removing and merging
    def delete_adapter(self, adapter_name: str) -> None:
        self._require_adapter(adapter_name)
        self.unmerge_adapter()
        for path, layer in list(self._tuner_layers()):
            layer.delete(adapter_name)
            if not layer.adapter_names:
                _replace(self, path, layer.unloaded())
        prompts = self._prompt_encoders()
        if prompts is not None and adapter_name in prompts:
            del prompts[adapter_name]
            if not len(prompts):
                self._remove_prompt_support()
        state = self._peft_state()
        del state["configs"][adapter_name]
        state["frozen"].discard(adapter_name)
        state["active"] = [n for n in state["active"] if n != adapter_name]

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold LoRA adapters (default: the active ones) into the base weights; forward then
        costs what the base costs. :meth:`unmerge_adapter` restores the base weights."""
        names = self._mergeable(adapter_names)
        for _, layer in self._tuner_layers():
            if hasattr(layer, "lora_A"):
                layer.merge([n for n in names if n in layer.adapter_names], safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        for _, layer in self._tuner_layers():
            layer.unmerge()

    def _mergeable(self, adapter_names: list[str] | None) -> list[str]:
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        for name in names:
            config = self.peft_config[self._require_adapter(name, "adapter_names")]
            if not config.mergeable:
                raise ConfigError("adapter_names", f"{name!r} is a {type(config).__name__} adapter, which cannot be merged into "
                                  "the base weights (only LoRA / DoRA can); delete it or keep it unmerged")
        from seekdeep.peft.lora import LoRALinear

        for path, layer in self._tuner_layers():  # checked on every layer before any is merged
            for name in names:
                if isinstance(layer, LoRALinear) and layer.lora_bias_unmergeable(name):
                    raise ConfigError("lora_bias", f"adapter {name!r} has a LoRA bias on {path}, which has no bias to merge "
                                      "it into; keep the adapter unmerged (as peft does)")
        return names

    def merge_and_unload(self, adapter_names: list[str] | None = None, safe_merge: bool = False):
        """Merge LoRA adapters (default: the active ones) into the base weights, then remove every
        adapter wrapper; ``modules_to_save`` copies of those adapters replace the originals.
        Returns the model (a plain model again, every parameter trainable as before adapters)."""
        names = self._mergeable(adapter_names)
        self.merge_adapter(names, safe_merge=safe_merge)
        from seekdeep.peft.layers import ModulesToSaveWrapper

        for path, layer in list(self._tuner_layers()):
            if isinstance(layer, ModulesToSaveWrapper):
                owner = next((n for n in names if n in layer.adapter_names), None)
                _replace(self, path, layer.unloaded_with(owner))
            else:
                _replace(self, path, layer.base_layer)
        self._clear_adapters()
        return self

    def unload(self):
        """Remove every adapter without merging; returns the base model."""
        self.unmerge_adapter()
        for path, layer in list(self._tuner_layers()):
            _replace(self, path, layer.base_layer)
        self._clear_adapters()
        return self

    def _clear_adapters(self) -> None:
        if self._prompt_encoders() is not None:
            self._remove_prompt_support()
        for handle in self._peft_state()["bridges"] or []:
            handle.remove()
        self.__dict__.pop("_peft", None)
        for param in self.parameters():
            param.requires_grad_(True)

    def _remove_prompt_support(self) -> None:
        state = self._peft_state()
        if state["hooks"] is not None:
            state["hooks"].remove()
            state["hooks"] = None
        del self._modules["prompt_encoder"]

    # -- persistence
    def save_adapter(self, save_directory: str | os.PathLike, adapter_name: str | None = None) -> None:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` in peft's layout."""
        from seekdeep.peft.io import save_adapter

        save_adapter(self, save_directory, adapter_name)

    def load_adapter(self, path: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False) -> None:
        """Add the adapter saved at ``path`` (by seekdeep or peft) as ``adapter_name`` and make it
        active; it is frozen unless ``is_trainable``."""
        from seekdeep.peft.io import load_adapter

        load_adapter(self, path, adapter_name=adapter_name, is_trainable=is_trainable)

    # -- reporting
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts; tied tensors count once."""
        seen, trainable, total = set(), 0, 0
        for param in self.parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            total += param.numel()
            trainable += param.numel() if param.requires_grad else 0
        return trainable, total

    def trainable_parameters_report(self) -> dict[str, Any]:
        """Counts for the whole model and per adapter: ``{"trainable", "total", "percent",
        "adapters": {name: {"type", "parameters", "active", "trainable"}}}``."""
        trainable, total = self.get_nb_trainable_parameters()
        active = set(self.active_adapters)
        adapters = {}
        for name, config in self.peft_config.items():
            params = self._adapter_parameters(name)
            adapters[name] = {"type": config.peft_type, "parameters": sum(p.numel() for p in params),
                              "active": name in active, "trainable": any(p.requires_grad for p in params)}
        return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1), "adapters": adapters}

    def print_trainable_parameters(self) -> None:
        report = self.trainable_parameters_report()
        print(f"trainable params: {report['trainable']:,d} || all params: {report['total']:,d} || "
              f"trainable%: {report['percent']:.4f}")


# ----------------------------------------------------------------------------- injection


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    from seekdeep.peft.layers import replace_module

    replace_module(model, path, module)


def _inject(model: nn.Module, name: str, config) -> None:
    """Wrap the modules ``config`` targets (validating them all before touching the model)."""
    from seekdeep.peft.adapters import BottleneckLayer
    from seekdeep.peft.config import BottleneckConfig, LoRAConfig, PromptTuningConfig
    from seekdeep.peft.layers import ModulesToSaveWrapper, TunerLayer, is_linear_like, match_targets
    from seekdeep.peft.lora import LoRALinear, base_weight

    plan: list[tuple[str, type]] = []
    if isinstance(config, (LoRAConfig, BottleneckConfig)):
        layer_cls = LoRALinear if isinstance(config, LoRAConfig) else BottleneckLayer
        targets = config.target_modules if config.target_modules is not None else ["q_proj", "v_proj"]
        for path in match_targets(model, targets, config.exclude_modules):
            module = model.get_submodule(path)
            if isinstance(module, TunerLayer) and not isinstance(module, layer_cls):
                raise ConfigError("target_modules", f"{path} already carries a {module.kind} adapter "
                                  f"({', '.join(module.adapter_names)}); adapters of different kinds must target different modules")
            base = module.base_layer if isinstance(module, TunerLayer) else module
            if not is_linear_like(base):
                raise ConfigError("target_modules", f"{path} is a {type(base).__name__}, not a linear layer; "
                                  f"{layer_cls.kind} adapters wrap layers with in_features / out_features (nn.Linear or a "
                                  f"quantized linear); train it in full with modules_to_save=[{path.rsplit('.', 1)[-1]!r}]")
            if isinstance(config, LoRAConfig) and config.use_dora:
                base_weight(base)  # raises when DoRA cannot see the base weight
            plan.append((path, layer_cls))
    targeted = {path for path, _ in plan}
    if config.modules_to_save:
        for path in match_targets(model, config.modules_to_save, None, "modules_to_save"):
            module = model.get_submodule(path)
            if _shares_parameters(model, module):
                raise ConfigError("modules_to_save", f"{path} shares its weights with another module (tied embeddings); "
                                  "a trained copy would untie them. Adapt it with LoRA instead, or use an untied base")
            if path in targeted or (isinstance(module, TunerLayer) and not isinstance(module, ModulesToSaveWrapper)):
                raise ConfigError("modules_to_save", f"{path} also carries an adapter; a module is either adapted or "
                                  "trained in full, not both")
            plan.append((path, ModulesToSaveWrapper))

    for path, layer_cls in plan:
        module = model.get_submodule(path)
        if not isinstance(module, layer_cls):
            module = layer_cls(module)
            module.active = model.active_adapters
            module.disabled = model.adapters_disabled
            _replace(model, path, module)
        if layer_cls is ModulesToSaveWrapper:
            module.add(name)
        elif layer_cls is LoRALinear:
            module.add(name, config, path)
        else:
            module.add(name, config)
        module.train(model.training)  # new slots follow the model's mode (dropout off in eval)
    if isinstance(config, PromptTuningConfig):
        _add_prompt(model, name, config)
        model.prompt_encoder.train(model.training)


def _shares_parameters(model: nn.Module, module: nn.Module) -> bool:
    own = {id(p) for p in module.parameters()}
    inside = {id(m) for m in module.modules()}
    return any(id(p) in own for m in model.modules() if id(m) not in inside
               for p in m.parameters(recurse=False))


def _add_prompt(model: nn.Module, name: str, config) -> None:
    from seekdeep.peft.prompt import PromptEmbedding, PromptHooks

    embed = model.get_submodule("model.embed_tokens")
    embed = getattr(embed, "original_module", embed)
    prompt = PromptEmbedding(config, embed)  # may raise: nothing is attached before it exists
    if "prompt_encoder" not in model._modules:
        model.add_module("prompt_encoder", nn.ModuleDict())
    model.prompt_encoder[name] = prompt
    state = model._peft_state()
    if state["hooks"] is None:
        state["hooks"] = PromptHooks(model, _active_prompt)


def _active_prompt(model: nn.Module):
    state = model._peft_state()
    encoders = model._modules.get("prompt_encoder")
    if state["disabled"] or encoders is None:
        return None
    return next((encoders[n] for n in state["active"] if n in encoders), None)


__all__ = ["AdapterMixin", "AdapterSwitch"]
