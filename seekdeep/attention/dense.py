"""Dense attention backends: ``eager`` (the reference) and ``sdpa``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seekdeep.attention.base import AttentionMask, AttentionSpec, repeat_kv


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float
) -> torch.Tensor:
    """Plain softmax(QK^T)V in fp32 with a boolean mask; rows with no allowed key give 0."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.matmul(probs, v.float()).to(q.dtype)


class EagerAttention(nn.Module):
    """Reference implementation every other backend is tested against."""

    def __init__(self, spec: AttentionSpec):
        super().__init__()
        self.spec = spec

    def forward(self, q, k, v, *, mask: AttentionMask, scale: float, hidden_states=None, cache_state=None):
        return eager_attention(q, k, v, mask.to_bool(q.device), scale)


def sdpa_attention(q, k, v, mask: AttentionMask, scale: float) -> torch.Tensor:
    """torch's fused scaled_dot_product_attention (flash / memory-efficient / math)."""
    gqa = q.shape[1] != k.shape[1]
    if mask.is_plain_causal:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if mask.sees_every_key:  # a decode step without padding: no mask to build
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    allowed = mask.to_bool(q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa)
    # A fully padded query row (left padding) has no key; SDPA returns NaN there.
    return out.nan_to_num(0.0) if mask.key_valid is not None else out


class SDPAAttention(nn.Module):
    def __init__(self, spec: AttentionSpec):
        super().__init__()
        self.spec = spec

    def forward(self, q, k, v, *, mask: AttentionMask, scale: float, hidden_states=None, cache_state=None):
        return sdpa_attention(q, k, v, mask, scale)
