"""Multi-head Latent Attention (MLA), as in DeepSeek-V2/V3.

Queries go through a low-rank bottleneck (``q_a_proj -> q_a_layernorm -> q_b_proj``, or a
plain ``q_proj`` when ``q_lora_rank`` is None). Keys and values come from one compressed
latent per token (``kv_a_proj_with_mqa`` -> ``kv_a_layernorm`` -> ``kv_b_proj``) plus a
small RoPE key ``k_pe`` shared by every head ("decoupled RoPE"): each head's key is
``[k_nope_h, k_pe]`` and each query ``[q_nope_h, q_pe_h]``. Module names follow Hugging
Face's ``DeepseekV3Attention`` so checkpoints load without renaming.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from seekdeep.attention import AttentionMask, AttentionSpec, build_attention
from seekdeep.models.common import KVCache, RMSNorm, apply_rope

if TYPE_CHECKING:
    from seekdeep.models.deepseek_v3 import DeepseekV3Config


def yarn_softmax_scale(qk_head_dim: int, rope_scaling: dict[str, Any] | None) -> float:
    """``qk_head_dim**-0.5``, times ``mscale**2`` when the RoPE scaling sets ``mscale_all_dim``.

    DeepSeek's YaRN keeps the attention temperature of the pretrained model: the cos/sin
    tables carry ``mscale / mscale_all_dim`` and the softmax scale ``mscale_all_dim**2``.
    Like transformers, this applies to any non-default rope type that sets the field.
    """
    scale = qk_head_dim**-0.5
    if rope_scaling and rope_scaling.get("rope_type", "default") != "default":
        mscale_all_dim = rope_scaling.get("mscale_all_dim") or 0
        factor = float(rope_scaling["factor"])
        if mscale_all_dim and factor > 1:
            mscale = 0.1 * mscale_all_dim * math.log(factor) + 1.0
            scale = scale * mscale * mscale
    return scale


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """(..., D) with rotary pairs ``(x0, x1), (x2, x3), ...`` -> ``(x0, x2, ..., x1, x3, ...)``.

    DeepSeek's original weights rotate adjacent pairs; after this permutation the usual
    half-split ``apply_rope`` rotates the same pairs. transformers returns the rotated values
    in this de-interleaved order too, and queries and keys are permuted alike, so q.k and
    therefore the outputs are unchanged.
    """
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


class MultiHeadLatentAttention(nn.Module):
    """MLA with a pluggable attention core ``inner`` (any registered backend).

    The KV cache holds the expanded per-head keys (B, H, T, qk_head_dim) and values
    (B, H, T, v_head_dim), so every backend works unchanged. Caching only the latent
    (kv_lora_rank + qk_rope_head_dim per token) and absorbing ``kv_b_proj`` into the query
    and output projections would shrink the cache by roughly H * (Dqk + Dv) / (R + Dr);
    that is a later optimisation.
    """

    def __init__(self, config: "DeepseekV3Config"):
        super().__init__()
        c = config
        self.num_heads = c.num_attention_heads
        self.q_lora_rank, self.kv_lora_rank = c.q_lora_rank, c.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.qk_head_dim = c.qk_nope_head_dim + c.qk_rope_head_dim
        self.rope_interleave = c.rope_interleave
        h = self.num_heads
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, h * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            # transformers builds both latent norms with its default eps (1e-6), not rms_norm_eps.
            self.q_a_layernorm = RMSNorm(c.q_lora_rank)
            self.q_b_proj = nn.Linear(c.q_lora_rank, h * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, h * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * c.v_head_dim, c.hidden_size, bias=c.attention_bias)
        self.scale = yarn_softmax_scale(self.qk_head_dim, c.rope_scaling)
        spec = AttentionSpec(c.hidden_size, h, h, self.qk_head_dim, c.v_head_dim, dict(c.attention_options))
        self.inner = build_attention(c.attention_backend, spec)

    def forward(self, x, cos, sin, mask: AttentionMask, cache: KVCache | None, layer_idx: int) -> torch.Tensor:
        b, t, _ = x.shape
        h, d_nope, d_rope = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, t, h, self.qk_head_dim).transpose(1, 2)  # (B, H, T, Dqk)
        q_nope, q_pe = q.split([d_nope, d_rope], dim=-1)  # (B, H, T, Dn), (B, H, T, Dr)

        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, d_rope], dim=-1)  # (B, T, R), (B, T, Dr)
        latent = self.kv_a_layernorm(latent)
        k_pe = k_pe.view(b, 1, t, d_rope)  # (B, 1, T, Dr): one RoPE key shared by all heads
        if self.rope_interleave:
            q_pe, k_pe = deinterleave(q_pe), deinterleave(k_pe)
        q_pe = apply_rope(q_pe, cos, sin)
        k_pe = apply_rope(k_pe, cos, sin)

        kv = self.kv_b_proj(latent).view(b, t, h, d_nope + self.v_head_dim).transpose(1, 2)  # (B, H, T, Dn + Dv)
        k_nope, v = kv.split([d_nope, self.v_head_dim], dim=-1)  # (B, H, T, Dn), (B, H, T, Dv)
        k = torch.cat((k_nope, k_pe.expand(b, h, t, d_rope)), dim=-1)  # (B, H, T, Dqk)
        q = torch.cat((q_nope, q_pe), dim=-1)  # (B, H, T, Dqk)
        state = None
        if cache is not None:
            k, v = cache.update(layer_idx, k, v.contiguous())
            state = cache.layers[layer_idx].backend_state
        out = self.inner(q, k, v, mask=mask, scale=self.scale, hidden_states=x, cache_state=state)  # (B, H, T, Dv)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, h * self.v_head_dim))
