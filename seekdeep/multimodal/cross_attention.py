"""Cross-attention from text to other modalities.

- :class:`GatedCrossAttentionBlock` (Flamingo): pre-norm cross-attention then a feed-forward,
  each added through ``tanh(gate)`` with the gate starting at 0, so a frozen LM with these
  blocks interleaved computes exactly what it computed without them until the gates move.
- :class:`MediaContext`: which images each text token may see ('previous': the image whose
  marker came last before it; 'all_previous': every image before it), carried across decode
  steps.
- :class:`PerceiverResampler`: a fixed number of learned latents that attend over an image's
  (variable) patch features.
- :class:`CrossModalAttention`: the bridge for several modality feature sets at once: one
  projection per modality into the text width plus a learned modality embedding, one
  attention over all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from seekdeep.errors import ConfigError


class MultiHeadCrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, kv_dim: int | None = None):
        super().__init__()
        if dim % num_heads:
            raise ConfigError("num_heads", f"{num_heads} must divide the width {dim}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        kv_dim = kv_dim or dim
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(kv_dim, dim, bias=False)
        self.v_proj = nn.Linear(kv_dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, C); context: (B, S, Ckv); mask: (B, T, S) bool, True = may attend."""
        b, t, c = x.shape
        s = context.shape[1]
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(context).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, S, D)
        v = self.v_proj(context).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None])
        return self.o_proj(out.transpose(1, 2).reshape(b, t, c))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * mult, bias=False)
        self.fc2 = nn.Linear(dim * mult, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


@dataclass
class MediaContext:
    """Images of a batch laid out per row, and which of them each current token sees."""

    media: torch.Tensor  # (B, M, L, C): row b's images, zero-padded to M
    valid: torch.Tensor  # (B, M) bool
    media_index: torch.Tensor  # (B, T): images seen at or before each current token (1-based; 0 = none)
    mode: str

    @classmethod
    def build(cls, features: torch.Tensor, is_image: torch.Tensor, mode: str) -> "MediaContext":
        """features: (N, L, C), the batch's images in the order their markers appear (row by
        row); is_image: (B, T) bool marker positions."""
        counts = is_image.sum(1).tolist()
        b, m = is_image.shape[0], max(max(counts), 1)
        media = features.new_zeros(b, m, *features.shape[1:])
        valid = torch.zeros(b, m, dtype=torch.bool, device=features.device)
        start = 0
        for row, n in enumerate(counts):
            media[row, :n] = features[start : start + n]
            valid[row, :n] = True
            start += n
        return cls(media, valid, is_image.long().cumsum(1), mode)

    def advance(self, is_image: torch.Tensor) -> "MediaContext":
        """The context for the next tokens (a decode step): markers among them count on."""
        last = self.media_index[:, -1:]
        return MediaContext(self.media, self.valid, last + is_image.long().cumsum(1), self.mode)

    def attention_mask(self) -> torch.Tensor:
        """(B, T, M * L) bool: may token t attend to latent l of image m."""
        b, m, l, _ = self.media.shape
        image = torch.arange(m, device=self.media.device)  # (M,)
        seen = self.media_index[..., None]  # (B, T, 1)
        visible = image == seen - 1 if self.mode == "previous" else image < seen  # (B, T, M)
        visible = visible & self.valid[:, None]
        return visible[..., None].expand(b, visible.shape[1], m, l).reshape(b, visible.shape[1], m * l)


class GatedCrossAttentionBlock(nn.Module):
    """x -> x + tanh(a) * xattn(norm(x), media) -> x + tanh(f) * ff(x); tokens that see no
    image are left exactly as they were."""

    def __init__(self, dim: int, num_heads: int, ff_mult: int = 2):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = MultiHeadCrossAttention(dim, num_heads)
        self.ff = FeedForward(dim, ff_mult)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.attn_gate)
        nn.init.zeros_(self.ff_gate)

    def forward(self, x: torch.Tensor, media: MediaContext) -> torch.Tensor:
        b, m, l, c = media.media.shape
        mask = media.attention_mask()  # (B, T, M*L)
        sees_any = mask.any(-1, keepdim=True)  # (B, T, 1)
        safe_mask = mask | ~sees_any  # a fully masked row would give NaN; its update is dropped below
        context = media.media.reshape(b, m * l, c).to(x.dtype)
        h = x + self.attn_gate.tanh() * self.attn(self.norm(x), context, safe_mask)
        h = h + self.ff_gate.tanh() * self.ff(h)
        return torch.where(sees_any, h, x)


