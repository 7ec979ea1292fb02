"""Pruning a llama-family model in two steps (the converter habit of :mod:`seekdeep.quantization`):

1. :func:`pruned_state_dict` slices the kept channels / heads out of every tensor and gives
   the config of the smaller model;
2. :func:`prune_model` builds that model on the meta device and loads the new state dict
   with ``assign=True``.

:func:`prune` (``PruneConfig.apply``) adds scoring, selection and a :class:`PruneReport`.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import nn

from seekdeep.errors import ConfigError
from seekdeep.pruning.config import PruneConfig, pruned_shape
from seekdeep.pruning.scores import score_model, select_channels, select_heads

#: Attention backends whose own parameters are known: ``{backend: {parameter: dim indexed by
#: query head}}``. ``dsa``'s indexer reads hidden states with index heads of its own, so
#: nothing in it is per attention head; ``gated`` has one gate output per query head.
BACKEND_HEAD_PARAMS: dict[str, dict[str, int]] = {
    "eager": {},
    "sdpa": {},
    "dsa": {},
    "gated": {"gate_out.weight": 0, "gate_out.bias": 0},
}
_MLP = ("gate_proj", "up_proj", "down_proj")
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


# ----------------------------------------------------------------------------- checks


def check_prunable(model: Any, heads: bool = True) -> None:
    """Raise ConfigError unless ``model`` is a float llama-family model whose projections are
    plain ``nn.Linear`` (and, when ``heads``, whose attention backend can lose heads)."""
    from seekdeep.models.llama import LLAMA_MODEL_TYPES, LlamaForCausalLM

    if not isinstance(model, nn.Module):
        raise ConfigError("model", f"expected a seekdeep model (torch.nn.Module), got {type(model).__name__}")
    if not isinstance(model, LlamaForCausalLM):
        model_type = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
        why = " (DeepSeek-V3's MLA attention and MoE experts have no structured pruning here)" \
            if model_type == "deepseek_v3" else ""
        raise ConfigError("model_type", f"pruning supports the llama family ({', '.join(LLAMA_MODEL_TYPES)}); "
                          f"got {model_type!r}{why}")
    if getattr(model, "quantization_config", None) is not None or getattr(model, "qat_plan", None) is not None:
        raise ConfigError("model", "is quantised (or prepared for QAT); prune the float model, then quantise")
    adapters = model.list_adapters()
    if adapters:
        raise ConfigError("model", f"has adapters attached ({', '.join(adapters)}); fold them in with "
                          "merge_and_unload() or prune the base model")
    if any(p.is_meta for p in model.parameters()):
        raise ConfigError("model", "has weights on the meta device; load or initialise it first")
    for i, layer in enumerate(model.model.layers):
        for owner, names in ((layer.self_attn, _ATTENTION), (layer.mlp, _MLP)):
            for name in names:
                module = getattr(owner, name)
                if type(module) is not nn.Linear:
                    raise ConfigError("model", f"model.layers.{i} {name} is a {type(module).__name__}; pruning "
                                      "needs plain nn.Linear projections")
    if heads:
        backend = model.config.attention_backend
        own = sorted(name for name, _ in model.model.layers[0].self_attn.inner.named_parameters())
        if own and backend not in BACKEND_HEAD_PARAMS:
            raise ConfigError("attention_backend", f"cannot prune the heads of backend {backend!r}: it holds "
                              f"parameters ({', '.join(own[:4])}) whose per-head layout is unknown; accepted: "
                              f"{', '.join(BACKEND_HEAD_PARAMS)} or a backend without parameters, or prune MLP "
                              "channels only (targets=('mlp',))")


def _as_index(value: Any, size: int, where: str) -> torch.Tensor:
    try:
        index = torch.as_tensor(value)
    except Exception:
        raise ConfigError(where, f"expected a sequence of integer indices, got {type(value).__name__}") from None
    if index.dim() != 1 or index.numel() == 0 or index.dtype.is_floating_point or index.dtype == torch.bool:
        raise ConfigError(where, f"expected a non-empty 1-D list of integer indices, got {value!r:.80}")
    index = index.long().cpu()
    if int(index.min()) < 0 or int(index.max()) >= size:
        raise ConfigError(where, f"indices must be in [0, {size}), got [{int(index.min())}, {int(index.max())}]")
    if index.unique().numel() != index.numel():
        raise ConfigError(where, "lists an index twice")
    return index.sort().values


def _per_layer(keep: Sequence[Any], num_layers: int, field: str) -> list[Any]:
    if isinstance(keep, torch.Tensor) and keep.dim() == 2:  # (layers, kept)
        keep = list(keep)
    if isinstance(keep, torch.Tensor) or not isinstance(keep, Sequence) or len(keep) != num_layers:
        raise ConfigError(field, f"expected one index list per layer ({num_layers}), got {keep!r:.80}")
    return list(keep)


def normalize_keep_channels(config, keep_channels: Sequence[Any] | None) -> list[torch.Tensor] | None:
    """Validated, sorted per-layer channel indices (every layer keeping the same number)."""
    if keep_channels is None:
        return None
    keep = [_as_index(k, config.intermediate_size, f"keep_channels[{i}]")
            for i, k in enumerate(_per_layer(keep_channels, config.num_hidden_layers, "keep_channels"))]
    counts = sorted({k.numel() for k in keep})
    if len(counts) > 1:
        raise ConfigError("keep_channels", f"every layer must keep the same number of channels (one "
                          f"intermediate_size for the config), got counts {counts}")
    return keep


def normalize_keep_heads(config, keep_heads: Sequence[Any] | None) -> list[torch.Tensor] | None:
    """Validated, sorted per-layer query-head indices. Each layer must keep the same number of
    KV groups and the same number of query heads in every kept group (see
    :func:`seekdeep.pruning.config.closest_head_layout`); a group with no kept head is dropped
    with its k / v heads."""
    if keep_heads is None:
        return None
    per_group = config.num_attention_heads // config.num_key_value_heads
    keep, layouts = [], set()
    for i, k in enumerate(_per_layer(keep_heads, config.num_hidden_layers, "keep_heads")):
        index = _as_index(k, config.num_attention_heads, f"keep_heads[{i}]")
        counts = torch.bincount(index // per_group, minlength=config.num_key_value_heads)
        kept = counts[counts > 0]
        if kept.min() != kept.max():
            raise ConfigError(f"keep_heads[{i}]", f"kept query heads per KV group are {counts.tolist()} (groups of "
                              f"{per_group}); every kept group must keep the same number so that "
                              "num_attention_heads % num_key_value_heads == 0")
        layouts.add((kept.numel(), int(kept[0])))
        keep.append(index)
    if len(layouts) > 1:
        raise ConfigError("keep_heads", f"layers keep different (KV groups, heads per group): {sorted(layouts)}; "
                          "one config needs the same layout in every layer")
    return keep


# ----------------------------------------------------------------------------- step 1


def _rows(tensor: torch.Tensor, index: torch.Tensor, block: int, dim: int) -> torch.Tensor:
    """Keep the blocks ``index`` (each ``block`` wide) along ``dim``."""
    shape = tensor.shape
    blocks = tensor.unflatten(dim, (shape[dim] // block, block))
    return blocks.index_select(dim, index.to(tensor.device)).flatten(dim, dim + 1).contiguous()


@torch.no_grad()
def pruned_state_dict(model: nn.Module, keep_channels: Sequence[Any] | None = None,
                      keep_heads: Sequence[Any] | None = None) -> tuple[dict[str, torch.Tensor], Any]:
    """Step 1: ``(state dict, config)`` of the model that keeps, in layer ``i``, the MLP
    channels ``keep_channels[i]`` and the query heads ``keep_heads[i]`` (None: keep all).

    Untouched tensors are cloned, so the pruned model shares no storage with ``model``."""
    check_prunable(model, heads=keep_heads is not None)
    config = model.config
    channels = normalize_keep_channels(config, keep_channels)
    heads = normalize_keep_heads(config, keep_heads)
    d, per_group = config.head_dim, config.num_attention_heads // config.num_key_value_heads
    backend_params = BACKEND_HEAD_PARAMS.get(config.attention_backend, {})
    state = {}
    copies: dict[tuple, torch.Tensor] = {}

    def clone(tensor: torch.Tensor) -> torch.Tensor:  # a tied lm_head / embedding is copied once
        where = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if where not in copies:
            copies[where] = tensor.clone()
        return copies[where]

    for key, tensor in model.state_dict().items():
        parts = key.split(".")
        if parts[:2] != ["model", "layers"]:
            state[key] = clone(tensor)
            continue
        i, local = int(parts[2]), ".".join(parts[3:])
        module, _, kind = local.rpartition(".")  # e.g. ("mlp.down_proj", "weight")
        backend_key = local.removeprefix("self_attn.inner.") if local.startswith("self_attn.inner.") else None
        if channels is not None and module in ("mlp.gate_proj", "mlp.up_proj"):
            state[key] = _rows(tensor, channels[i], 1, 0)
        elif channels is not None and module == "mlp.down_proj" and kind == "weight":
            state[key] = _rows(tensor, channels[i], 1, 1)
        elif heads is not None and module == "self_attn.q_proj":
            state[key] = _rows(tensor, heads[i], d, 0)
        elif heads is not None and module in ("self_attn.k_proj", "self_attn.v_proj"):
            state[key] = _rows(tensor, (heads[i] // per_group).unique(), d, 0)
        elif heads is not None and module == "self_attn.o_proj" and kind == "weight":
            state[key] = _rows(tensor, heads[i], d, 1)
        elif heads is not None and backend_key in backend_params:
            state[key] = _rows(tensor, heads[i], 1, backend_params[backend_key])
        else:
            state[key] = clone(tensor)
    changes: dict[str, Any] = {"source": None}
    if channels is not None:
        changes["intermediate_size"] = channels[0].numel()
    if heads is not None:
        # head_dim stays explicit: hidden_size // num_attention_heads changes with the head count.
        changes.update(num_attention_heads=heads[0].numel(), head_dim=d,
                       num_key_value_heads=(heads[0] // per_group).unique().numel())
    return state, dataclasses.replace(copy.deepcopy(config), **changes)  # no dict / list shared with model's


# ----------------------------------------------------------------------------- step 2


def prune_model(model: nn.Module, keep_channels: Sequence[Any] | None = None,
                keep_heads: Sequence[Any] | None = None) -> nn.Module:
    """A new, smaller model keeping the given channels / heads per layer (see
    :func:`pruned_state_dict`); ``model`` is left as it was. Pruning a channel or head gives
    exactly the model in which its weights were zero (its output contribution removed)."""
    state, config = pruned_state_dict(model, keep_channels, keep_heads)
    with torch.device("meta"):
        pruned = type(model)(config)
    pruned.load_state_dict(state, strict=True, assign=True)
    pruned.tie_weights()
    pruned.train(model.training)
    pruned.gradient_checkpointing = model.gradient_checkpointing
    return pruned


# ----------------------------------------------------------------------------- report


def _linear_params(model: nn.Module, owner: str, names: Sequence[str]) -> int:
    total = 0
    for layer in model.model.layers:
        for name in names:
            total += sum(p.numel() for p in getattr(getattr(layer, owner), name).parameters())
    return total


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``mlp`` / ``attention`` (the prunable linears of the decoder blocks), ``prunable`` (their
    sum) and ``total`` (every parameter, tied ones once)."""
    mlp = _linear_params(model, "mlp", _MLP)
    attention = _linear_params(model, "self_attn", _ATTENTION)
    return {"mlp": mlp, "attention": attention, "prunable": mlp + attention, "total": model.num_parameters()}


