"""What a distillation run chooses besides its training budget: which teacher layers the
student keeps, the softmax temperature and the weight of the distillation term."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from seekdeep.errors import ConfigError

#: layer specs accepted by name; every other one keeps layers 0, 2, 4, ... (DistilBERT's choice)
LAYER_PRESETS = ("every_other",)


def parse_layers(spec: str | Sequence[int], field: str = "layers") -> str | list[int]:
    """``"every_other"`` as is, or a strictly increasing, non-empty list of layer indices >= 0
    (from a list or a string such as ``"0,2,5"``). The range is checked later, against the
    teacher's depth (:func:`select_layers`)."""
    if isinstance(spec, str):
        text = spec.strip()
        if text in LAYER_PRESETS:
            return text
        try:
            spec = [int(part) for part in text.split(",")]
        except ValueError:
            raise ConfigError(field, f"cannot parse {text!r}; accepted: {', '.join(LAYER_PRESETS)} or "
                              "comma-separated layer indices such as '0,2,5'") from None
    if not isinstance(spec, (list, tuple)) or not spec:
        raise ConfigError(field, f"got {spec!r}; accepted: {', '.join(LAYER_PRESETS)} or a non-empty list of layer indices")
    for index in spec:
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ConfigError(field, f"layer index {index!r} in {list(spec)} is not an integer >= 0")
    if len(set(spec)) != len(spec):
        duplicates = sorted({i for i in spec if list(spec).count(i) > 1})
        raise ConfigError(field, f"{list(spec)} repeats layer(s) {duplicates}; each teacher layer can be kept once")
    if list(spec) != sorted(spec):
        raise ConfigError(field, f"{list(spec)} is not in increasing order; accepted: e.g. {sorted(spec)} "
                          "(the student keeps the teacher's layer order)")
    return list(spec)


def select_layers(spec: str | Sequence[int], num_layers: int, field: str = "layers") -> list[int]:
    """The teacher layer indices a layer spec picks from a ``num_layers``-layer teacher."""
    parsed = parse_layers(spec, field)
    if parsed == "every_other":
        return list(range(0, num_layers, 2))
    out_of_range = [i for i in parsed if i >= num_layers]
    if out_of_range:
        raise ConfigError(field, f"layer(s) {out_of_range} out of range for a teacher with {num_layers} layers; "
                          f"accepted: indices in [0, {num_layers - 1}]")
    return parsed


def check_temperature(value: Any, field: str = "temperature") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 < value <= 100:
        raise ConfigError(field, f"must be a number in (0, 100], got {value!r}")
    return float(value)


def check_alpha(value: Any, field: str = "alpha") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ConfigError(field, f"must be a number in [0, 1] (weight of the distillation term), got {value!r}")
    return float(value)


@dataclass
class DistillConfig:
    """``layers``: the teacher layers the student keeps (``"every_other"``, a list, or
    ``"0,2,5"``); ``temperature``: softens both distributions in the KL term; ``alpha``: weight
    of the distillation term (``1 - alpha`` goes to next-token cross-entropy)."""

    layers: str | list[int] = "every_other"
    temperature: float = 2.0
    alpha: float = 0.5

    def __post_init__(self) -> None:
        self.layers = parse_layers(self.layers)
        self.temperature = check_temperature(self.temperature)
        self.alpha = check_alpha(self.alpha)

    def student_layers(self, num_teacher_layers: int) -> list[int]:
        """The kept layer indices for a teacher of that depth; a student that is not strictly
        shallower than its teacher is refused (it would only be a copy)."""
        layers = select_layers(self.layers, num_teacher_layers)
        if len(layers) >= num_teacher_layers:
            raise ConfigError("layers", f"{self.layers!r} keeps {len(layers)} of the teacher's {num_teacher_layers} "
                              f"layers; a student must have fewer layers than its teacher (accepted: at most "
                              f"{num_teacher_layers - 1} indices, e.g. 'every_other')")
        return layers

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DistillConfig":
        return cls(**d)
