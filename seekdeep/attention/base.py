"""The contract every attention backend follows.

A backend is an ``nn.Module`` built from an :class:`AttentionSpec` and called as::

    out = backend(q, k, v, mask=mask, scale=scale, hidden_states=x, cache_state=state)

* ``q``: (B, H, Tq, Dqk) queries, already rotated (RoPE) and normed.
* ``k``: (B, Hkv, Tk, Dqk) and ``v``: (B, Hkv, Tk, Dv) keys / values for *every* slot
  visible to this step (cached slots first, then this step's), ``H % Hkv == 0``.
* ``mask``: an :class:`AttentionMask` (causality, padding, sliding window).
* ``hidden_states``: (B, Tq, C) the layer's input for this step's tokens; backends with
  parameters of their own (the DSA indexer, the attention gate) read it.
* ``cache_state``: a dict owned by the backend inside the layer's KV cache, or ``None``
  when no cache is used; the DSA backend keeps its index keys there.

It returns (B, H, Tq, Dv). The query at row ``i`` sits at slot ``mask.q_offset + i``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttentionSpec:
    """What a backend needs to know about the attention layer it serves."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # query/key head dim
    v_head_dim: int
    options: dict[str, Any] = field(default_factory=dict)  # backend-specific settings


@dataclass
class AttentionMask:
    """Which keys each query may see, without materialising a dense mask up front.

    ``key_valid`` (B, Tk) marks real tokens (False for left padding); ``q_offset`` is the
    slot of the first query; ``sliding_window`` limits how far back a query may look;
    ``document_ids`` (B, Tk), for rows that pack several sequences, lets a query see only the
    keys of its own document (a block-diagonal causal mask; only backends that attend through
    :meth:`to_bool` honour it, and the model refuses the others).
    """

    q_len: int
    k_len: int
    key_valid: torch.Tensor | None = None
    sliding_window: int | None = None
    document_ids: torch.Tensor | None = None

    @property
    def q_offset(self) -> int:
        return self.k_len - self.q_len

    @property
    def is_plain_causal(self) -> bool:
        """True when ``is_causal=True`` of SDPA expresses the mask exactly."""
        return (
            self.key_valid is None
            and self.document_ids is None
            and self.q_len == self.k_len
            and (self.sliding_window is None or self.sliding_window >= self.k_len)
        )

    @property
    def sees_every_key(self) -> bool:
        """True when one query (a decode step) may attend to every key: no mask is needed."""
        return (
            self.key_valid is None
            and self.document_ids is None
            and self.q_len == 1
            and (self.sliding_window is None or self.sliding_window >= self.k_len)
        )

    def to_bool(self, device: torch.device | str) -> torch.Tensor:
        """Dense boolean mask, True where attention is allowed: (B or 1, 1, Tq, Tk)."""
        q_slots = torch.arange(self.q_offset, self.k_len, device=device)[:, None]  # (Tq, 1)
        k_slots = torch.arange(self.k_len, device=device)[None, :]  # (1, Tk)
        allowed = k_slots <= q_slots
        if self.sliding_window is not None:
            allowed = allowed & (q_slots - k_slots < self.sliding_window)
        allowed = allowed[None, None]  # (1, 1, Tq, Tk)
        if self.key_valid is not None:
            allowed = allowed & self.key_valid.to(device=device, dtype=torch.bool)[:, None, None, :]
        if self.document_ids is not None:
            docs = self.document_ids.to(device)
            same = docs[:, self.q_offset:, None] == docs[:, None, :]  # (B, Tq, Tk)
            allowed = allowed & same[:, None]
        return allowed


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, T, D) -> (B, Hkv * n_rep, T, D) for grouped-query attention."""
    if n_rep == 1:
        return x
    b, h_kv, t, d = x.shape
    return x[:, :, None].expand(b, h_kv, n_rep, t, d).reshape(b, h_kv * n_rep, t, d)
