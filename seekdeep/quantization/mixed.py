"""Mixed precision: 4, 8 or 16 bits per layer, chosen by measured sensitivity under a size
budget.

1. :func:`layer_sensitivity`: for every layer and every bit width, the held-out loss increase
   when only that layer is quantised (its weight is replaced by the quantised-dequantised
   weight the converter would produce, then restored).
2. :func:`assign_bits`: start every layer at its smallest width and spend the budget on the
   upgrades that buy the largest loss reduction per byte (a greedy knapsack).
3. :func:`mixed_precision_config` does both and returns a ``QuantConfig`` (method
   ``weight_only`` with ``layer_bits``) to ``apply``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from seekdeep.errors import ConfigError
from seekdeep.quantization.config import LAYER_BITS, QuantConfig, resolve_plan
from seekdeep.quantization.convert import iter_token_batches, model_size_bytes
from seekdeep.quantization.modules import LAYER_CLASSES
from seekdeep.quantization.qat import fake_quantize_weight
from seekdeep.train.evaluation import mean_loss  # re-exported as seekdeep.quantization.mean_loss


def _choices(bits: Sequence[int]) -> tuple[int, ...]:
    if isinstance(bits, (str, bytes)) or not bits or any(isinstance(b, bool) or b not in LAYER_BITS for b in bits):
        raise ConfigError("bits", f"must be a non-empty subset of {LAYER_BITS}, got {bits!r}")
    return tuple(sorted(set(bits)))


def _scheme_config(group_size: int, symmetric: bool | None, skip: Sequence[str]) -> QuantConfig:
    return QuantConfig(method="weight_only", bits=4, group_size=group_size, symmetric=symmetric, skip=list(skip))


def layer_sensitivity(model: nn.Module, batches: Any, bits: Sequence[int] = (4, 8, 16), group_size: int = 128,
                      symmetric: bool | None = None, skip: Sequence[str] = ()) -> dict[str, dict[int, float]]:
    """``{layer: {bits: held-out loss increase}}`` from quantising that layer alone.

    ``batches``: (batch, seq) input-id tensors held out from training. A width a layer cannot
    take (a group size that does not divide it) is left out of its entry. A tied input
    embedding is measured through ``lm_head``, which carries the shared weight."""
    choices = _choices(bits)
    batches = list(iter_token_batches(model, batches, field="batches", method="layer_sensitivity"))
    cfg = _scheme_config(group_size, symmetric, skip)
    plan = _layer_kinds(model, skip)
    base = mean_loss(model, batches)
    out: dict[str, dict[int, float]] = {}
    for name, kind in plan.items():
        if kind == "tied":
            continue
        module = model.get_submodule(name)
        out[name] = {}
        for b in choices:
            try:
                scheme = cfg.scheme_for(module, name, b)
            except ConfigError:  # group size does not divide this layer
                continue
            original = module.weight.data
            module.weight.data = fake_quantize_weight(original, scheme).detach()
            try:
                out[name][b] = mean_loss(model, batches) - base
            finally:
                module.weight.data = original
    return out


def _layer_kinds(model: nn.Module, skip: Sequence[str]) -> dict[str, str]:
    """Planned layer name -> kind, resolved at 8 bits (no group-size check) to list the layers."""
    probe = QuantConfig(method="weight_only", bits=8, skip=list(skip))
    return {name: scheme.kind for name, scheme in resolve_plan(model, probe).items()}


def layer_bytes(module: nn.Module, bits: int, group_size: int = 128, symmetric: bool | None = None) -> int:
    """Bytes the layer's state takes at ``bits`` (weight-only kinds), from the real module."""
    cfg = _scheme_config(group_size, symmetric, ())
    scheme = cfg.scheme_for(module, "layer", bits)
    cls = LAYER_CLASSES[scheme.kind]
    with torch.device("meta"):
        empty = cls.empty(module, scheme)
    return sum(t.numel() * t.element_size() for t in empty.state_dict().values())


def assign_bits(sensitivity: dict[str, dict[int, float]], sizes: dict[str, dict[int, int]], budget_bytes: float,
                fixed_bytes: int = 0) -> dict[str, int]:
    """Bits per layer with ``fixed_bytes + sum(sizes[layer][bits]) <= budget_bytes``, greedily
    buying the largest loss reduction per byte. Raises ConfigError('budget') when even the
    smallest widths do not fit."""
    current = {name: min(sizes[name]) for name in sizes}
    used = fixed_bytes + sum(sizes[name][b] for name, b in current.items())
    if used > budget_bytes:
        raise ConfigError("budget", f"{budget_bytes:.0f} bytes is below the smallest reachable size {used} bytes "
                          f"(every layer at its smallest width)")
    while True:
        best, best_rate = None, 0.0
        for name, b_now in current.items():
            for b in sizes[name]:
                if b <= b_now:
                    continue
                extra = sizes[name][b] - sizes[name][b_now]
                gain = sensitivity[name].get(b_now, math.inf) - sensitivity[name].get(b, math.inf)
                if used + extra > budget_bytes or not gain > 0:
                    continue
                rate = gain / max(extra, 1)
                if rate > best_rate:
                    best, best_rate = (name, b, extra), rate
        if best is None:
            return current
        name, b, extra = best
        current[name] = b
        used += extra


def mixed_precision_config(model: nn.Module, batches: Any, budget: float, bits: Sequence[int] = (4, 8, 16),
                           group_size: int = 128, symmetric: bool | None = None, skip: Sequence[str] = (),
                           sensitivity: dict[str, dict[int, float]] | None = None) -> QuantConfig:
    """A weight-only ``QuantConfig`` whose ``layer_bits`` keep the quantised model within
    ``budget`` (a fraction in (0, 1] of the model's current size in bytes) at the least
    measured loss. ``sensitivity``: reuse an earlier :func:`layer_sensitivity` result."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ConfigError("budget", f"must be a fraction of the model size in (0, 1], got {budget!r}")
    choices = _choices(bits)
    if sensitivity is None:
        sensitivity = layer_sensitivity(model, batches, choices, group_size, symmetric, skip)
    float_bytes = model_size_bytes(model)
    sizes: dict[str, dict[int, int]] = {}
    float_layer_bytes = 0
    for name, per_bits in sensitivity.items():
        module = model.get_submodule(name)
        sizes[name] = {b: layer_bytes(module, b, group_size, symmetric) for b in per_bits}
        float_layer_bytes += sum(t.numel() * t.element_size() for t in module.state_dict().values())
    if not sizes:
        raise ConfigError("skip", "leaves no module to quantise")
    assignment = assign_bits(sensitivity, sizes, budget * float_bytes, float_bytes - float_layer_bytes)
    uses_int4 = 4 in assignment.values()
    return QuantConfig(method="weight_only", bits=4 if uses_int4 else 8, group_size=group_size if uses_int4 else None,
                       symmetric=symmetric, skip=list(skip), layer_bits=assignment)
