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

Block mode (``block_size > 1``) selects whole key blocks per query block instead of keys per
query; see :mod:`seekdeep.attention.block_sparse` and :class:`DynamicSparseAttention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seekdeep.attention import block_decode
from seekdeep.attention import block_sparse as bsa
from seekdeep.attention import cpu_kernels
from seekdeep.attention import token_sparse
from seekdeep.attention.base import AttentionMask, AttentionSpec, repeat_kv
from seekdeep.attention.dense import sdpa_attention
from seekdeep.errors import ConfigError

BLOCK_KERNELS = ("auto", "gather", "gather_fp32", "gather_sdpa", "flex", "flex_eager")
TOKEN_KERNELS = ("auto", "fused", "masked_sdpa")
ROW_KERNELS = ("auto", "gather", "blocks")


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
    (32), ``local_window`` (1), ``token_kernel``: ``auto`` (``fused`` on CPU when the indexer
    trains or its KL is asked for, else ``masked_sdpa``), ``fused`` (one logit tensor for the
    KL target and the selected-key attention, hand-written backward, causal query chunks:
    :mod:`seekdeep.attention.token_sparse`) or ``masked_sdpa`` (SDPA with the top-k mask, the
    reference). Set ``compute_indexer_loss`` to leave the auxiliary KL in ``indexer_loss``
    after each forward; set ``dense_warmup`` to attend to every allowed key.

    Block mode, ``block_size`` > 1 (1, the default, is the token-level selection above):

    * ``topk`` is the key budget: each query block attends to ``ceil(topk / block_size)`` key
      blocks, its ``local_blocks`` (1) most recent blocks (its own included) counted in them;
    * ``block_kernel``: ``auto`` (flex on CUDA; on CPU ``gather_sdpa`` when no gradient reaches
      the indexer, else ``gather`` in the precision that is fast on the host, see
      :mod:`seekdeep.attention.cpu_kernels`; dense SDPA when the budget covers every block and no
      gradient reaches the indexer), ``gather`` (batched matmuls in the input dtype),
      ``gather_fp32`` (bf16 / fp16 inputs computed in fp32 tiles, output in the input dtype; the
      indexer's projections also run in fp32), ``gather_sdpa`` (SDPA's fused kernel over the
      gathered tiles; it cannot carry the straight-through term, so it does not train the
      indexer: ConfigError under autograd), ``flex`` (compiled flex_attention) or ``flex_eager``
      (uncompiled: a reference that materialises scores);
    * ``row_kernel``, for query chunks shorter than a block (decode steps): ``auto`` (on CPU
      without autograd ``blocks`` when a key block holds >= 64 KiB over the KV heads, else
      ``gather``; SDPA's fused rows under ``block_kernel`` ``gather_sdpa``), ``blocks`` (each
      run of selected blocks read in place from the cache, no copy:
      :mod:`seekdeep.attention.block_decode`; inference only) or ``gather`` (the per-row gather
      kernel: fused under ``gather_sdpa``, else matmuls); both in the block kernel's precision
      (``auto``'s probed choice under auto and the flex kernels);
    * ``last_kernel`` names the path the latest call took (``dense_sdpa``, ``gather``,
      ``gather_fp32``, ``gather_sdpa``, ``row_blocks``, ``row_blocks_fp32``, ``row_gather``,
      ``row_gather_fp32``, ``row_gather_sdpa``, ``flex``, ``flex_eager``; token mode:
      ``dense_sdpa``, ``masked_sdpa`` or ``fused``);
    * padding, sliding windows, GQA and decoding with ``cache_state`` are supported;
      ``local_window`` is token-mode only (ConfigError); the flex kernels cannot train on CPU
      (FlexAttention has no CPU backward: ConfigError);
    * training: a straight-through term on the logits of each block the indexer chose (not the
      forced local ones), and ``compute_indexer_loss`` gives the KL between the dense attention
      mass per key block and the indexer's block distribution; ``dense_warmup`` runs dense SDPA
      (the indexer then learns from the KL loss only).
    """

    def __init__(self, spec: AttentionSpec):
        super().__init__()
        self.spec = spec
        opts = spec.options
        self.topk = _int_option(opts, "topk", 64)
        self.index_heads = _int_option(opts, "index_heads", 4)
        self.index_head_dim = _int_option(opts, "index_head_dim", 32)
        self.local_window = _int_option(opts, "local_window", 1)
        self.block_size = _int_option(opts, "block_size", 1)
        # Optional learned score per query-key distance (0 .. distance_bias - 1, farther keys share
        # the last entry): the index keys carry no position, so without it the indexer cannot
        # prefer a key for how far back it lies, which dense attention does through RoPE.
        self.distance_bias = opts.get("distance_bias", 0)
        if isinstance(self.distance_bias, bool) or not isinstance(self.distance_bias, int) or self.distance_bias < 0:
            raise ConfigError("attention_options.distance_bias", f"got {self.distance_bias!r}; accepted: an int >= 0 "
                              "(0: off)")
        if self.distance_bias and self.block_size > 1:
            raise ConfigError("attention_options.distance_bias", "is token-mode only (block_size=1); accepted: 0")
        self._parse_block_options(opts)
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
        self.index_distance = nn.Parameter(torch.zeros(self.distance_bias)) if self.distance_bias else None
        self.compute_indexer_loss = False
        self.dense_warmup = False
        self.indexer_loss: torch.Tensor | None = None
        self.last_kernel: str | None = None
        self.reset_parameters()

    def _parse_block_options(self, opts: dict) -> None:
        block_only = [name for name in ("local_blocks", "block_kernel") if name in opts]
        if self.block_size == 1:
            if block_only:  # nothing a user gave is silently dropped
                raise ConfigError(f"attention_options.{block_only[0]}", "only applies with block_size > 1; "
                                  "accepted: set block_size > 1 or drop the option")
            self.token_kernel = opts.get("token_kernel", "auto")
            if self.token_kernel not in TOKEN_KERNELS:
                raise ConfigError("attention_options.token_kernel",
                                  f"got {self.token_kernel!r}; accepted: {', '.join(TOKEN_KERNELS)}")
            return
        if "token_kernel" in opts:
            raise ConfigError("attention_options.token_kernel", "is token-mode only (block_size=1); accepted in "
                              "block mode: block_kernel")
        if "local_window" in opts:
            raise ConfigError("attention_options.local_window", "is token-mode only (block_size=1); accepted "
                              "in block mode: local_blocks (recent blocks always attended)")
        self.num_selected_blocks = -(-self.topk // self.block_size)
        self.local_blocks = _int_option(opts, "local_blocks", 1)
        if self.local_blocks > self.num_selected_blocks:
            raise ConfigError(
                "attention_options.local_blocks",
                f"got {self.local_blocks} with ceil(topk / block_size) = {self.num_selected_blocks} selected blocks; "
                f"accepted: an int in [1, {self.num_selected_blocks}]",
            )
        self.block_kernel = opts.get("block_kernel", "auto")
        if self.block_kernel not in BLOCK_KERNELS:
            raise ConfigError("attention_options.block_kernel",
                              f"got {self.block_kernel!r}; accepted: {', '.join(BLOCK_KERNELS)}")
        self.row_kernel = opts.get("row_kernel", "auto")
        if self.row_kernel not in ROW_KERNELS:
            raise ConfigError("attention_options.row_kernel",
                              f"got {self.row_kernel!r}; accepted: {', '.join(ROW_KERNELS)}")

    def reset_parameters(self) -> None:
        """Small normal init; also what materialises the indexer after ``to_empty``."""
        for linear in (self.index_q, self.index_k, self.index_weights):
            nn.init.normal_(linear.weight, std=0.02)
        self.index_k_norm.reset_parameters()
        if self.index_distance is not None:
            nn.init.zeros_(self.index_distance)  # starts position-free, as without the option

    @staticmethod
    def _index_linear(layer: nn.Linear, x: torch.Tensor, compute_dtype: torch.dtype | None) -> torch.Tensor:
        """``layer(x)`` computed in ``compute_dtype`` (fp32 where the host's bf16 matmul is slow),
        returned in ``x``'s dtype so cached index keys keep one dtype across prefill and decode."""
        if compute_dtype is None or compute_dtype == x.dtype:
            return layer(x)
        return F.linear(x.to(compute_dtype), layer.weight.to(compute_dtype)).to(x.dtype)

    def index_parts(self, hidden_states: torch.Tensor, cache_state: dict | None):
        """The indexer's queries (B, Tq, Hi, Di), keys (B, Tk, Di) and head weights (B, Tq, Hi),
        the weights already scaled by Hi^-0.5 (DeepSeek-V3.2 scales the head weights by Hi^-0.5
        and the dot products by Di^-0.5). With ``cache_state`` this step's index keys are
        appended to ``cache_state["index_k"]``. The input is detached, as in DeepSeek-V3.2, so
        indexer training never moves the trunk."""
        x = hidden_states.detach()
        b, tq, _ = x.shape
        hi, di = self.index_heads, self.index_head_dim
        # One matmul for the three projections (one pass over x instead of three).
        weight = torch.cat([self.index_q.weight, self.index_k.weight, self.index_weights.weight])
        q_idx, k_idx, w = F.linear(x, weight).split([hi * di, di, hi], dim=-1)
        q_idx = q_idx.reshape(b, tq, hi, di)  # (B, Tq, Hi, Di)
        k_idx = self.index_k_norm(k_idx)  # (B, Tq, Di)
        if cache_state is not None:
            past = cache_state.get("index_k")
            if past is not None:
                k_idx = torch.cat([past.to(k_idx.dtype), k_idx], dim=1)  # (B, Tk, Di)
            cache_state["index_k"] = k_idx.detach()
        w = w.float() * hi**-0.5  # (B, Tq, Hi)
        return q_idx, k_idx, w

    def distance_scores(self, q_start: int, tq: int, tk: int, device) -> torch.Tensor | None:
        """The learned score per query-key distance, (Tq, Tk), for queries at slots
        ``q_start .. q_start + tq - 1`` against keys ``0 .. tk - 1``; None without the option."""
        if self.index_distance is None:
            return None
        q_slots = torch.arange(q_start, q_start + tq, device=device)[:, None]  # (Tq, 1)
        distance = (q_slots - torch.arange(tk, device=device)[None]).clamp(0, self.distance_bias - 1)  # (Tq, Tk)
        return self.index_distance.float()[distance]

    def index_scores(self, hidden_states: torch.Tensor, cache_state: dict | None) -> torch.Tensor:
        """Index scores (B, Tq, Tk) for this step's queries against every visible key (see
        :meth:`index_parts`; this is the reference computation, autograd through einsum)."""
        q_idx, k_idx, w = self.index_parts(hidden_states, cache_state)
        tq, tk = q_idx.shape[1], k_idx.shape[1]
        dots = torch.einsum("bthd,bsd->bths", q_idx.float(), k_idx.float()).relu()  # (B, Tq, Hi, Tk)
        scores = torch.einsum("bths,bth->bts", dots, w) * self.index_head_dim**-0.5  # (B, Tq, Tk)
        bias = self.distance_scores(tk - tq, tq, tk, hidden_states.device)
        return scores if bias is None else scores + bias

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
        if self.block_size > 1:
            return self._block_forward(q, k, v, mask, scale, hidden_states, cache_state)
        dense = self.dense_warmup or self.topk >= k.shape[2]
        trains_indexer = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        fused = self.token_kernel == "fused" or (
            self.token_kernel == "auto" and q.device.type == "cpu"
            and (self.compute_indexer_loss or (trains_indexer and not dense))
        )
        if fused:
            return self._fused_forward(q, k, v, mask, scale, hidden_states, cache_state, dense)
        scores = self.index_scores(hidden_states, cache_state)  # (B, Tq, Tk)
        self._check_index_keys(scores, q, k)
        allowed = mask.to_bool(q.device)  # (B or 1, 1, Tq, Tk)
        straight_through = scores.requires_grad
        self.indexer_loss = (
            self._indexer_loss(q, k, scores, allowed[:, 0], scale) if self.compute_indexer_loss else None
        )
        if dense and not straight_through:
            self.last_kernel = "dense_sdpa"
            return sdpa_attention(q, k, v, mask, scale)
        self.last_kernel = "masked_sdpa"

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

    @staticmethod
    def _check_index_keys(scores, q, k) -> None:
        if scores.shape[-1] != k.shape[2] or scores.shape[1] != q.shape[2]:
            raise ValueError(
                f"dsa indexer sees {scores.shape[-1]} keys for {scores.shape[1]} queries but "
                f"attention has Tk={k.shape[2]}, Tq={q.shape[2]}; cache_state['index_k'] must "
                "hold one index key per cached slot"
            )

    def _fused_forward(self, q, k, v, mask: AttentionMask, scale, hidden_states, cache_state, dense: bool):
        """The ``fused`` token kernel (:mod:`seekdeep.attention.token_sparse`): one logit tensor for
        the indexer's KL target and the attention over the selected keys, with the same values and
        gradients as the ``masked_sdpa`` path. Dense (warm-up, or topk covering every key) attends
        to every allowed key, still carrying the straight-through term when the indexer trains.

        Every step of it is row-wise, so it runs over query chunks, each against the keys up to
        its last query only: causality leaves the rest masked (5/8 of the work at 4 chunks)."""
        self.last_kernel = "fused"
        q_idx, k_idx, w = self.index_parts(hidden_states, cache_state)
        scores_shape = (q.shape[0], q_idx.shape[1], k_idx.shape[1])
        self._check_index_keys(torch.empty(scores_shape, device="meta"), q, k)
        allowed_all = mask.to_bool(q.device)  # (B or 1, 1, Tq, Tk)
        out, kl_sum, kl_rows = self._fused_rows(q, k, v, q_idx, k_idx, w, allowed_all, mask.q_offset, scale, dense)
        self.indexer_loss = None
        if self.compute_indexer_loss:
            self.indexer_loss = kl_sum / kl_rows if kl_rows else kl_sum * 0.0
        return out

    def _fused_rows(self, q, k, v, q_idx, k_idx, w, allowed_all, q_offset: int, scale, dense: bool):
        """The row chunks of :meth:`_fused_forward`: (out, KL sum or None, rows with a key)."""
        tq = q.shape[2]
        outs, kl_sum, kl_rows = [], None, 0
        for start, stop in token_sparse.query_chunks(tq, k.shape[2] - tq):
            k_stop = q_offset + stop  # keys past the chunk's last query slot are never visible to it
            allowed = allowed_all[:, :, start:stop, :k_stop]  # (B or 1, 1, c, Kc)
            scores = token_sparse.IndexerScores.apply(q_idx[:, start:stop], k_idx[:, :k_stop], w[:, start:stop],
                                                      self.index_head_dim**-0.5)  # (B, c, Kc)
            bias = self.distance_scores(q_offset + start, stop - start, k_stop, q.device)
            if bias is not None:
                scores = scores + bias
            selected = None
            if not dense and int(allowed.sum(-1).max()) > self.topk:  # else every allowed key is kept
                selected = token_sparse.topk_mask(scores, allowed[:, 0], self.topk, local_window=self.local_window,
                                                  q_offset=q_offset + start)[:, None]  # (B, 1, c, Kc)
            out, target = token_sparse.SharedLogitsAttention.apply(
                q[:, :, start:stop], k[:, :, :k_stop], v[:, :, :k_stop], scores if scores.requires_grad else None,
                allowed, selected, scale, self.compute_indexer_loss,
            )
            outs.append(out)
            if target is not None:
                part, rows = token_sparse.indexer_kl(scores, target, allowed[:, 0], reduction="sum")
                kl_sum, kl_rows = part if kl_sum is None else kl_sum + part, kl_rows + rows
        return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)), kl_sum, kl_rows

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
        return token_sparse.indexer_kl(scores, target, allowed)

    # ------------------------------------------------------------------------- block mode

    def _update_summaries(self, index_k: torch.Tensor, mask: AttentionMask, cache_state: dict | None):
        """Fold this step's index keys (B, Tq, Di) into the block summaries.

        Returns the summaries of the complete blocks, (B, Nc, Di) fp32 and valid counts (B, Nc),
        and the index keys (B, r, Di) / validity (B, r) of the unfinished last block. With
        ``cache_state`` they are kept there (``index_block_k``, ``index_block_count``,
        ``index_tail_k``, ``index_tail_valid``): a step pools the blocks it completes, no more.
        """
        bs = self.block_size
        b, tq, _ = index_k.shape
        q_offset = mask.q_offset
        tokens = index_k.float()
        token_valid = None if mask.key_valid is None else mask.key_valid[:, q_offset:].bool()
        state = cache_state if cache_state is not None else {}
        if "index_block_k" in state:
            done_keys, done_counts = state["index_block_k"], state["index_block_count"]
            tail, tail_valid = state["index_tail_k"], state["index_tail_valid"]
            if done_keys.shape[1] * bs + tail.shape[1] != q_offset:
                raise ValueError(
                    f"dsa block summaries cover {done_keys.shape[1] * bs + tail.shape[1]} cached slots but the "
                    f"attention has {q_offset}; cache_state must be updated by every step"
                )
            if token_valid is None:
                token_valid = torch.ones(b, tq, dtype=torch.bool, device=index_k.device)
            tokens = torch.cat([tail, tokens], dim=1)
            token_valid = torch.cat([tail_valid, token_valid], dim=1)
        elif q_offset != 0:
            raise ValueError(
                f"dsa block mode got {tq} queries for {mask.k_len} keys without block summaries of the "
                f"{q_offset} earlier slots; pass the cache_state that the earlier steps filled"
            )
        else:
            done_keys = index_k.new_zeros(b, 0, index_k.shape[-1], dtype=torch.float32)
            done_counts = torch.zeros(b, 0, dtype=torch.long, device=index_k.device)
        complete = tokens.shape[1] // bs * bs
        if complete:
            new_keys, new_counts = bsa.pool_block_keys(
                tokens[:, :complete], None if token_valid is None else token_valid[:, :complete], bs
            )
            done_keys, done_counts = torch.cat([done_keys, new_keys], 1), torch.cat([done_counts, new_counts], 1)
        tail = tokens[:, complete:]
        tail_valid = (torch.ones(b, tail.shape[1], dtype=torch.bool, device=tail.device) if token_valid is None
                      else token_valid[:, complete:])
        if cache_state is not None:
            cache_state.update(index_block_k=done_keys.detach(), index_block_count=done_counts,
                               index_tail_k=tail.detach(), index_tail_valid=tail_valid)
        return done_keys, done_counts, tail, tail_valid

    def block_selection(self, hidden_states: torch.Tensor, mask: AttentionMask, cache_state: dict | None = None,
                        compute_dtype: torch.dtype | None = None):
        """Score and select key blocks for the query blocks this step touches.

        ``compute_dtype``: the dtype the index projections compute in (default: the input's).

        Returns ``q_blocks`` (Nq,), ``scores`` (B, Nq, Nk) (differentiable w.r.t. the indexer),
        ``allowed`` (B, Nq, Nk), ``forced`` (Nq, Nk), ``indices``/``valid`` (B, Nq, n) (see
        :func:`block_sparse.select_blocks`) and ``chosen_here`` (B, Nq): False where the block's
        anchor lies in an earlier step and its selection came from ``cache_state``. A step that
        stays inside a block chosen earlier (most decode steps) only updates the summaries and
        reuses the kept selection: its scores are zeros and it costs O(1) in the context length.
        """
        bs = self.block_size
        x = hidden_states.detach()  # as in DeepSeek-V3.2: indexer training never moves the trunk
        b, tq, c = x.shape
        q_offset, k_len = mask.q_offset, mask.k_len
        if tq != mask.q_len:
            raise ValueError(f"dsa hidden_states has {tq} tokens but the mask has q_len={mask.q_len}")
        index_k = self.index_k_norm(self._index_linear(self.index_k, x, compute_dtype))  # (B, Tq, Di)
        done_keys, done_counts, tail, tail_valid = self._update_summaries(index_k, mask, cache_state)
        nk, first_block = bsa.num_blocks(k_len, bs), q_offset // bs
        q_blocks = torch.arange(first_block, nk, device=x.device)  # (Nq,)
        anchors = bsa.anchor_slots(q_blocks, mask.key_valid, bs, k_len).expand(b, -1)  # (B, Nq)
        chosen_here = anchors >= q_offset
        kept = None
        if q_offset % bs:  # the first block started in an earlier step: its anchor may be there
            kept = None if cache_state is None else cache_state.get("block_selection")
            if kept is None or cache_state.get("block_selection_block") != first_block:
                raise ValueError("dsa block mode: a step starting inside a block needs that block's selection "
                                 "in cache_state; pass the cache_state of the earlier steps")
            # Without padding every anchor is a block start, so nothing here can be an anchor.
            if q_blocks.numel() == 1 and (mask.key_valid is None or not bool(chosen_here.any())):
                scores = x.new_zeros(b, 1, nk, dtype=torch.float32)
                nothing = torch.zeros(b, 1, nk, dtype=torch.bool, device=x.device)
                return q_blocks, scores, nothing, nothing[0], kept[0][:, None], kept[1][:, None], chosen_here

        if tail.shape[1]:
            tail_keys, tail_counts = bsa.pool_block_keys(tail, tail_valid, bs)
            done_keys, done_counts = torch.cat([done_keys, tail_keys], 1), torch.cat([done_counts, tail_counts], 1)
        rows = (anchors - q_offset).clamp(0, tq - 1)
        x_anchor = x.gather(1, rows[..., None].expand(-1, -1, c))  # (B, Nq, C)
        index_q = self._index_linear(self.index_q, x_anchor, compute_dtype).view(b, -1, self.index_heads,
                                                                                 self.index_head_dim)
        weights = self._index_linear(self.index_weights, x_anchor, compute_dtype) * self.index_heads**-0.5  # (B, Nq, Hi)
        scores = bsa.block_index_scores(index_q, weights, done_keys)  # (B, Nq, Nk)
        allowed = bsa.allowed_blocks(q_blocks, done_counts, bs, mask.sliding_window)
        forced = bsa.forced_blocks(q_blocks, nk, self.local_blocks)
        indices, valid = bsa.select_blocks(scores, allowed, forced, self.num_selected_blocks)
        if kept is not None:
            reuse = ~chosen_here[:, :1, None]  # (B, 1, 1)
            n = indices.shape[-1]
            indices[:, :1] = torch.where(reuse, kept[0][:, None, :n], indices[:, :1])
            valid[:, :1] = torch.where(reuse, kept[1][:, None, :n], valid[:, :1])
        if cache_state is not None:
            cache_state["block_selection"] = (indices[:, -1], valid[:, -1])
            cache_state["block_selection_block"] = nk - 1
        return q_blocks, scores, allowed, forced, indices, valid, chosen_here

    def gather_compute_dtype(self, q: torch.Tensor, k: torch.Tensor, probe: str = "gather") -> torch.dtype:
        """The dtype the gather kernels (``probe`` "gather") or the in-place block decode kernel
        ("blocks") compute in for this call (see ``block_kernel``)."""
        kernel, tq = self.block_kernel, q.shape[2]
        if kernel == "gather_fp32":
            precision = "fp32"
        elif kernel in ("auto", "flex", "flex_eager") and q.device.type == "cpu":
            precision = "auto"  # flex: only its decode rows use a gather kernel
        else:
            precision = "native"
        rows = q.shape[1] // k.shape[1] * min(tq, self.block_size)  # query rows per matmul tile
        return cpu_kernels.compute_dtype(q.dtype, precision, rows=rows, keys=self.num_selected_blocks * self.block_size,
                                         head_dim=q.shape[-1], kernel=probe)

    def _decode_row_kernel(self, q: torch.Tensor, k: torch.Tensor, straight_through: bool) -> str:
        """"blocks", "gather" or "sdpa" for query rows shorter than a block (see ``row_kernel``)."""
        if self.row_kernel == "blocks":
            if straight_through or (torch.is_grad_enabled() and q.requires_grad):
                raise ConfigError("attention_options.row_kernel", "'blocks' is an inference kernel (no gradients); "
                                  "accepted under autograd: auto or gather")
            return "blocks"
        if self.row_kernel == "gather":
            return "sdpa" if self.block_kernel == "gather_sdpa" else "gather"
        if self.block_kernel == "gather_sdpa":
            return "sdpa"  # named: SDPA's fused row kernel
        keep_graph = straight_through or (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k)))
        if q.device.type == "cpu" and not keep_graph and block_decode.prefer_blocks(
                k.shape[1], self.block_size, k.shape[-1], k.element_size()):
            return "blocks"
        return "gather"

    def _block_forward(self, q, k, v, mask: AttentionMask, scale: float, hidden_states, cache_state):
        bs, tq = self.block_size, q.shape[2]
        row_kernel = None
        if tq < bs:  # decode rows: their kernel decides which precision probe applies
            row_kernel = self._decode_row_kernel(q, k, torch.is_grad_enabled() and any(
                p.requires_grad for p in self.parameters()))
        compute = self.gather_compute_dtype(q, k, "blocks" if row_kernel == "blocks" else "gather")
        suffix = "_fp32" if compute != q.dtype and compute == torch.float32 else ""
        q_blocks, scores, allowed, forced, indices, valid, chosen_here = self.block_selection(
            hidden_states, mask, cache_state, compute_dtype=compute
        )
        if scores.shape[-1] != bsa.num_blocks(k.shape[2], bs):
            raise ValueError(f"dsa indexer sees {scores.shape[-1]} key blocks but Tk={k.shape[2]} needs "
                             f"{bsa.num_blocks(k.shape[2], bs)}")
        selectable = allowed & ~forced & chosen_here[..., None]  # blocks the indexer chose among, here
        self.indexer_loss = None
        if self.compute_indexer_loss:
            target = bsa.dense_block_mass(q, k, q_offset=mask.q_offset, block_size=bs, scale=scale,
                                          key_valid=mask.key_valid, sliding_window=mask.sliding_window)
            self.indexer_loss = bsa.block_indexer_loss(scores, target, selectable)
        if self.dense_warmup:
            self.last_kernel = "dense_sdpa"
            return sdpa_attention(q, k, v, mask, scale)

        straight_through = scores.requires_grad
        kernel = self.block_kernel
        if kernel == "auto":
            if not straight_through and self.num_selected_blocks >= scores.shape[-1]:
                self.last_kernel = "dense_sdpa"
                return sdpa_attention(q, k, v, mask, scale)  # every block selected: dense is exact
            kernel = "flex" if q.is_cuda else "gather" if straight_through else "gather_sdpa"
        if kernel == "gather_sdpa" and straight_through:
            raise ConfigError("attention_options.block_kernel", "'gather_sdpa' cannot carry the indexer's "
                              "straight-through gradient; accepted for training: auto, gather or gather_fp32")
        fused = kernel == "gather_sdpa"
        precision_suffix = suffix
        if fused:
            suffix = "_sdpa"  # SDPA's kernel picks its own inner precision (fp32 tiles for bf16)
        bias = None
        if straight_through:  # value 0; its gradient trains the indexer through the LM loss
            picked = scores.gather(-1, indices)
            bias = torch.where(valid & selectable.gather(-1, indices), picked - picked.detach(), 0.0)
        args = dict(q_offset=mask.q_offset, block_size=bs, scale=scale, key_valid=mask.key_valid,
                    sliding_window=mask.sliding_window)
        if tq < bs:  # decode: each row gathers its own block's selection
            row_block = torch.arange(mask.q_offset, mask.k_len, device=q.device) // bs - mask.q_offset // bs  # (Tq,)
            if row_kernel == "blocks":  # the selected blocks read in place: no copy of the keys
                self.last_kernel = "row_blocks" + precision_suffix
                return block_decode.block_row_attention(
                    q, k, v, indices[:, row_block], valid[:, row_block], compute_dtype=compute, **args)
            # SDPA's CPU kernel is slow for a query row or two (measured ~10x the matmuls at 16K):
            # the fused row kernel only when asked for by name.
            fused_rows = row_kernel == "sdpa"
            self.last_kernel = "row_gather" + ("_sdpa" if fused_rows else precision_suffix)
            return bsa.gather_row_attention(
                q, k, v, indices[:, row_block], valid[:, row_block],
                row_bias=None if bias is None else bias[:, row_block], compute_dtype=compute, fused=fused_rows, **args,
            )
        if kernel in ("gather", "gather_fp32", "gather_sdpa"):
            self.last_kernel = "gather" + suffix
            return bsa.gather_block_attention(q, k, v, indices, valid, block_bias=bias, compute_dtype=compute,
                                              fused=fused, **args)
        if q.device.type == "cpu" and torch.is_grad_enabled() and (
            straight_through or any(t.requires_grad for t in (q, k, v))
        ):
            raise ConfigError("attention_options.block_kernel", f"{kernel!r} cannot train on CPU (FlexAttention "
                              "has no CPU backward); accepted for CPU training: gather or auto")
        self.last_kernel = kernel
        return bsa.flex_block_attention(q, k, v, indices, valid, block_bias=bias, compiled=kernel == "flex", **args)
