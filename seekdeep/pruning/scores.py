"""Importance scores of MLP channels and attention heads, and the choice of what to keep.

Higher scores mean more important. Two methods:

* ``l1``: the L1 norm of every weight (and bias) that belongs to the channel / head and
  disappears with it: the gate and up rows and the down column of a channel; the q rows and
  o columns of a query head plus an equal share of its KV head's k and v rows (so the
  scores of a group sum to the L1 norm of everything the group owns).
* ``activation``: what the channel / head adds to the layer's output on calibration data:
  ``mean_tokens |silu(gate) * up|_c * ||down[:, c]||_2`` for a channel, and the mean over
  tokens of ``||o_proj restricted to head h (head h's attention output)||_2`` for a head. Read
  by forward pre-hooks on ``down_proj`` and ``o_proj``; the model is not modified.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch
from torch import nn

from seekdeep.errors import ConfigError
from seekdeep.pruning.config import METHODS
from seekdeep.quantization.convert import iter_token_batches


def _layers(model: nn.Module) -> list[nn.Module]:
    return list(model.model.layers)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ConfigError("method", f"unknown method {method!r}; accepted: {', '.join(METHODS)}")


def _abs_sum(tensor: torch.Tensor | None, dims) -> torch.Tensor | float:
    return 0.0 if tensor is None else tensor.detach().float().abs().sum(dims)


# ----------------------------------------------------------------------------- l1


@torch.no_grad()
def l1_channel_scores(model: nn.Module) -> list[torch.Tensor]:
    """Per layer, (intermediate_size,) L1 norm of each channel's gate / up rows and down column."""
    scores = []
    for layer in _layers(model):
        mlp = layer.mlp
        score = _abs_sum(mlp.gate_proj.weight, 1) + _abs_sum(mlp.up_proj.weight, 1) + _abs_sum(mlp.down_proj.weight, 0)
        if mlp.gate_proj.bias is not None:
            score = score + mlp.gate_proj.bias.float().abs() + mlp.up_proj.bias.float().abs()
        scores.append(score)
    return scores


@torch.no_grad()
def l1_head_scores(model: nn.Module) -> list[torch.Tensor]:
    """Per layer, (num_attention_heads,) L1 norm of each query head's q rows and o columns plus
    ``1 / heads_per_group`` of its KV head's k and v rows."""
    scores = []
    for layer in _layers(model):
        attn = layer.self_attn
        h, g, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
        q = attn.q_proj.weight.view(h, d, -1)  # (H, D, C)
        o = attn.o_proj.weight.view(-1, h, d)  # (C, H, D)
        score = _abs_sum(q, (1, 2)) + _abs_sum(o, (0, 2))
        kv = _abs_sum(attn.k_proj.weight.view(g, d, -1), (1, 2)) + _abs_sum(attn.v_proj.weight.view(g, d, -1), (1, 2))
        if attn.q_proj.bias is not None:
            score = score + _abs_sum(attn.q_proj.bias.view(h, d), 1)
            kv = kv + _abs_sum(attn.k_proj.bias.view(g, d), 1) + _abs_sum(attn.v_proj.bias.view(g, d), 1)
        scores.append(score + kv.repeat_interleave(h // g) / (h // g))
    return scores


# ----------------------------------------------------------------------------- activation


@torch.no_grad()
def activation_statistics(
    model: nn.Module, calibration_data: Any, *, mlp: bool = True, heads: bool = True, max_batches: int | None = None
) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]:
    """One pass over ``calibration_data`` (an iterable of (batch, seq) input-id tensors).

    Returns per layer the mean ``|silu(gate) * up|`` of every channel, (intermediate_size,),
    and the mean norm of every head's contribution to the ``o_proj`` output,
    (num_attention_heads,); None for a kind not asked for."""
    layers = _layers(model)
    device = model.lm_head.weight.device
    channel_sums = [torch.zeros(layer.mlp.down_proj.in_features, device=device) for layer in layers] if mlp else None
    head_sums = [torch.zeros(layer.self_attn.num_heads, device=device) for layer in layers] if heads else None
    handles = []

    def channel_hook(module, args, idx):
        inter = args[0].detach().float().flatten(0, -2)  # (N, I)
        channel_sums[idx] += inter.abs().sum(0)

    def head_hook(module, args, idx, gram, h, d):
        out = args[0].detach().float().reshape(-1, h, d)  # (N, H, D): each head's attention output
        # ||W_h x_h||^2 = x_h^T (W_h^T W_h) x_h: a (D, D) Gram matrix per head instead of an (N, H, C) tensor.
        squared = torch.einsum("nhd,hde,nhe->nh", out, gram, out)  # (N, H)
        head_sums[idx] += squared.clamp_min(0).sqrt().sum(0)

    for idx, layer in enumerate(layers):
        if mlp:
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(
                lambda m, a, idx=idx: channel_hook(m, a, idx)))
        if heads:
            attn = layer.self_attn
            h, d = attn.num_heads, attn.head_dim
            w = attn.o_proj.weight.detach().float().view(-1, h, d)  # (C, H, D)
            gram = torch.einsum("chd,che->hde", w, w)  # (H, D, D)
            handles.append(attn.o_proj.register_forward_pre_hook(
                lambda m, a, idx=idx, gram=gram, h=h, d=d: head_hook(m, a, idx, gram, h, d)))
    was_training = model.training
    model.eval()
    tokens = 0
    try:
        for step, batch in enumerate(iter_token_batches(model, calibration_data, "calibration_data", "activation")):
            if max_batches is not None and step >= max_batches:
                break
            model(batch.to(device))
            tokens += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    channel_means = [s / tokens for s in channel_sums] if mlp else None
    head_means = [s / tokens for s in head_sums] if heads else None
    return channel_means, head_means


