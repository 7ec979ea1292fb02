"""``PruneConfig`` (what the user asks for) and ``PruneShape`` (the sizes every layer keeps).

A ratio is a fraction of the *prunable* parameters: the q / k / v / o and gate / up / down
linears (weights and biases) of the decoder blocks. Embeddings, ``lm_head``, norms and the
attention backends' own parameters are never pruned. Every layer loses the same number of
channels and heads, so the result is a plain ``LlamaConfig`` that transformers loads.

How the ratio becomes sizes (:func:`pruned_shape`):

* heads come in coarse steps, so attention takes the kept-head layout whose share of the
  attention parameters is closest to ``1 - ratio`` (see :func:`closest_head_layout`);
* MLP channels are fine-grained (``3 * hidden_size`` parameters each): with one overall
  ``ratio`` they take the rest, so that the removed total is ``ratio`` of the targeted
  parameters to within one channel per layer. Attention and MLP thus lose about the same
  fraction, and the MLP absorbs the rounding of the head layout.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from seekdeep.errors import ConfigError
from seekdeep.validate import check_int

METHODS = ("l1", "activation")
TARGETS = ("mlp", "heads")


def _check_ratio(value: Any, name: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ConfigError(name, f"must be a number in (0, 1) (the fraction of parameters to remove), got {value!r}")


@dataclass
class PruneConfig:
    """How to prune a llama-family model; ``PruneConfig(...).apply(model, calibration_data)``.

    ratio: fraction of the targeted prunable parameters to remove (see the module docstring
        for how it is split between MLP channels and attention heads).
    method: ``l1`` (L1 norm of the weights of a channel / head) or ``activation`` (what the
        channel / head contributes to the layer output on ``calibration_data``).
    targets: ``"mlp"`` (SwiGLU intermediate channels) and / or ``"heads"`` (attention heads).
    mlp_ratio, head_ratio: instead of ``ratio``, the fraction of the MLP / attention
        parameters to remove each; a kind whose ratio is None is left alone.
    calibration_batches: ``activation``: at most this many calibration batches (None: all).
    """

    ratio: float | None = None
    method: str = "l1"
    targets: tuple[str, ...] = TARGETS
    mlp_ratio: float | None = None
    head_ratio: float | None = None
    calibration_batches: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError("method", f"unknown method {self.method!r}; accepted: {', '.join(METHODS)}")
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        if not isinstance(self.targets, (list, tuple)) or not self.targets:
            raise ConfigError("targets", f"must be a non-empty list drawn from {TARGETS}, got {self.targets!r}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            raise ConfigError("targets", f"unknown target {unknown[0]!r}; accepted: {', '.join(TARGETS)}")
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError("targets", f"lists a target twice: {list(self.targets)}")
        self.targets = tuple(self.targets)
        for name in ("ratio", "mlp_ratio", "head_ratio"):
            _check_ratio(getattr(self, name), name)
        per_kind = [name for name in ("mlp_ratio", "head_ratio") if getattr(self, name) is not None]
        if self.ratio is None and not per_kind:
            raise ConfigError("ratio", "no amount to prune; accepted: ratio (fraction of the prunable parameters) "
                              "or mlp_ratio / head_ratio")
        if self.ratio is not None and per_kind:
            raise ConfigError(per_kind[0], f"give either ratio={self.ratio} or mlp_ratio / head_ratio, not both")
        for name, target in (("mlp_ratio", "mlp"), ("head_ratio", "heads")):
            if getattr(self, name) is not None and target not in self.targets:
                raise ConfigError(name, f"is set but targets={list(self.targets)} leaves out {target!r}")
        check_int("calibration_batches", self.calibration_batches, optional=True)

    @property
    def prunes_mlp(self) -> bool:
        return "mlp" in self.targets and (self.ratio is not None or self.mlp_ratio is not None)

    @property
    def prunes_heads(self) -> bool:
        return "heads" in self.targets and (self.ratio is not None or self.head_ratio is not None)

    # -- JSON
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PruneConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(unknown[0], f"unknown key; accepted: {', '.join(sorted(known))}")
        return cls(**d)

    def apply(self, model, calibration_data=None):
        """Return the pruned model (a new, smaller model; ``model`` is left as it was).
        ``calibration_data``: an iterable of (batch, seq) input-id tensors, required by
        ``method="activation"``. :func:`seekdeep.pruning.prune` also returns the report."""
        from seekdeep.pruning.convert import prune

        return prune(model, self, calibration_data)[0]


@dataclass(frozen=True)
class PruneShape:
    """What every layer keeps: ``intermediate_size`` MLP channels and ``num_key_value_heads``
    KV groups of ``heads_per_group`` query heads each."""

    intermediate_size: int
    num_key_value_heads: int
    heads_per_group: int

    @property
    def num_attention_heads(self) -> int:
        return self.num_key_value_heads * self.heads_per_group


# ----------------------------------------------------------------------------- parameter counts


def mlp_params(config, intermediate_size: int) -> int:
    """Parameters of one layer's gate / up / down linears with ``intermediate_size`` channels."""
    bias = int(config.mlp_bias)
    return intermediate_size * (3 * config.hidden_size + 2 * bias) + config.hidden_size * bias


