"""Optimizers: :class:`MixedPrecisionOptimizer` (fp32 master weights for bf16/fp16 models)."""

from seekdeep.optim.mixed_precision import MixedPrecisionOptimizer
from seekdeep.train.precision import DynamicLossScaler, StaticLossScaler, param_groups

__all__ = ["DynamicLossScaler", "MixedPrecisionOptimizer", "StaticLossScaler", "param_groups"]
