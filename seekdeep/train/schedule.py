"""Learning-rate schedule: linear warmup, then cosine decay to a floor."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from seekdeep.errors import ConfigError


def _require_int(value, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(name, f"must be an int >= {minimum}, got {value!r}")


def _check_schedule(warmup_steps: int, total_steps: int) -> None:
    _require_int(warmup_steps, "warmup_steps", 0)
    _require_int(total_steps, "total_steps", 1)
    if warmup_steps > total_steps:
        raise ConfigError("warmup_steps", f"{warmup_steps} exceeds total_steps={total_steps}; accepted: 0..total_steps")


def _cosine_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    if step < warmup_steps:
        # (step + 1): the first optimizer step already gets a non-zero learning rate.
        return (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    progress = min(1.0, (step - warmup_steps) / decay_steps) if decay_steps > 0 else 1.0
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, max_lr: float, min_lr: float) -> float:
    """Learning rate at optimizer step ``step`` (0-based): ``max_lr * (step + 1) / warmup_steps``
    during warmup, then a cosine from ``max_lr`` (at ``step == warmup_steps``) down to
    ``min_lr`` (at ``step == total_steps``), and ``min_lr`` after that."""
    _require_int(step, "step", 0)
    _check_schedule(warmup_steps, total_steps)
    if not isinstance(max_lr, (int, float)) or isinstance(max_lr, bool) or not max_lr > 0 or math.isinf(max_lr):
        raise ConfigError("max_lr", f"must be a finite number > 0, got {max_lr!r}")
    if not isinstance(min_lr, (int, float)) or isinstance(min_lr, bool) or not 0 <= min_lr <= max_lr:
        raise ConfigError("min_lr", f"must be a number in [0, max_lr={max_lr}], got {min_lr!r}")
    return max_lr * _cosine_factor(step, warmup_steps, total_steps, min_lr / max_lr)


def make_scheduler(
    optimizer: torch.optim.Optimizer, warmup: int, total: int, min_lr_ratio: float = 0.1
) -> LambdaLR:
    """A ``LambdaLR`` multiplying each param group's base ``lr`` by the warmup-cosine factor;
    the final learning rate is ``min_lr_ratio * lr``. Call ``scheduler.step()`` after every
    ``optimizer.step()``. Works with :class:`seekdeep.optim.MixedPrecisionOptimizer`."""
    _check_schedule(warmup, total)
    if isinstance(min_lr_ratio, bool) or not isinstance(min_lr_ratio, (int, float)) or not 0 <= min_lr_ratio <= 1:
        raise ConfigError("min_lr_ratio", f"must be a number in [0, 1], got {min_lr_ratio!r}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError("optimizer", f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    ratio = float(min_lr_ratio)

    # A plain function (not a partial or lambda object with state) so LambdaLR's state_dict
    # stays a dict of numbers that torch.load(weights_only=True) reads back.
    def factor(step: int) -> float:
        return _cosine_factor(step, warmup, total, ratio)

    return LambdaLR(optimizer, factor)
