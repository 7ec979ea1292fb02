"""Gated attention (``gated``): dense SDPA with a learned per-head output gate.

Each token's own hidden state sets a gate in (0, 2) for every head, so the gate stays causal
(the original DynamicAttentionGate averaged over the whole sequence, which leaks the future).
The last projection starts at zero: at init every gate is exactly 1 and the backend equals
``sdpa``, so it can be switched on for a pretrained model without changing its outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seekdeep.attention.base import AttentionMask, AttentionSpec
from seekdeep.attention.dense import sdpa_attention
from seekdeep.errors import ConfigError


class GatedAttention(nn.Module):
    """``out_h * 2 * sigmoid(gate_out(silu(gate_proj(x))))_h``.

    ``spec.options``: ``gate_hidden`` (default ``hidden_size // 4``), the gate MLP's width.
    """

    def __init__(self, spec: AttentionSpec):
        super().__init__()
        self.spec = spec
        gate_hidden = spec.options.get("gate_hidden", max(1, spec.hidden_size // 4))
        if isinstance(gate_hidden, bool) or not isinstance(gate_hidden, int) or gate_hidden < 1:
            raise ConfigError("attention_options.gate_hidden", f"got {gate_hidden!r}; accepted: an int >= 1")
        self.gate_proj = nn.Linear(spec.hidden_size, gate_hidden)
        self.gate_out = nn.Linear(gate_hidden, spec.num_heads)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Gate exactly 1 everywhere; also what materialises the gate after ``to_empty``."""
        nn.init.normal_(self.gate_proj.weight, std=0.02)
        nn.init.zeros_(self.gate_proj.bias)
        nn.init.zeros_(self.gate_out.weight)
        nn.init.zeros_(self.gate_out.bias)

    def gate(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, Tq, C) -> (B, Tq, H) gate values in (0, 2)."""
        return 2.0 * torch.sigmoid(self.gate_out(F.silu(self.gate_proj(hidden_states))))

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        mask: AttentionMask,
        scale: float,
        hidden_states: torch.Tensor | None = None,
        cache_state: dict | None = None,
    ) -> torch.Tensor:
        if hidden_states is None:
            raise ValueError("gated attention needs hidden_states (B, Tq, C) for its gate")
        out = sdpa_attention(q, k, v, mask, scale)  # (B, H, Tq, Dv)
        gate = self.gate(hidden_states).transpose(1, 2)[..., None]  # (B, H, Tq, 1)
        return out * gate.to(out.dtype)
