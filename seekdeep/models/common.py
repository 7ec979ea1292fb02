"""Building blocks shared by the model families: norms, rotary embeddings, the KV cache,
the output type and the config fields every family has."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from seekdeep.errors import ConfigError

# ----------------------------------------------------------------------------- config helpers


def require_positive_int(value: Any, name: str, source: str | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(name, f"must be a positive integer, got {value!r}", source=source)


def parse_rope(d: dict[str, Any], source: str | None) -> tuple[float, dict[str, Any] | None]:
    """Read RoPE settings from either layout transformers has used.

    transformers 5 writes ``rope_parameters = {"rope_theta": ..., "rope_type": ...}``; older
    checkpoints write ``rope_theta`` and an optional ``rope_scaling`` dict. Returns
    ``(theta, scaling)`` with ``scaling=None`` for plain RoPE.
    """
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or None
    if not isinstance(params, dict):
        raise ConfigError("rope_parameters", f"must be an object, got {type(params).__name__}", source=source)
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise ConfigError("rope_theta", f"must be a positive number, got {theta!r}", source=source)
    merged = dict(scaling or {})
    merged.update({k: v for k, v in params.items() if k != "rope_theta"})
    rope_type = merged.pop("rope_type", merged.pop("type", "default"))
    if rope_type == "default" and not merged:
        return float(theta), None
    if rope_type not in ROPE_TYPES:
        raise ConfigError(
            "rope_parameters.rope_type", f"unsupported {rope_type!r}; accepted: {', '.join(ROPE_TYPES)}", source=source
        )
    if rope_type != "default" and "factor" not in merged:
        raise ConfigError("rope_parameters.factor", f"required for rope_type {rope_type!r}", source=source)
    return float(theta), {"rope_type": rope_type, **merged}


def rope_to_hf(theta: float, scaling: dict[str, Any] | None) -> dict[str, Any]:
    return {"rope_parameters": {"rope_theta": theta, "rope_type": "default", **(scaling or {})}}


# ----------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(
    dim: int, theta: float, scaling: dict[str, Any] | None, max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (dim/2,) and the factor cos/sin are multiplied by.

    Always computed on the CPU (not under an ambient meta device) and moved at use."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    if scaling is None:
        return inv_freq, 1.0
    kind, factor = scaling["rope_type"], float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(is_medium, smoothed, scaled), 1.0
    if kind == "yarn":
        orig = scaling.get("original_max_position_embeddings") or max_position_embeddings
        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
            if mscale and mscale_all:
                attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
            else:
                attention_factor = _yarn_mscale(factor)
        beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:
            return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(theta))

        lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - lo) / (hi - lo)).clamp(0, 1)
        extrapolation = 1 - ramp
        inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
        return inv_freq, float(attention_factor)
    raise ConfigError("rope_parameters.rope_type", f"unsupported {kind!r}; accepted: {', '.join(ROPE_TYPES)}")


class RotaryEmbedding(nn.Module):
    """cos/sin tables computed on the fly from positions (no buffers, so meta-device
    construction and ``assign=True`` loading need no fix-up)."""

    def __init__(self, dim: int, theta: float, scaling: dict[str, Any] | None, max_position_embeddings: int):
        super().__init__()
        self.dim = dim
        self._inv_freq, self.attention_factor = rope_inv_freq(dim, theta, scaling, max_position_embeddings)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self._inv_freq.to(position_ids.device)
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, dim)
        return (emb.cos() * self.attention_factor).to(dtype), (emb.sin() * self.attention_factor).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (B, T, D)."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------- KV cache


@dataclass
class LayerCache:
    k: torch.Tensor | None = None  # (B, Hkv, T, Dqk): a view of the first T slots of k_buffer
    v: torch.Tensor | None = None  # (B, Hkv, T, Dv)
    backend_state: dict[str, Any] = field(default_factory=dict)
    k_buffer: torch.Tensor | None = None  # (B, Hkv, capacity, Dqk)
    v_buffer: torch.Tensor | None = None  # (B, Hkv, capacity, Dv)


def _grown_capacity(needed: int, current: int) -> int:
    """Slots to allocate when ``needed`` no longer fits: a quarter more than needed (at least
    256 slots), so a decode step copies the cache only every ~n/4 tokens (amortised O(1) per
    token instead of the O(n) of concatenating) while wasting at most ~25% of the memory."""
    return max(needed + max(256, needed // 4), current)


class KVCache:
    """Contiguous per-layer key/value cache for generation (one sequence slot per row).

    Keys and values live in pre-allocated buffers that grow geometrically; ``layers[i].k`` /
    ``.v`` are views of the filled part, so appending one token writes one slot."""

    def __init__(self, num_layers: int):
        self.layers = [LayerCache() for _ in range(num_layers)]

    @property
    def seq_len(self) -> int:
        first = self.layers[0]
        return 0 if first.k is None else first.k.shape[2]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's keys / values (B, Hkv, T, D) and return the whole cache's views."""
        layer = self.layers[layer_idx]
        filled = 0 if layer.k is None else layer.k.shape[2]
        needed = filled + k.shape[2]
        buf = layer.k_buffer
        if buf is None or needed > buf.shape[2] or buf.dtype != k.dtype or buf.device != k.device:
            capacity = _grown_capacity(needed, 0 if buf is None else buf.shape[2])
            layer.k_buffer = self._grow(layer.k, k, capacity)
            layer.v_buffer = self._grow(layer.v, v, capacity)
        layer.k_buffer[:, :, filled:needed] = k
        layer.v_buffer[:, :, filled:needed] = v
        layer.k, layer.v = layer.k_buffer[:, :, :needed], layer.v_buffer[:, :, :needed]
        return layer.k, layer.v

    @staticmethod
    def _grow(filled: torch.Tensor | None, new: torch.Tensor, capacity: int) -> torch.Tensor:
        b, h, _, d = new.shape
        buffer = new.new_empty(b, h, capacity, d)
        if filled is not None:
            buffer[:, :, : filled.shape[2]] = filled
        return buffer

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (used when finished sequences leave the batch)."""
        for layer in self.layers:
            if layer.k is not None:
                n = layer.k.shape[2]
                layer.k_buffer, layer.v_buffer = layer.k_buffer[rows], layer.v_buffer[rows]
                layer.k, layer.v = layer.k_buffer[:, :, :n], layer.v_buffer[:, :, :n]
            layer.backend_state = {
                name: t[rows] if isinstance(t, torch.Tensor) else t for name, t in layer.backend_state.items()
            }


# ----------------------------------------------------------------------------- outputs


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # (B, T, vocab)
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # e.g. the DSA indexer's KL loss, summed over layers
    past_key_values: KVCache | None = None
    hidden_states: torch.Tensor | None = None  # last layer, after the final norm


def positions_from_mask(attention_mask: torch.Tensor | None, past_len: int, q_len: int, batch: int, device) -> torch.Tensor:
    """Position ids of this step's tokens: left padding does not advance the position."""
    if attention_mask is None:
        return torch.arange(past_len, past_len + q_len, device=device).expand(batch, q_len)
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.clamp(min=0)
    return positions[:, past_len : past_len + q_len]
