"""Structured pruning of llama-family models: ``PruneConfig(ratio=..., method=...).apply(model)``.

Removes whole SwiGLU intermediate channels (gate / up rows, down columns) and attention heads
(q rows and o columns; whole KV groups with their k / v rows), the same number in every
layer, so the result is a smaller plain ``LlamaConfig`` model that saves with
``save_pretrained`` and loads in seekdeep and transformers alike.

- :class:`PruneConfig`: how much (``ratio`` or ``mlp_ratio`` / ``head_ratio``), how scored
  (``l1`` weights or ``activation`` on calibration data) and what (``targets``);
- :func:`prune`: the pruned model and a :class:`PruneReport` (sizes, parameter counts);
- :func:`score_mlp_channels`, :func:`score_heads`, :func:`select_channels`,
  :func:`select_heads`, :func:`prune_model`: the steps, for choosing by other rules;
- :func:`recover`: a short full fine-tune to win back what pruning lost.
"""

from seekdeep.pruning.config import PruneConfig, PruneShape, closest_head_layout, pruned_shape
from seekdeep.pruning.convert import (BACKEND_HEAD_PARAMS, PruneReport, check_prunable, count_parameters, prune,
                                      prune_model, prune_report, pruned_state_dict)
from seekdeep.pruning.recover import RecoveryReport, recover
from seekdeep.pruning.scores import (activation_statistics, score_heads, score_mlp_channels, score_model,
                                     select_channels, select_heads)

__all__ = [
    "BACKEND_HEAD_PARAMS", "PruneConfig", "PruneReport", "PruneShape", "RecoveryReport", "activation_statistics",
    "check_prunable", "closest_head_layout", "count_parameters", "prune", "prune_model", "prune_report",
    "pruned_shape", "pruned_state_dict", "recover", "score_heads", "score_mlp_channels", "score_model",
    "select_channels", "select_heads",
]