@dataclass
class PruneReport:
    """Sizes and parameter counts before and after pruning; fractions are of the ``before``."""

    method: str
    requested: dict[str, Any]
    intermediate_size_before: int
    intermediate_size_after: int
    num_attention_heads_before: int
    num_attention_heads_after: int
    num_key_value_heads_before: int
    num_key_value_heads_after: int
    mlp_params_before: int
    mlp_params_after: int
    attention_params_before: int
    attention_params_after: int
    prunable_params_before: int
    prunable_params_after: int
    total_params_before: int
    total_params_after: int
    kept_heads: list[list[int]] | None = None

    @staticmethod
    def _removed(before: int, after: int) -> float:
        return 1.0 - after / before if before else 0.0

    @property
    def mlp_fraction_removed(self) -> float:
        return self._removed(self.mlp_params_before, self.mlp_params_after)

    @property
    def attention_fraction_removed(self) -> float:
        return self._removed(self.attention_params_before, self.attention_params_after)

    @property
    def prunable_fraction_removed(self) -> float:
        return self._removed(self.prunable_params_before, self.prunable_params_after)

    @property
    def total_fraction_removed(self) -> float:
        return self._removed(self.total_params_before, self.total_params_after)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in ("mlp", "attention", "prunable", "total"):
            d[f"{name}_fraction_removed"] = getattr(self, f"{name}_fraction_removed")
        return d

    def summary(self) -> str:
        return (f"pruned {100 * self.prunable_fraction_removed:.1f}% of the prunable parameters "
                f"({self.prunable_params_before:,d} -> {self.prunable_params_after:,d}), "
                f"{100 * self.total_fraction_removed:.1f}% of all ({self.total_params_before:,d} -> "
                f"{self.total_params_after:,d}); intermediate_size {self.intermediate_size_before} -> "
                f"{self.intermediate_size_after}, heads {self.num_attention_heads_before} -> "
                f"{self.num_attention_heads_after}, KV heads {self.num_key_value_heads_before} -> "
                f"{self.num_key_value_heads_after}")