def attention_params(config, num_key_value_heads: int, heads_per_group: int) -> int:
    """Parameters of one layer's q / k / v / o linears with the given head layout."""
    c, d = config.hidden_size, config.head_dim
    qkv_bias = int(config.attention_bias or config.qkv_bias)
    heads = num_key_value_heads * heads_per_group
    q = heads * d * (c + qkv_bias)
    kv = 2 * num_key_value_heads * d * (c + qkv_bias)
    o = c * heads * d + c * int(config.attention_bias)
    return q + kv + o


def _round(x: float) -> int:
    return math.floor(x + 0.5)  # half up, not Python's half-to-even


def closest_head_layout(config, ratio: float, field: str = "head_ratio") -> tuple[int, int]:
    """``(num_key_value_heads, heads_per_group)`` keeping the attention-parameter count closest
    to ``(1 - ratio)`` of the original.

    Why this layout space: a Llama config needs ``num_attention_heads % num_key_value_heads
    == 0`` with every KV head serving the same number of query heads. Keeping ``G'`` whole KV
    groups and ``n'`` query heads in each (``G' <= G``, ``n' <= n``) is exactly the set of
    layouts that satisfy it: dropping a KV group removes its query heads with it (they
    cannot attend without it), and dropping query heads unevenly would leave groups of
    different sizes. Searching both axes gives the finest steps: MHA models (``n == 1``) prune
    single heads, GQA models can shed query heads within groups and / or whole groups.

    Ties (same parameter count) keep more query heads, then more KV groups. Raises
    ConfigError when removing every head is closer to the request than any layout."""
    groups = config.num_key_value_heads
    per_group = config.num_attention_heads // groups
    full = attention_params(config, groups, per_group)
    target = (1.0 - ratio) * full
    candidates = [(kv, n) for kv in range(1, groups + 1) for n in range(1, per_group + 1)]
    best = min(candidates, key=lambda g: (abs(attention_params(config, *g) - target), -g[0] * g[1], -g[0]))
    nothing = config.hidden_size * int(config.attention_bias)  # o_proj's bias survives any pruning
    smallest = min(attention_params(config, *g) for g in candidates)
    if abs(nothing - target) < abs(attention_params(config, *best) - target):
        bound = 1.0 - (smallest + nothing) / (2 * full)
        raise ConfigError(field, f"{ratio} would remove every attention head ({config.num_attention_heads} heads, "
                          f"{groups} KV groups per layer); accepted: a value below {bound:.4f}")
    return best


def pruned_shape(config, cfg: PruneConfig) -> PruneShape:
    """The sizes every layer of a model with ``config`` keeps under ``cfg`` (module docstring)."""
    size, groups = config.intermediate_size, config.num_key_value_heads
    per_group = config.num_attention_heads // groups
    kv_keep, per_group_keep = groups, per_group
    if cfg.prunes_heads:
        field = "head_ratio" if cfg.head_ratio is not None else "ratio"
        kv_keep, per_group_keep = closest_head_layout(config, getattr(cfg, field), field)
    size_keep = size
    if cfg.prunes_mlp:
        per_channel = mlp_params(config, 1) - mlp_params(config, 0)
        full_mlp = mlp_params(config, size)
        if cfg.mlp_ratio is not None or not cfg.prunes_heads:
            field = "mlp_ratio" if cfg.mlp_ratio is not None else "ratio"
            ratio = getattr(cfg, field)
            remove = _round(ratio * full_mlp / per_channel)
            bound = (size - 0.5) * per_channel / full_mlp
        else:  # one ratio for both: the MLP absorbs the rounding of the head layout
            field, ratio = "ratio", cfg.ratio
            full_attention = attention_params(config, groups, per_group)
            removed_attention = full_attention - attention_params(config, kv_keep, per_group_keep)
            remove = max(0, _round((ratio * (full_attention + full_mlp) - removed_attention) / per_channel))
            bound = ((size - 0.5) * per_channel + removed_attention) / (full_attention + full_mlp)
        if remove >= size:
            raise ConfigError(field, f"{ratio} would remove all {size} MLP channels of every layer; accepted: a "
                              f"value below {bound:.4f}")
        size_keep = size - remove
    return PruneShape(size_keep, kv_keep, per_group_keep)