class PerceiverResampler(nn.Module):
    """(N, P, C) image features -> (N, num_latents, C)."""

    def __init__(self, dim: int, num_latents: int, depth: int = 2, num_heads: int = 4, ff_mult: int = 2):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * 0.02)
        self.layers = nn.ModuleList(
            nn.ModuleDict(dict(norm_media=nn.LayerNorm(dim), norm_latents=nn.LayerNorm(dim), attn=MultiHeadCrossAttention(dim, num_heads),
                               ff=FeedForward(dim, ff_mult)))
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.latents.to(features.dtype).expand(features.shape[0], -1, -1)  # (N, L, C)
        for layer in self.layers:
            # the latents attend to the image and to themselves (Flamingo's keys: [media; latents])
            latents = layer["norm_latents"](x)
            context = torch.cat([layer["norm_media"](features), latents], dim=1)  # (N, P + L, C)
            x = x + layer["attn"](latents, context)
            x = x + layer["ff"](x)
        return self.norm(x)


class CrossModalAttention(nn.Module):
    """Text attends to several modalities' features at once.

    ``modality_dims`` maps a modality name to its feature width; each gets a projection into
    the text width and a learned modality embedding, so one attention can tell them apart.
    ``forward(x, {"image": (B, P, Di), "audio": (B, Q, Da)}, masks={...})`` returns the
    updated text states (B, T, C); the update is gated by tanh(gate), 0 at init."""

    def __init__(self, dim: int, modality_dims: dict[str, int], num_heads: int = 4):
        super().__init__()
        if not modality_dims:
            raise ConfigError("modality_dims", "name at least one modality and its feature width")
        self.projections = nn.ModuleDict({name: nn.Linear(d, dim) for name, d in modality_dims.items()})
        self.modality_embeddings = nn.ParameterDict({name: nn.Parameter(torch.zeros(dim)) for name in modality_dims})
        self.norm = nn.LayerNorm(dim)
        self.attn = MultiHeadCrossAttention(dim, num_heads)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, features: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        unknown = sorted(set(features) - set(self.projections))
        if unknown or not features:
            raise ConfigError("features", f"unknown modality {unknown[:1] or 'none given'}; accepted: {', '.join(self.projections)}")
        parts, valid = [], []
        for name, feats in features.items():
            if feats.dim() != 3 or feats.shape[0] != x.shape[0]:
                raise ConfigError(f"features.{name}", f"expected (batch={x.shape[0]}, tokens, width), got {tuple(feats.shape)}")
            parts.append(self.projections[name](feats) + self.modality_embeddings[name])  # (B, P_m, C)
            m = (masks or {}).get(name)
            valid.append(torch.ones(feats.shape[:2], dtype=torch.bool, device=x.device) if m is None else m.bool())
        context = torch.cat(parts, dim=1)  # (B, sum P_m, C)
        keep = torch.cat(valid, dim=1)  # (B, S)
        sees_any = keep.any(-1)[:, None, None]  # (B, 1, 1)
        mask = (keep | ~keep.any(-1, keepdim=True))[:, None].expand(-1, x.shape[1], -1)  # (B, T, S)
        out = x + self.gate.tanh() * self.attn(self.norm(x), context, mask)
        return torch.where(sees_any, out, x)