def prune_report(before: nn.Module, after: nn.Module, method: str, requested: dict[str, Any] | None = None,
                 kept_heads: Sequence[torch.Tensor] | None = None) -> PruneReport:
    b, a = count_parameters(before), count_parameters(after)
    cb, ca = before.config, after.config
    return PruneReport(
        method=method, requested=dict(requested or {}),
        intermediate_size_before=cb.intermediate_size, intermediate_size_after=ca.intermediate_size,
        num_attention_heads_before=cb.num_attention_heads, num_attention_heads_after=ca.num_attention_heads,
        num_key_value_heads_before=cb.num_key_value_heads, num_key_value_heads_after=ca.num_key_value_heads,
        mlp_params_before=b["mlp"], mlp_params_after=a["mlp"],
        attention_params_before=b["attention"], attention_params_after=a["attention"],
        prunable_params_before=b["prunable"], prunable_params_after=a["prunable"],
        total_params_before=b["total"], total_params_after=a["total"],
        kept_heads=[h.tolist() for h in kept_heads] if kept_heads is not None else None,
    )


# ----------------------------------------------------------------------------- all together


def prune(model: nn.Module, cfg: PruneConfig, calibration_data: Any = None) -> tuple[nn.Module, PruneReport]:
    """Score, select and prune: ``(pruned model, report)``. ``model`` is left as it was."""
    if not isinstance(cfg, PruneConfig):
        raise ConfigError("config", f"expected a PruneConfig, got {type(cfg).__name__}")
    check_prunable(model, heads=cfg.prunes_heads)
    shape = pruned_shape(model.config, cfg)
    channel_scores, head_scores = score_model(model, cfg.method, calibration_data, mlp=cfg.prunes_mlp,
                                              heads=cfg.prunes_heads, max_batches=cfg.calibration_batches)
    keep_channels = select_channels(channel_scores, shape.intermediate_size) if cfg.prunes_mlp else None
    keep_heads = None
    if cfg.prunes_heads:
        keep_heads = select_heads(head_scores, model.config.num_key_value_heads, shape.num_key_value_heads,
                                  shape.heads_per_group)
    pruned = prune_model(model, keep_channels, keep_heads)
    requested = {k: v for k, v in cfg.to_dict().items() if k in ("ratio", "mlp_ratio", "head_ratio", "targets")}
    return pruned, prune_report(model, pruned, cfg.method, requested, keep_heads)
