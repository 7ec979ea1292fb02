"""``QuantConfig`` (what the user asks for) and ``LayerScheme`` (what one layer becomes).

A config is resolved against a model into a plan ``{module name: LayerScheme}``; the plan is
what config.json stores (``quantization_config.modules``), so a checkpoint rebuilds exactly
the modules it was saved with whatever defaults change later.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from torch import nn

from seekdeep.errors import ConfigError
from seekdeep.validate import check_float, check_int
from seekdeep.quantization.kernels import INT4_GROUP_SIZES
from seekdeep.quantization.observers import OBSERVERS

METHODS = ("static", "dynamic", "weight_only", "qat")
BITS = (8, 4)
LAYER_BITS = (4, 8, 16)
QUANT_METHOD_TAG = "seekdeep"  # config.json's quantization_config.quant_method

#: What a layer can become. ``tied``: an embedding that reads the rows of the quantised
#: ``lm_head`` it shares its weight with; ``bf16``: 16-bit weights (mixed precision).
LINEAR_KINDS = ("int8_static", "int8_dynamic", "int8_weight_only", "int4_weight_only", "bf16")
EMBEDDING_KINDS = ("int8_embedding", "int4_embedding", "bf16_embedding", "tied")
KINDS = LINEAR_KINDS + EMBEDDING_KINDS

#: Module-name fragments never quantised: attention backends' own projections (the DSA
#: indexer, the attention gate) are small and decide routing / gating.
ALWAYS_FLOAT = (".inner.",)


@dataclass
class LayerScheme:
    kind: str
    group_size: int | None = None  # int4 kinds
    symmetric: bool = True  # int4 weights; int8_static activations
    per_channel: bool = True  # int8 weights

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError("kind", f"unknown layer kind {self.kind!r}; accepted: {', '.join(KINDS)}")

    @property
    def bits(self) -> int:
        if self.kind.startswith("int8"):
            return 8
        if self.kind.startswith("int4"):
            return 4
        return 16

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any], name: str = "") -> "LayerScheme":
        if not isinstance(d, dict) or "kind" not in d:
            raise ConfigError(f"quantization_config.modules.{name}", f"expected an object with a 'kind', got {d!r:.80}")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"quantization_config.modules.{name}", f"unknown keys {sorted(unknown)}")
        return cls(**d)


@dataclass
class QuantConfig:
    """How to quantise a model; ``QuantConfig(...).apply(model, calibration_data)``.

    method: ``static`` (int8 weights and int8 activations with scales calibrated on
        ``calibration_data``), ``dynamic`` (int8 weights, activations quantised per token at
        run time), ``weight_only`` (int8 per channel or int4 group-wise weights, bf16
        activations) or ``qat`` (fake-quantised fine-tuning on ``calibration_data``, then
        conversion: bits=4 -> int4 weight-only, bits=8 -> int8 dynamic).
    bits: 8 or 4 (4 only for weight_only / qat).
    group_size: int4 group along the input dimension (32, 64, 128, 256; default 128).
    observe_steps: calibration batches used at most (static).
    observer: activation range for static: ``minmax`` | ``percentile`` | ``mse``.
    percentile: for the percentile observer.
    per_channel: int8 weight scales per output channel (else one per tensor).
    symmetric: activations (static) and int4 weights; default True for int8 activations,
        False (min/max with a zero point) for int4 weights.
    skip: module names or fnmatch patterns kept in float (``"lm_head"``, ``"*.down_proj"``).
    layer_bits: per-module bits 4 / 8 / 16 overriding ``bits`` (weight_only; see
        :func:`seekdeep.quantization.mixed_precision_config`).
    qat_steps, qat_lr: the fine-tune of method ``qat``.
    """

    method: str = "static"
    bits: int = 8
    group_size: int | None = None
    observe_steps: int = 1024
    observer: str = "minmax"
    percentile: float = 99.99
    per_channel: bool = True
    symmetric: bool | None = None
    skip: list[str] = field(default_factory=list)
    layer_bits: dict[str, int] | None = None
    qat_steps: int = 100
    qat_lr: float = 1e-4

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError("method", f"unknown method {self.method!r}; accepted: {', '.join(METHODS)}")
        if isinstance(self.bits, bool) or self.bits not in BITS:
            raise ConfigError("bits", f"unsupported bits={self.bits!r}; accepted: 8, 4")
        if self.bits == 4 and self.method in ("static", "dynamic"):
            raise ConfigError("bits", f"method {self.method!r} quantises activations to int8 and needs bits=8; "
                              "for 4-bit weights use method='weight_only' or 'qat'")
        uses_int4 = self.bits == 4 or 4 in (self.layer_bits or {}).values()
        if self.group_size is None and uses_int4:
            self.group_size = 128
        if self.group_size is not None:
            if not uses_int4:
                raise ConfigError("group_size", f"int8 weights are quantised per channel; group_size={self.group_size!r} "
                                  "applies to bits=4 only (accepted here: None)")
            if isinstance(self.group_size, bool) or self.group_size not in INT4_GROUP_SIZES:
                raise ConfigError("group_size", f"unsupported {self.group_size!r}; accepted: "
                                  f"{', '.join(map(str, INT4_GROUP_SIZES))} (what torch's int4 kernels take)")
        check_int("observe_steps", self.observe_steps)
        if self.observer not in OBSERVERS:
            raise ConfigError("observer", f"unknown observer {self.observer!r}; accepted: {', '.join(OBSERVERS)}")
        if not isinstance(self.percentile, (int, float)) or not 50 < self.percentile <= 100:
            raise ConfigError("percentile", f"must be in (50, 100], got {self.percentile!r}")
        if not isinstance(self.per_channel, bool):
            raise ConfigError("per_channel", f"must be True or False, got {self.per_channel!r}")
        if self.symmetric is not None and not isinstance(self.symmetric, bool):
            raise ConfigError("symmetric", f"must be True, False or None (per-method default), got {self.symmetric!r}")
        if isinstance(self.skip, str) or not isinstance(self.skip, (list, tuple)) or \
                not all(isinstance(s, str) and s for s in self.skip):
            raise ConfigError("skip", f"must be a list of module names or patterns, got {self.skip!r}")
        self.skip = list(self.skip)
        if self.layer_bits is not None:
            if self.method != "weight_only":
                raise ConfigError("layer_bits", f"per-layer bits need method='weight_only', got method={self.method!r}")
            if not isinstance(self.layer_bits, dict):
                raise ConfigError("layer_bits", f"must be a dict of module name -> 4 / 8 / 16, got {type(self.layer_bits).__name__}")
            for name, b in self.layer_bits.items():
                if isinstance(b, bool) or b not in LAYER_BITS:
                    raise ConfigError("layer_bits", f"{name!r}: unsupported bits {b!r}; accepted: 4, 8, 16")
        check_int("qat_steps", self.qat_steps)
        check_float("qat_lr", self.qat_lr, 0, 10, lo_open=True)

    # -- JSON
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - {"quant_method", "modules"})
        if unknown:
            raise ConfigError(f"quantization_config.{unknown[0]}", f"unknown key; accepted: {', '.join(sorted(known))}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def apply(self, model: nn.Module, calibration_data=None) -> nn.Module:
        """Quantise ``model`` in place and return it. ``calibration_data``: an iterable of
        input-id tensors (batch, seq) -- required by ``static`` (activation ranges) and ``qat``
        (the fine-tune), not used by the others."""
        from seekdeep.quantization.convert import quantize

        return quantize(model, self, calibration_data)

    # -- resolution against a model
    def activation_symmetric(self) -> bool:
        return True if self.symmetric is None else self.symmetric

    def int4_symmetric(self) -> bool:
        return False if self.symmetric is None else self.symmetric

    def linear_kind(self, bits: int) -> str:
        if bits == 16:
            return "bf16"
        if self.method == "static":
            return "int8_static"
        if self.method == "dynamic" or (self.method == "qat" and bits == 8):
            return "int8_dynamic"
        return "int8_weight_only" if bits == 8 else "int4_weight_only"

    def scheme_for(self, module: nn.Module, name: str, bits: int) -> LayerScheme:
        if isinstance(module, nn.Embedding):
            kind = {8: "int8_embedding", 4: "int4_embedding", 16: "bf16_embedding"}[bits]
            in_features = module.embedding_dim
        else:
            kind = self.linear_kind(bits)
            in_features = module.in_features
        if bits != 4:
            per_channel = self.per_channel or isinstance(module, nn.Embedding)  # embedding rows: one scale each
            return LayerScheme(kind, per_channel=per_channel,
                               symmetric=self.activation_symmetric() if kind == "int8_static" else True)
        if in_features % self.group_size:
            valid = [g for g in INT4_GROUP_SIZES if in_features % g == 0]
            raise ConfigError("group_size", f"{self.group_size} does not divide in_features={in_features} of {name!r}; "
                              f"accepted for this layer: {valid or 'none (skip it)'}, or skip={[name]!r}")
        return LayerScheme(kind, group_size=self.group_size, symmetric=self.int4_symmetric())


def quantizable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` / ``nn.Embedding`` a config may quantise, by qualified name."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Embedding)) and name
        and not any(frag in f".{name}." for frag in ALWAYS_FLOAT)
    }


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def resolve_plan(model: nn.Module, cfg: QuantConfig) -> dict[str, LayerScheme]:
    """``{module name: LayerScheme}`` for ``model`` under ``cfg``; skipped modules are absent.

    A tied input embedding follows ``lm_head``: it becomes ``tied`` (reading the rows of the
    quantised ``lm_head``) and stays float when ``lm_head`` is skipped."""
    candidates = quantizable_modules(model)
    for pattern in cfg.skip:
        if not any(_matches(name, pattern) for name in candidates):
            raise ConfigError("skip", f"pattern {pattern!r} matches no quantisable module; names look like "
                              f"{sorted(candidates)[:4]}")
    layer_bits = dict(cfg.layer_bits or {})
    unknown = sorted(set(layer_bits) - set(candidates))
    if unknown:
        raise ConfigError("layer_bits", f"{unknown[0]!r} is not a quantisable module; names look like {sorted(candidates)[:4]}")
    tied = _tied_embedding_names(model, candidates)
    for name in tied:
        if name in layer_bits:
            raise ConfigError("layer_bits", f"{name!r} shares its weight with 'lm_head'; set the bits of 'lm_head' instead")
    plan: dict[str, LayerScheme] = {}
    for name, module in candidates.items():
        if name in tied or any(_matches(name, p) for p in cfg.skip):
            continue
        plan[name] = cfg.scheme_for(module, name, layer_bits.get(name, cfg.bits))
    head = plan.get("lm_head")
    for name in tied:
        if any(_matches(name, p) for p in cfg.skip):
            continue  # untied: the embedding keeps the float weight, lm_head is quantised alone
        if head is not None:
            plan[name] = LayerScheme("tied")
    return plan


def _tied_embedding_names(model: nn.Module, candidates: dict[str, nn.Module]) -> list[str]:
    head = candidates.get("lm_head")
    if not isinstance(head, nn.Linear):
        return []
    return [name for name, m in candidates.items()
            if isinstance(m, nn.Embedding) and m.weight is head.weight]