@torch.no_grad()
def _activation_channel_scores(model: nn.Module, mean_abs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [m * layer.mlp.down_proj.weight.detach().float().norm(dim=0) for m, layer in zip(mean_abs, _layers(model))]


# ----------------------------------------------------------------------------- public scores


def _warn_unused(calibration_data: Any) -> None:
    if calibration_data is not None:
        warnings.warn("method 'l1' does not use calibration_data; it was ignored", stacklevel=3)


def score_mlp_channels(model: nn.Module, method: str = "l1", calibration_data: Any = None,
                       max_batches: int | None = None) -> list[torch.Tensor]:
    """Per layer, a (intermediate_size,) fp32 importance score of every MLP channel."""
    _check_method(method)
    if method == "l1":
        _warn_unused(calibration_data)
        return l1_channel_scores(model)
    mean_abs, _ = activation_statistics(model, calibration_data, heads=False, max_batches=max_batches)
    return _activation_channel_scores(model, mean_abs)


def score_heads(model: nn.Module, method: str = "l1", calibration_data: Any = None,
                max_batches: int | None = None) -> list[torch.Tensor]:
    """Per layer, a (num_attention_heads,) fp32 importance score of every query head."""
    _check_method(method)
    if method == "l1":
        _warn_unused(calibration_data)
        return l1_head_scores(model)
    return activation_statistics(model, calibration_data, mlp=False, max_batches=max_batches)[1]


def score_model(model: nn.Module, method: str, calibration_data: Any = None, *, mlp: bool = True, heads: bool = True,
                max_batches: int | None = None) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]:
    """Channel and head scores together (one calibration pass for ``activation``)."""
    _check_method(method)
    if method == "l1":
        _warn_unused(calibration_data)
        return (l1_channel_scores(model) if mlp else None), (l1_head_scores(model) if heads else None)
    mean_abs, head_scores = activation_statistics(model, calibration_data, mlp=mlp, heads=heads, max_batches=max_batches)
    return (_activation_channel_scores(model, mean_abs) if mlp else None), head_scores


# ----------------------------------------------------------------------------- what to keep


def _descending(scores: torch.Tensor) -> torch.Tensor:
    # Stable, so equal scores (e.g. several all-zero channels) keep the lower indices every time.
    return torch.sort(scores.detach().float().cpu(), descending=True, stable=True).indices


def select_channels(scores: Sequence[torch.Tensor], keep: int) -> list[torch.Tensor]:
    """Per layer, the sorted indices of the ``keep`` best-scoring channels."""
    return [_descending(s)[:keep].sort().values for s in scores]


def select_heads(scores: Sequence[torch.Tensor], num_key_value_heads: int, keep_groups: int,
                 keep_per_group: int) -> list[torch.Tensor]:
    """Per layer, the sorted indices of the query heads to keep: the ``keep_per_group`` best
    heads of each of the ``keep_groups`` KV groups whose kept heads score highest.

    Query head ``h`` belongs to KV group ``h // heads_per_group`` (transformers' layout), so
    sorted indices list the kept groups in order, each with its heads together."""
    out = []
    for s in scores:
        per_group = s.shape[0] // num_key_value_heads
        grouped = s.detach().float().cpu().view(num_key_value_heads, per_group)  # (G, n)
        order = torch.sort(grouped, dim=1, descending=True, stable=True).indices[:, :keep_per_group]  # (G, n')
        group_scores = grouped.gather(1, order).sum(1)  # (G,)
        groups = _descending(group_scores)[:keep_groups].sort().values  # (G',)
        heads = groups[:, None] * per_group + order[groups]  # (G', n')
        out.append(heads.flatten().sort().values)
    return out
