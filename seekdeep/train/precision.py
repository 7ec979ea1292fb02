"""The one place that decides numeric precision for training.

A :class:`PrecisionPolicy` gives the autocast context and (for fp16 only) a loss scaler; model
code never branches on precision. :func:`param_groups` and :func:`cast_model_for_training`
name the parameters that stay fp32 (norms, embeddings, MoE router, biases) when the rest of
the model is held in bf16 / fp16 with fp32 master weights
(:class:`seekdeep.optim.MixedPrecisionOptimizer`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from seekdeep.errors import ConfigError

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES: dict[str, torch.dtype] = {
    **PRECISIONS,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DEVICE_TYPES = ("cpu", "cuda")

#: Name fragments of parameters that are numerically sensitive and stay fp32 in low-precision
#: training: norm scales, token embeddings, the MoE router (``mlp.gate.``, not ``mlp.gate_proj``)
#: and every bias.
DEFAULT_FP32_PATTERNS: tuple[str, ...] = ("norm", "embed", "mlp.gate.", ".bias")


@dataclass
class PrecisionPolicy:
    """``precision``: "fp32" | "bf16" | "fp16" (the autocast compute dtype);
    ``device_type``: "cpu" | "cuda" (what autocast and the scaler are built for).

    fp16 works on CPU too (torch.autocast and GradScaler support it), though it is slow there;
    bf16 needs no loss scaling, so only fp16 gets an enabled scaler.
    """

    precision: str = "fp32"
    device_type: str = "cpu"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError("precision", f"unknown precision {self.precision!r}; accepted: {', '.join(PRECISIONS)}")
        if self.device_type not in DEVICE_TYPES:
            raise ConfigError("device_type", f"unknown device type {self.device_type!r}; accepted: {', '.join(DEVICE_TYPES)}")
        if self.device_type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device_type", "'cuda' requested but torch.cuda.is_available() is False; accepted here: 'cpu'")
        if self.device_type == "cuda" and self.precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise ConfigError("precision", "'bf16' is not supported by this GPU; accepted here: 'fp32', 'fp16'")

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    def autocast(self) -> contextlib.AbstractContextManager:
        """A fresh ``torch.autocast`` context for the forward pass (a no-op for fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def make_scaler(self, **kwargs: Any) -> "DynamicLossScaler":
        """A :class:`DynamicLossScaler`, enabled only for fp16 (a disabled one passes losses and
        steps through unchanged, so a training loop can always use it)."""
        return DynamicLossScaler(enabled=self.precision == "fp16", device=self.device_type, **kwargs)

    def to_dict(self) -> dict[str, str]:
        return {"precision": self.precision, "device_type": self.device_type}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PrecisionPolicy":
        return cls(**d)


class DynamicLossScaler:
    """Dynamic loss scaling for fp16 on top of ``torch.amp.GradScaler``.

    Adds what GradScaler does not say directly: :meth:`step` returns whether the optimizer
    step was applied, and :attr:`skipped_steps` counts the steps skipped for inf/NaN
    gradients. The scale is multiplied by ``backoff_factor`` after a skipped step and by
    ``growth_factor`` after ``growth_interval`` consecutive clean steps.

    Usage per iteration: ``scaler.scale(loss).backward()``; optionally ``scaler.unscale_(opt)``
    then clip; ``applied = scaler.step(opt)``; ``scaler.update()``.
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        enabled: bool = True,
        device: str = "cpu",
    ):
        if not (isinstance(init_scale, (int, float)) and init_scale > 0):
            raise ConfigError("init_scale", f"must be a positive number, got {init_scale!r}")
        if not (isinstance(growth_factor, (int, float)) and growth_factor > 1.0):
            raise ConfigError("growth_factor", f"must be > 1.0, got {growth_factor!r}")
        if not (isinstance(backoff_factor, (int, float)) and 0.0 < backoff_factor < 1.0):
            raise ConfigError("backoff_factor", f"must be in (0, 1), got {backoff_factor!r}")
        if not (isinstance(growth_interval, int) and growth_interval >= 1):
            raise ConfigError("growth_interval", f"must be a positive int, got {growth_interval!r}")
        device_type = torch.device(device).type
        if device_type not in DEVICE_TYPES:
            raise ConfigError("device", f"unsupported device {device!r}; accepted: {', '.join(DEVICE_TYPES)}")
        self.enabled = bool(enabled)
        self.device = device_type
        self._scaler = torch.amp.GradScaler(
            device_type,
            init_scale=float(init_scale),
            growth_factor=float(growth_factor),
            backoff_factor=float(backoff_factor),
            growth_interval=growth_interval,
            enabled=self.enabled,
        )
        if self.enabled:
            # GradScaler allocates its scale on the first scale() call; do it now so that
            # unscale_/step also work on gradients that did not come from scale(loss).
            self._scaler.scale(torch.ones((), device=device))
        self.skipped_steps = 0
        self.last_step_skipped = False

    @property
    def scale_value(self) -> float:
        """The current loss scale (1.0 when disabled)."""
        return float(self._scaler.get_scale()) if self.enabled else 1.0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self._scaler.scale(loss)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the optimizer's gradients by the scale in place (call before clipping)."""
        self._scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> bool:
        """Unscale (unless done already), then step unless a gradient is inf/NaN.
        Returns True when the step was applied, False when it was skipped."""
        if not self.enabled:
            optimizer.step(*args, **kwargs)
            self.last_step_skipped = False
            return True
        self._scaler.step(optimizer, *args, **kwargs)
        # GradScaler records the per-device inf checks but does not return them; its own
        # update() reads the same record.
        found = self._scaler._found_inf_per_device(optimizer)
        skipped = bool(sum(float(v.item()) for v in found.values()))
        self.last_step_skipped = skipped
        self.skipped_steps += int(skipped)
        return not skipped

    def update(self) -> None:
        """Back off after a skipped step, grow after ``growth_interval`` clean ones."""
        self._scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "skipped_steps": self.skipped_steps, "grad_scaler": self._scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "grad_scaler" not in state:
            raise ConfigError("scaler state", "expected a dict from DynamicLossScaler.state_dict() (with 'grad_scaler')")
        if bool(state.get("enabled", True)) != self.enabled:
            raise ConfigError(
                "enabled",
                f"saved scaler was enabled={state.get('enabled')}, this one is enabled={self.enabled}; build the "
                "scaler with the same precision policy as the run that saved it",
            )
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if self.enabled:
            self._scaler.load_state_dict(state["grad_scaler"])


class StaticLossScaler(DynamicLossScaler):
    """A fixed loss scale (``scale=1.0`` means no scaling). Steps with inf/NaN gradients are
    still skipped, but the scale never changes."""

    def __init__(self, scale: float = 1.0, device: str = "cpu"):
        super().__init__(init_scale=scale, enabled=True, device=device)
        self._fixed = float(scale)

    def update(self) -> None:
        self._scaler.update(new_scale=self._fixed)


# -- parameter policy


def is_fp32_param(name: str, patterns: Iterable[str] = DEFAULT_FP32_PATTERNS) -> bool:
    """Whether a parameter (by its ``named_parameters`` name) should stay fp32."""
    return any(p in name for p in patterns)


def _no_weight_decay(name: str, param: torch.Tensor) -> bool:
    # 1-D tensors are norm scales and biases; embeddings are rows looked up, not a map to shrink.
    return param.ndim < 2 or "embed" in name


def param_groups(
    model: nn.Module,
    weight_decay: float,
    fp32_patterns: Iterable[str] = DEFAULT_FP32_PATTERNS,
) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay only for >=2-D non-embedding weights, and a
    ``keep_fp32`` flag for the parameters matching ``fp32_patterns`` (substrings of the
    parameter name). Frozen parameters (``requires_grad=False``) are left out; tied weights
    appear once. Each group also carries a ``name`` ("decay", "no_decay", "decay_fp32",
    "no_decay_fp32")."""
    if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ConfigError("weight_decay", f"must be a number >= 0, got {weight_decay!r}")
    patterns = tuple(fp32_patterns)
    buckets: dict[tuple[bool, bool], list[torch.Tensor]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = (not _no_weight_decay(name, param), is_fp32_param(name, patterns))
        buckets.setdefault(key, []).append(param)
    groups = []
    for (decay, keep_fp32) in [(True, False), (False, False), (True, True), (False, True)]:
        params = buckets.get((decay, keep_fp32))
        if params:
            name = ("decay" if decay else "no_decay") + ("_fp32" if keep_fp32 else "")
            groups.append(
                {"params": params, "weight_decay": float(weight_decay) if decay else 0.0, "keep_fp32": keep_fp32, "name": name}
            )
    if not groups:
        raise ConfigError("model", "has no trainable parameters (every parameter has requires_grad=False)")
    return groups


def parse_precision_dtype(dtype: torch.dtype | str, field: str = "dtype") -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in PRECISIONS.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype]
    raise ConfigError(field, f"unsupported {dtype!r}; accepted: torch.float32/bfloat16/float16 or {', '.join(_DTYPE_NAMES)}")


@torch.no_grad()
def cast_model_for_training(
    model: nn.Module,
    dtype: torch.dtype | str,
    fp32_patterns: Iterable[str] = DEFAULT_FP32_PATTERNS,
) -> nn.Module:
    """Cast the floating-point parameters of ``model`` in place to ``dtype`` (bf16 / fp16),
    except those matching ``fp32_patterns``, which are made fp32. Buffers (rotary tables, the
    router's correction bias) are left as they are. Returns ``model``.

    The result mixes dtypes, so its forward must run under ``PrecisionPolicy.autocast()``;
    pair it with :class:`seekdeep.optim.MixedPrecisionOptimizer` for fp32 master weights.
    """
    target = parse_precision_dtype(dtype)
    patterns = tuple(fp32_patterns)
    for name, param in model.named_parameters():
        if not param.is_floating_point():
            continue
        want = torch.float32 if is_fp32_param(name, patterns) else target
        if param.dtype != want:
            param.data = param.data.to(want)  # keeps the Parameter object (and tied aliases) intact
    return model
