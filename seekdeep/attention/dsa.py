"""Dynamic sparse attention (``dsa``): a lightning indexer picks the top-k keys per query.

Follows DeepSeek-V3.2: a few cheap ReLU index heads score every visible key, each query keeps
its ``topk`` best keys (plus the most recent ``local_window`` slots), and ordinary softmax
attention runs over those keys only. Two training signals reach the indexer:

* a straight-through term ``s - s.detach()`` added to the logits of the selected keys, so the
  LM loss trains the indexer without changing the forward value;
* an auxiliary KL loss towards the dense attention distribution (``compute_indexer_loss``),
  optionally with dense attention during a warm-up stage (``dense_warmup``).

Simplifications against DeepSeek-V3.2: the index queries come from ``hidden_states`` (not the
query LoRA latent), the index heads have no RoPE, and no FP8 / Hadamard rotation is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seekdeep.attention.base import AttentionMask, AttentionSpec, repeat_kv
from seekdeep.attention.dense import sdpa_attention
from seekdeep.errors import ConfigError


def _int_option(options: dict, name: str, default: int) -> int:
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"attention_options.{name}", f"got {value!r}; accepted: an int >= 1")
    return value


def select_topk(
    scores: torch.Tensor,
    allowed: torch.Tensor,
    topk: int,
    *,
    local_window: int = 1,
    q_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the ``min(topk, Tk)`` best allowed keys per query.

    ``scores``: (B, Tq, Tk) index scores; ``allowed``: (B or 1, Tq, Tk) bool. The allowed keys
    among the ``local_window`` slots ending at the query's own slot (``q_offset + row``) are
    always kept (``local_window <= topk`` so they all fit). Returns ``indices`` (B, Tq, k) and ``valid`` (B, Tq, k): ``valid`` is False
    where a row has fewer than k allowed keys, and those indices must be ignored.
    """
    tq, tk = scores.shape[-2:]
    q_slots = torch.arange(q_offset, q_offset + tq, device=scores.device)[:, None]  # (Tq, 1)
    k_slots = torch.arange(tk, device=scores.device)[None, :]  # (1, Tk)
    local = (k_slots <= q_slots) & (q_slots - k_slots < local_window)  # (Tq, Tk)
    ranked = scores.detach().float().masked_fill(local, float("inf"))
    ranked = ranked.masked_fill(~allowed, float("-inf"))  # (B, Tq, Tk)
    # A stable sort, not topk: ReLU'd index scores are often exactly 0, and ties must break
    # the same way (earliest key first) whether a query is scored in a prefill or a decode step.
    values, indices = ranked.sort(dim=-1, descending=True, stable=True)
    k = min(topk, tk)
    return indices[..., :k], values[..., :k] > float("-inf")  # (B, Tq, k)


