"""What every adapter wrapper shares, the ``modules_to_save`` wrapper, and how target module
names are matched (the rules peft uses, so one ``target_modules`` list means the same thing
in both)."""

from __future__ import annotations

import copy
import re
from typing import Iterable, Iterator

import torch
from torch import nn

from seekdeep.errors import ConfigError
from seekdeep.peft.config import ALL_LINEAR


class TunerLayer(nn.Module):
    """Wraps ``base_layer`` (left untouched) and keeps each adapter's weights in named slots
    (``nn.ModuleDict`` entries keyed by adapter name, listed in ``slot_names``).

    ``active``: adapter names applied in forward (a name without a slot here is skipped);
    ``disabled``: forward is the base layer alone."""

    #: attributes holding one ``nn.ModuleDict`` of per-adapter modules each
    slot_names: tuple[str, ...] = ()
    kind = ""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.active: list[str] = []
        self.disabled = False
        for slot in self.slot_names:
            setattr(self, slot, nn.ModuleDict())

    @property
    def adapter_names(self) -> list[str]:
        return list(getattr(self, self.slot_names[0]).keys())

    def active_here(self) -> list[str]:
        names = self.adapter_names
        return [] if self.disabled else [n for n in self.active if n in names]

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        for slot in self.slot_names:
            modules = getattr(self, slot)
            if name in modules:
                yield from modules[name].parameters()

    def delete(self, name: str) -> None:
        for slot in self.slot_names:
            modules = getattr(self, slot)
            if name in modules:
                del modules[name]
        self.active = [n for n in self.active if n != name]

    def merge(self, names: list[str], safe_merge: bool = False) -> None:
        raise ConfigError("adapter_names", f"{self.kind} adapters {names} are not linear in the input and cannot be "
                          "merged into the base weights; merge LoRA adapters only")

    def unmerge(self) -> None:
        pass

    @property
    def merged(self) -> list[str]:
        return []

    def unloaded(self) -> nn.Module:
        """The module that takes this wrapper's place once adapters are removed."""
        return self.base_layer


class ModulesToSaveWrapper(TunerLayer):
    """A module trained in full for an adapter: each adapter owns a copy
    (``modules_to_save.<name>``); forward runs the first active adapter's copy, or the
    untouched ``original_module``. (peft's layout and key names.)"""

    slot_names = ("modules_to_save",)
    kind = "modules_to_save"

    def __init__(self, original_module: nn.Module):
        nn.Module.__init__(self)
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active, self.disabled = [], False

    @property
    def base_layer(self) -> nn.Module:  # type: ignore[override]
        return self.original_module

    def add(self, name: str) -> None:
        replica = copy.deepcopy(self.original_module)
        for param in replica.parameters():
            param.requires_grad_(True)
        self.modules_to_save[name] = replica

    def forward(self, *args, **kwargs):
        names = self.active_here()
        module = self.modules_to_save[names[0]] if names else self.original_module
        return module(*args, **kwargs)

    def __getattr__(self, name: str):
        # code outside (e.g. tie_weights, ``lm_head.weight``) reads the wrapped module's attributes
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if name.startswith("_") or "original_module" not in modules:  # e.g. mid-deepcopy
                raise
            return getattr(modules["original_module"], name)

    def unloaded_with(self, name: str | None) -> nn.Module:
        return self.modules_to_save[name] if name is not None and name in self.modules_to_save else self.original_module

    def unloaded(self) -> nn.Module:
        names = self.active_here()
        return self.unloaded_with(names[0] if names else None)


# ----------------------------------------------------------------------------- target matching


def is_linear_like(module: nn.Module) -> bool:
    """A layer LoRA can wrap: an ``nn.Linear`` or anything mapping ``in_features`` to
    ``out_features`` in its forward (e.g. an int8 / int4 quantized linear)."""
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int)
            and not isinstance(module, (nn.Embedding, TunerLayer)))


def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` for every module a target may name: the wrappers themselves, never
    the modules inside them (base layers, adapter weights) and never the model itself."""
    stack: list[tuple[str, nn.Module]] = [(name, child) for name, child in reversed(list(model.named_children()))]
    while stack:
        name, module = stack.pop()
        yield name, module
        if isinstance(module, TunerLayer):
            continue
        stack.extend((f"{name}.{child_name}", child) for child_name, child in reversed(list(module.named_children())))


def _suffix_match(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def _is_output_layer(model: nn.Module, name: str, module: nn.Module) -> bool:
    head = getattr(model, "lm_head", None)
    return name == "lm_head" or module is head or (isinstance(head, TunerLayer) and module is head.base_layer)


def match_targets(model: nn.Module, targets: list[str] | str, excludes: list[str] | str | None,
                  field: str = "target_modules") -> list[str]:
    """Names of the modules ``targets`` selects (peft's rules): a list matches a module whose
    name equals an entry or ends with ``"." + entry``; a string is a regular expression matched
    against the whole name; ``"all-linear"`` is every linear-like layer but the output head and
    the attention backends' own layers (``*.inner.*``, e.g. the DSA indexer). Every list entry
    must match something: a name that matches nothing is an error, not a no-op."""
    modules = list(candidate_modules(model))
    if targets == ALL_LINEAR:
        chosen = [n for n, m in modules if (is_linear_like(m) or (isinstance(m, TunerLayer) and is_linear_like(m.base_layer)))
                  and not _is_output_layer(model, n, m) and ".inner." not in f".{n}."]
    elif isinstance(targets, str):
        chosen = [n for n, _ in modules if re.fullmatch(targets, n)]
        if not chosen:
            raise ConfigError(field, f"the regular expression {targets!r} matches no module of {type(model).__name__}; "
                              f"{_available(modules)}")
    else:
        chosen = []
        for key in targets:
            found = [n for n, _ in modules if _suffix_match(n, key)]
            if not found:
                raise ConfigError(field, f"{key!r} matches no module of {type(model).__name__}; {_available(modules)}")
            chosen.extend(n for n in found if n not in chosen)
    if excludes:
        excluded = set(match_targets(model, excludes, None, "exclude_modules"))
        chosen = [n for n in chosen if n not in excluded]
    if not chosen:
        raise ConfigError(field, f"selects no module of {type(model).__name__} (after exclude_modules); {_available(modules)}")
    order = {n: i for i, (n, _) in enumerate(modules)}
    return sorted(chosen, key=order.__getitem__)


def _available(modules: Iterable[tuple[str, nn.Module]]) -> str:
    short = sorted({n.rsplit(".", 1)[-1] for n, m in modules
                    if is_linear_like(m) or (isinstance(m, TunerLayer) and is_linear_like(m.base_layer))})
    return f"its linear layers are named: {', '.join(short)} (or use 'all-linear' / a regular expression)"


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, child = get_submodule_parent(model, name)
    setattr(parent, child, new)


def module_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device of the module's first tensor and its floating dtype (float32 when it holds only
    integer / quantized tensors)."""
    tensors = list(module.parameters()) + list(module.buffers())
    device = tensors[0].device if tensors else torch.device("cpu")
    floats = [t.dtype for t in tensors if t.is_floating_point()]
    return device, (floats[0] if floats else torch.float32)
