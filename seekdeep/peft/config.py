"""Adapter configurations: LoRA (with rsLoRA scaling and DoRA), bottleneck adapters and prompt
tuning. Each is a typed dataclass validated in ``__post_init__``; ``to_dict`` writes the
``adapter_config.json`` that peft reads (LoRA, prompt tuning) and ``from_dict`` reads peft's
files, refusing settings seekdeep does not implement instead of dropping them."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from seekdeep.errors import ConfigError

#: target_modules value selecting every linear layer except the output head (as in peft).
ALL_LINEAR = "all-linear"
TASK_TYPE = "CAUSAL_LM"

# Keys peft writes that describe the file, not the adapter: read and ignored.
_METADATA_KEYS = {"auto_mapping", "revision", "peft_version", "megatron_core", "inference_mode", "qalora_group_size",
                  "num_transformer_submodules", "num_attention_heads", "num_layers", "token_dim", "tokenizer_kwargs"}


#: ranks, bottleneck widths and virtual tokens: past any model's hidden size
MAX_WIDTH = 1 << 16


def _require_int(value: Any, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_WIDTH:
        raise ConfigError(name, f"must be an integer in [{minimum}, {MAX_WIDTH}], got {value!r}")


def _require_probability(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(name, f"must be a number in [0, 1), got {value!r}")


def _module_names(value: Any, name: str, allow_none: bool = True) -> list[str] | str | None:
    """A list of module-name suffixes, a regular expression (one string) or ``all-linear``."""
    if value is None:
        if allow_none:
            return None
        raise ConfigError(name, "is required: a list of module names (e.g. ['q_proj', 'v_proj']), a regular "
                          f"expression or {ALL_LINEAR!r}")
    if isinstance(value, str):
        if not value:
            raise ConfigError(name, "is an empty string; give module names, a regular expression or 'all-linear'")
        if value != ALL_LINEAR:
            try:
                re.compile(value)
            except re.error as exc:
                raise ConfigError(name, f"{value!r} is not a valid regular expression ({exc})") from None
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
        if not items or not all(isinstance(v, str) and v for v in items):
            raise ConfigError(name, f"must be a non-empty list of module names, got {value!r}")
        return items
    raise ConfigError(name, f"expected a list of module names, a regular expression or {ALL_LINEAR!r}, "
                      f"got {type(value).__name__}")


def _check_no_unsupported(data: dict[str, Any], known: set[str], kind: str, source: str | None) -> dict[str, Any]:
    """The keys of ``data`` this config implements; other keys must hold a neutral value
    (None, False, empty) or the file asks for something seekdeep would silently not do."""
    kept = {}
    for key, value in data.items():
        if key in known:
            kept[key] = value
        elif key in _METADATA_KEYS or key == "peft_type":
            continue
        elif value not in (None, False, {}, [], ""):
            raise ConfigError(key, f"{value!r} is not supported by seekdeep's {kind} (only the default is); "
                              f"supported keys: {', '.join(sorted(known))}", source=source)
    return kept


@dataclass
class AdapterConfig:
    """What every adapter config shares; subclasses set ``peft_type``."""

    peft_type: ClassVar[str] = ""
    mergeable: ClassVar[bool] = False

    def to_dict(self) -> dict[str, Any]:
        return {"peft_type": self.peft_type, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> "AdapterConfig":
        if not isinstance(data, dict):
            raise ConfigError("adapter_config", f"must be a JSON object, got {type(data).__name__}", source=source)
        peft_type = data.get("peft_type")
        config_cls = CONFIG_CLASSES.get(str(peft_type).upper()) if cls is AdapterConfig else cls
        if config_cls is None:
            raise ConfigError("peft_type", f"{peft_type!r} is not supported; accepted: {', '.join(CONFIG_CLASSES)}",
                              source=source)
        if cls is not AdapterConfig and peft_type is not None and str(peft_type).upper() != cls.peft_type:
            raise ConfigError("peft_type", f"{peft_type!r} in a {cls.__name__}; expected {cls.peft_type!r}", source=source)
        task_type = data.get("task_type")
        if task_type not in (None, TASK_TYPE):
            raise ConfigError("task_type", f"{task_type!r} is not supported; seekdeep models are causal LMs "
                              f"(accepted: {TASK_TYPE!r} or null)", source=source)
        known = {f.name for f in fields(config_cls)}
        kept = _check_no_unsupported(data, known, config_cls.__name__, source)
        try:
            return config_cls(**kept)
        except ConfigError as exc:
            raise ConfigError(exc.field, str(exc).split(": ", 1)[-1], source=source) from None


@dataclass
class LoRAConfig(AdapterConfig):
    """Low-rank adaptation: ``W x + scaling * B(A(dropout(x)))`` on every target module.

    ``r``: rank; ``lora_alpha``: scaling numerator (``alpha / r``, or ``alpha / sqrt(r)`` with
    ``use_rslora``); ``target_modules``: module-name suffixes (``["q_proj", "v_proj"]``), one
    regular expression matched against the full module name, or ``"all-linear"`` (every linear
    layer except ``lm_head`` and the attention backends' own layers); ``None`` means
    ``["q_proj", "v_proj"]``. ``exclude_modules`` removes matches the same way.
    ``modules_to_save``: modules trained in full and saved with the adapter (e.g. ``lm_head``).
    ``use_dora``: weight-decomposed LoRA (a learned magnitude per output row).
    ``init_lora_weights``: True (A Kaiming-uniform, B zero: the adapter starts as a no-op),
    ``"gaussian"`` (A normal with std 1/r) or False (both random, for tests).
    ``rank_pattern`` / ``alpha_pattern``: per-module rank / alpha overriding ``r`` /
    ``lora_alpha``, keyed by a regular expression matched (as in peft) against the end of the
    module path after a dot: ``{"lm_head": 1}``, ``{"layers\\.0\\..*": 4}``; the first key that
    matches wins. ``lora_bias``: ``lora_B`` gets a bias (zero-initialised, scaled like the
    product), a learned per-output offset; on ``lm_head`` it is a logit bias, which a base with
    a bias-less head cannot merge."""

    peft_type: ClassVar[str] = "LORA"
    mergeable: ClassVar[bool] = True

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    bias: str = "none"
    init_lora_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    lora_bias: bool = False
    base_model_name_or_path: str | None = None
    task_type: str | None = TASK_TYPE

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or not 0 < self.r <= MAX_WIDTH:
            raise ConfigError("r", f"the LoRA rank must be an integer in [1, {MAX_WIDTH}], got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) \
                or not math.isfinite(self.lora_alpha) or not 0 < self.lora_alpha <= 1e6:
            raise ConfigError("lora_alpha", f"must be a number in (0, 1e6], got {self.lora_alpha!r}")
        _require_probability(self.lora_dropout, "lora_dropout")
        self.target_modules = _module_names(self.target_modules, "target_modules")
        self.exclude_modules = _module_names(self.exclude_modules, "exclude_modules")
        self.modules_to_save = _save_list(self.modules_to_save)
        for name in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"must be true or false, got {getattr(self, name)!r}")
        if self.bias != "none":
            raise ConfigError("bias", f"{self.bias!r} is not supported; accepted: 'none' (base biases stay frozen; "
                              "list a module in modules_to_save to train it in full)")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ConfigError("init_lora_weights", f"got {self.init_lora_weights!r}; accepted: true, false, 'gaussian'")
        self.rank_pattern = _pattern_dict(self.rank_pattern, "rank_pattern", integer=True)
        self.alpha_pattern = _pattern_dict(self.alpha_pattern, "alpha_pattern", integer=False)
        if not isinstance(self.lora_bias, bool):
            raise ConfigError("lora_bias", f"must be true or false, got {self.lora_bias!r}")
        if self.lora_bias and self.use_dora:
            raise ConfigError("lora_bias", "cannot be combined with use_dora (as in peft); drop one of them")

    @property
    def scaling(self) -> float:
        """The scaling of a module no pattern overrides."""
        return self._scale(self.lora_alpha, self.r)

    def rank_for(self, path: str) -> int:
        """The rank of the module at ``path`` (``rank_pattern``'s first matching key, else ``r``)."""
        key = _pattern_key(self.rank_pattern, path)
        return self.r if key is None else self.rank_pattern[key]

    def scaling_for(self, path: str) -> float:
        """``alpha / r`` (rsLoRA: ``alpha / sqrt(r)``) of the module at ``path``, patterns applied."""
        key = _pattern_key(self.alpha_pattern, path)
        return self._scale(self.lora_alpha if key is None else self.alpha_pattern[key], self.rank_for(path))

    def _scale(self, alpha: float, r: int) -> float:
        return alpha / (math.sqrt(r) if self.use_rslora else r)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        # the neutral values of peft's other fields, so peft reads exactly this adapter
        d.update({"fan_in_fan_out": False, "layers_to_transform": None, "layers_pattern": None, "inference_mode": True})
        return d


def _pattern_key(patterns: dict[str, Any], path: str) -> str | None:
    """The first key of ``patterns`` matching the end of ``path`` after a dot (peft's rule)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", path):
            return key
    return None


def _pattern_dict(value: Any, name: str, integer: bool) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(name, f"must map module-name patterns to {'ranks' if integer else 'alphas'}, e.g. "
                          f"{{'lm_head': {1 if integer else 2}}}; got {type(value).__name__}")
    for key, number in value.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(name, f"keys must be non-empty module-name patterns, got {key!r}")
        try:
            re.compile(key)
        except re.error as exc:
            raise ConfigError(name, f"{key!r} is not a valid regular expression ({exc})") from None
        ok = isinstance(number, int) if integer else isinstance(number, (int, float)) and math.isfinite(number)
        if isinstance(number, bool) or not ok or number <= 0:
            raise ConfigError(name, f"{key!r}: must be {'an integer' if integer else 'a number'} > 0, got {number!r}")
    return dict(value)


LoraConfig = LoRAConfig  # peft's spelling


@dataclass
class BottleneckConfig(AdapterConfig):
    """Houlsby-style bottleneck adapters: after each target module (by default the attention
    output ``o_proj`` and the MLP output ``down_proj``, i.e. before each residual add),
    ``h + scaling * up(act(down(dropout(h))))`` with ``down``: d -> ``bottleneck_size`` and
    ``up`` initialised to zero so the adapter starts as the identity. Non-linear: not mergeable,
    and a seekdeep format (peft has no such method)."""

    peft_type: ClassVar[str] = "BOTTLENECK"

    bottleneck_size: int = 64
    non_linearity: str = "gelu"
    adapter_dropout: float = 0.0
    scaling: float = 1.0
    target_modules: list[str] | str | None = field(default_factory=lambda: ["o_proj", "down_proj"])
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = TASK_TYPE

    ACTIVATIONS: ClassVar[tuple[str, ...]] = ("relu", "gelu", "silu", "tanh")

    def __post_init__(self) -> None:
        _require_int(self.bottleneck_size, "bottleneck_size", 1)
        if self.non_linearity not in self.ACTIVATIONS:
            raise ConfigError("non_linearity", f"unknown {self.non_linearity!r}; accepted: {', '.join(self.ACTIVATIONS)}")
        _require_probability(self.adapter_dropout, "adapter_dropout")
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)) or not math.isfinite(self.scaling) \
                or not 0 < self.scaling <= 1e3:
            raise ConfigError("scaling", f"must be a number in (0, 1000], got {self.scaling!r}")
        self.target_modules = _module_names(self.target_modules, "target_modules", allow_none=False)
        self.exclude_modules = _module_names(self.exclude_modules, "exclude_modules")
        self.modules_to_save = _save_list(self.modules_to_save)


@dataclass
class PromptTuningConfig(AdapterConfig):
    """Prompt tuning: ``num_virtual_tokens`` learned embeddings placed before the input tokens.

    ``prompt_tuning_init``: ``"RANDOM"`` (normal(0, 1), peft's default), ``"SAMPLE_VOCAB"``
    (rows of the token embedding picked at random: starts in the model's input distribution)
    or ``"TEXT"`` (the embeddings of ``prompt_tuning_init_text`` tokenised by the tokenizer at
    ``tokenizer_name_or_path``, repeated to length). The model's logits, hidden states and loss
    cover the real tokens only (peft returns the virtual positions too)."""

    peft_type: ClassVar[str] = "PROMPT_TUNING"

    num_virtual_tokens: int = 20
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    modules_to_save: list[str] | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = TASK_TYPE

    INITS: ClassVar[tuple[str, ...]] = ("RANDOM", "SAMPLE_VOCAB", "TEXT")

    def __post_init__(self) -> None:
        _require_int(self.num_virtual_tokens, "num_virtual_tokens", 1)
        init = str(self.prompt_tuning_init).upper()
        if init not in self.INITS:
            raise ConfigError("prompt_tuning_init", f"unknown {self.prompt_tuning_init!r}; accepted: {', '.join(self.INITS)}")
        self.prompt_tuning_init = init
        if init == "TEXT" and not (self.prompt_tuning_init_text and self.tokenizer_name_or_path):
            raise ConfigError("prompt_tuning_init_text", "TEXT initialisation needs prompt_tuning_init_text and "
                              "tokenizer_name_or_path")
        self.modules_to_save = _save_list(self.modules_to_save)

    def to_peft_dict(self, model_config) -> dict[str, Any]:
        d = self.to_dict()
        d.update({"num_transformer_submodules": 1, "token_dim": model_config.hidden_size,
                  "num_layers": model_config.num_hidden_layers,
                  "num_attention_heads": model_config.num_attention_heads, "inference_mode": True})
        return d


def _save_list(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError("modules_to_save", f"must be a list of module names (e.g. ['lm_head']), got {value!r}")
    return list(value) or None


CONFIG_CLASSES: dict[str, type[AdapterConfig]] = {
    LoRAConfig.peft_type: LoRAConfig,
    BottleneckConfig.peft_type: BottleneckConfig,
    PromptTuningConfig.peft_type: PromptTuningConfig,
}


#: flags of a LoRA spec string -> the LoRAConfig field they set
_SPEC_FLAGS = {"rslora": "use_rslora", "dora": "use_dora", "lora_bias": "lora_bias"}


def parse_lora_spec(spec: str) -> LoRAConfig:
    """``"r=16,alpha=32,dropout=0.05,targets=q_proj,v_proj,rslora,dora"`` -> :class:`LoRAConfig`.

    Keys: ``r``, ``alpha``, ``dropout``, ``targets`` (names, one regular expression in ``re:...``
    or ``all-linear``), ``exclude``, ``save`` (modules_to_save), ``init``, ``r.PATTERN`` /
    ``alpha.PATTERN`` (rank_pattern / alpha_pattern entries: ``r.lm_head=1``); flags ``rslora``,
    ``dora`` and ``lora_bias``. A bare word after ``targets=`` / ``exclude=`` / ``save=``
    continues that list."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("lora", f"expected e.g. 'r=16,alpha=32,targets=q_proj,v_proj', got {spec!r}")
    values: dict[str, Any] = {}
    lists = {"targets": "target_modules", "exclude": "exclude_modules", "save": "modules_to_save"}
    current_list: str | None = None
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        if "=" not in token:
            if token in _SPEC_FLAGS:
                values[_SPEC_FLAGS[token]] = True
                current_list = None
            elif current_list is not None:
                values[current_list].append(token)
            else:
                raise ConfigError("lora", f"{token!r} is neither key=value nor a flag; accepted keys: r, alpha, dropout, "
                                  "targets, exclude, save, init, r.PATTERN, alpha.PATTERN; flags: rslora, dora, lora_bias")
            continue
        key, value = (part.strip() for part in token.split("=", 1))
        current_list = None
        try:
            if key == "r":
                values["r"] = int(value)
            elif key == "alpha":
                values["lora_alpha"] = float(value) if "." in value else int(value)
            elif key == "dropout":
                values["lora_dropout"] = float(value)
            elif key == "init":
                values["init_lora_weights"] = {"true": True, "false": False}.get(value.lower(), value)
            elif key in _SPEC_FLAGS:
                values[_SPEC_FLAGS[key]] = value.lower() in ("1", "true", "yes", "on")
            elif key.startswith(("r.", "alpha.")) and key.split(".", 1)[1]:
                kind, pattern = key.split(".", 1)
                number = int(value) if kind == "r" else (float(value) if "." in value else int(value))
                values.setdefault("rank_pattern" if kind == "r" else "alpha_pattern", {})[pattern] = number
            elif key in lists:
                if value == ALL_LINEAR or value.startswith("re:"):
                    values[lists[key]] = value.removeprefix("re:")
                else:
                    values[lists[key]] = [value]
                    current_list = lists[key]
            else:
                raise ConfigError("lora", f"unknown key {key!r}; accepted: r, alpha, dropout, targets, exclude, save, "
                                  "init, r.PATTERN, alpha.PATTERN, rslora, dora, lora_bias")
        except ValueError as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"lora.{key}", f"cannot parse {value!r} ({exc})") from None
    return LoRAConfig(**values)