class DynamicSparseAttention(nn.Module):
    """Top-k sparse attention driven by a lightning indexer (see the module docstring).

    ``spec.options``: ``topk`` (64) keys per query, ``index_heads`` (4), ``index_head_dim``
    (32), ``local_window`` (1). Set ``compute_indexer_loss`` to leave the auxiliary KL in
    ``indexer_loss`` after each forward; set ``dense_warmup`` to attend to every allowed key.
    """

    def __init__(self, spec: AttentionSpec):
        super().__init__()
        self.spec = spec
        opts = spec.options
        self.topk = _int_option(opts, "topk", 64)
        self.index_heads = _int_option(opts, "index_heads", 4)
        self.index_head_dim = _int_option(opts, "index_head_dim", 32)
        self.local_window = _int_option(opts, "local_window", 1)
        if self.local_window > self.topk:  # forced keys beyond k would be dropped arbitrarily
            raise ConfigError(
                "attention_options.local_window",
                f"got {self.local_window} with topk={self.topk}; accepted: an int in [1, topk]",
            )
        c, hi, di = spec.hidden_size, self.index_heads, self.index_head_dim
        self.index_q = nn.Linear(c, hi * di, bias=False)
        self.index_k = nn.Linear(c, di, bias=False)  # one key head shared by all index heads
        self.index_k_norm = nn.LayerNorm(di)
        self.index_weights = nn.Linear(c, hi, bias=False)
        self.compute_indexer_loss = False
        self.dense_warmup = False
        self.indexer_loss: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Small normal init; also what materialises the indexer after ``to_empty``."""
        for linear in (self.index_q, self.index_k, self.index_weights):
            nn.init.normal_(linear.weight, std=0.02)
        self.index_k_norm.reset_parameters()

    def index_scores(self, hidden_states: torch.Tensor, cache_state: dict | None) -> torch.Tensor:
        """Index scores (B, Tq, Tk) for this step's queries against every visible key.

        With ``cache_state`` this step's index keys are appended to ``cache_state["index_k"]``.
        The input is detached, as in DeepSeek-V3.2, so indexer training never moves the trunk.
        """
        x = hidden_states.detach()
        b, tq, _ = x.shape
        q_idx = self.index_q(x).view(b, tq, self.index_heads, self.index_head_dim)  # (B, Tq, Hi, Di)
        k_idx = self.index_k_norm(self.index_k(x))  # (B, Tq, Di)
        if cache_state is not None:
            past = cache_state.get("index_k")
            if past is not None:
                k_idx = torch.cat([past.to(k_idx.dtype), k_idx], dim=1)  # (B, Tk, Di)
            cache_state["index_k"] = k_idx.detach()
        # DeepSeek-V3.2 scales the head weights by Hi^-0.5 and the dot products by Di^-0.5.
        w = self.index_weights(x).float() * self.index_heads**-0.5  # (B, Tq, Hi)
        dots = torch.einsum("bthd,bsd->bths", q_idx.float(), k_idx.float()).relu()  # (B, Tq, Hi, Tk)
        return torch.einsum("bths,bth->bts", dots, w) * self.index_head_dim**-0.5  # (B, Tq, Tk)

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
            raise ValueError("dsa attention needs hidden_states (B, Tq, C) for its indexer")
        scores = self.index_scores(hidden_states, cache_state)  # (B, Tq, Tk)
        if scores.shape[-1] != k.shape[2] or scores.shape[1] != q.shape[2]:
            raise ValueError(
                f"dsa indexer sees {scores.shape[-1]} keys for {scores.shape[1]} queries but "
                f"attention has Tk={k.shape[2]}, Tq={q.shape[2]}; cache_state['index_k'] must "
                "hold one index key per cached slot"
            )
        allowed = mask.to_bool(q.device)  # (B or 1, 1, Tq, Tk)
        self.indexer_loss = (
            self._indexer_loss(q, k, scores, allowed[:, 0], scale) if self.compute_indexer_loss else None
        )
        dense = self.dense_warmup or self.topk >= k.shape[2]
        straight_through = scores.requires_grad
        if dense and not straight_through:
            return sdpa_attention(q, k, v, mask, scale)

        if dense:
            selected = allowed.expand(scores.shape[0], 1, -1, -1)  # (B, 1, Tq, Tk)
        else:
            indices, valid = select_topk(
                scores, allowed[:, 0], self.topk, local_window=self.local_window, q_offset=mask.q_offset
            )
            selected = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, indices, valid)[:, None]
        # Rows with no key attend to everything and are zeroed afterwards: avoids NaN in backward.
        empty = ~selected.any(-1, keepdim=True)  # (B, 1, Tq, 1)
        selected = selected | empty
        if straight_through:
            ste = (scores - scores.detach())[:, None].to(q.dtype)  # (B, 1, Tq, Tk), value 0
            attn_mask = ste.masked_fill(~selected, float("-inf"))
        else:
            attn_mask = selected
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )  # (B, H, Tq, Dv)
        return out.masked_fill(empty, 0.0)

    def _indexer_loss(self, q, k, scores, allowed, scale) -> torch.Tensor:
        """KL(dense attention summed over heads || softmax(index scores)) over allowed keys.

        ``allowed``: (B or 1, Tq, Tk). Averaged over query rows that have at least one key.
        """
        allowed = allowed.expand_as(scores)  # (B, Tq, Tk)
        with torch.no_grad():
            kr = repeat_kv(k, q.shape[1] // k.shape[1])
            logits = torch.matmul(q.float(), kr.float().transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
            probs = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).nan_to_num(0.0)
            target = probs.sum(1)  # (B, Tq, Tk)
            target = target / target.sum(-1, keepdim=True).clamp_min(torch.finfo(target.dtype).tiny)
        rows = allowed.any(-1)  # (B, Tq)
        # Empty rows see every key here so log_softmax stays finite; they are dropped below.
        log_pred = scores.masked_fill(~(allowed | ~rows[..., None]), float("-inf")).log_softmax(-1)
        kl = torch.where(allowed, torch.xlogy(target, target) - target * log_pred, 0.0).sum(-1)  # (B, Tq)
        return kl[rows].mean() if rows.any() else scores.sum() * 0.0
