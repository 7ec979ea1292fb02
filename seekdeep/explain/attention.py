"""Attention maps, attention baselines and the sparse-selection view.

:func:`capture_attention` runs the model once with a forward pre-hook on every attention
backend (the ``*.inner`` modules, which all share one signature) and recomputes, from the
queries, keys, mask and scale the layer was called with, the dense attention probabilities
softmax(QK^T * scale) over the allowed keys — the causal mask, padding and sliding windows of
the call included, and exactly what the eager / sdpa backends compute. For a ``dsa`` layer it
also asks the layer's own indexer (``index_scores`` + :func:`select_topk`, or
``block_selection`` in block mode) which keys each query kept, so the kept keys can be shown
next to where dense attention put its mass, with the fraction of that mass they cover.

Baselines for the attribution benchmarks: ``attention`` (last layer, mean over heads, the row
of the explained position) and ``rollout`` (Abnar & Zuidema 2020: per layer 0.5 * mean-head
attention + 0.5 * identity, rows renormalised, multiplied through the layers)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from seekdeep.attention.base import AttentionMask, repeat_kv
from seekdeep.errors import ConfigError
from seekdeep.explain.config import DEFAULT_BATCH
from seekdeep.explain.gradients import _Base
from seekdeep.explain.target import Prepared

ATTENTION_METHODS = ("attention", "rollout")


@dataclass
class AttentionMaps:
    """Per layer: ``probs`` (B, H, Tq, Tk) dense attention, ``allowed`` (B or 1, Tq, Tk);
    for dsa layers ``selected`` (B, Tq, Tk) bool (None for dense layers) and ``coverage``
    (B, Tq): the dense mass on the selected keys (NaN for rows with no key)."""

    probs: list[torch.Tensor] = field(default_factory=list)
    allowed: list[torch.Tensor] = field(default_factory=list)
    selected: list[torch.Tensor | None] = field(default_factory=list)
    coverage: list[torch.Tensor | None] = field(default_factory=list)
    backends: list[str] = field(default_factory=list)

    def layer_coverage(self, key_valid: torch.Tensor | None = None) -> list[float | None]:
        """Mean dense-mass coverage of each dsa layer over real query rows (None: dense layer)."""
        out = []
        for cov in self.coverage:
            if cov is None:
                out.append(None)
                continue
            rows = ~torch.isnan(cov)
            if key_valid is not None:
                rows &= key_valid.bool().to(cov.device)
            out.append(float(cov[rows].mean()) if bool(rows.any()) else None)
        return out


def _backends(model) -> list[torch.nn.Module]:
    found = [m for name, m in model.named_modules() if name.endswith(".inner")]
    if not found:
        raise ConfigError("model", f"{type(model).__name__} has no attention backends (*.inner modules); attention "
                          "views need a seekdeep model")
    return found


def _dsa_selection(module, hidden: torch.Tensor, mask: AttentionMask, allowed: torch.Tensor) -> torch.Tensor:
    """(B, Tq, Tk) keys the dsa layer attends to for this call (its indexer's own choice)."""
    from seekdeep.attention import block_sparse as bsa
    from seekdeep.attention.dsa import select_topk

    b, tq = hidden.shape[:2]
    tk = mask.k_len
    allowed = allowed.expand(b, -1, -1)
    if getattr(module, "dense_warmup", False):
        return allowed.clone()
    if module.block_size == 1:
        if module.topk >= tk:  # the layer runs dense attention then
            return allowed.clone()
        scores = module.index_scores(hidden, None)  # (B, Tq, Tk)
        indices, valid = select_topk(scores, allowed, module.topk, local_window=module.local_window,
                                     q_offset=mask.q_offset)
        chosen = torch.zeros(b, tq, tk, dtype=torch.bool, device=hidden.device).scatter(-1, indices, valid)
        return chosen & allowed
    bs = module.block_size
    q_blocks, _, _, _, indices, valid, _ = module.block_selection(hidden, mask, None)
    nk = bsa.num_blocks(tk, bs)
    if module.num_selected_blocks >= nk:
        return allowed.clone()
    # unused slots hold index 0 with valid False: add up, so they cannot overwrite a real block 0
    hits = torch.zeros(b, q_blocks.numel(), nk, dtype=torch.long, device=hidden.device)
    block_chosen = hits.scatter_add_(-1, indices, valid.long()) > 0  # (B, Nq, Nk)
    q_block_of = (torch.arange(mask.q_offset, tk, device=hidden.device) // bs) - int(q_blocks[0])  # (Tq,)
    k_block_of = torch.arange(tk, device=hidden.device) // bs  # (Tk,)
    chosen = block_chosen[:, q_block_of][:, :, k_block_of]  # (B, Tq, Tk)
    return chosen & allowed


@torch.no_grad()
def capture_attention(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> AttentionMaps:
    """Dense attention probabilities (and dsa selections) of every layer for one forward pass."""
    from seekdeep.attention.dsa import DynamicSparseAttention

    maps = AttentionMaps()

    def hook(module, args, kwargs):
        q, k = args[0], args[1]
        mask, scale = kwargs["mask"], kwargs["scale"]
        allowed = mask.to_bool(q.device)  # (B or 1, 1, Tq, Tk)
        kr = repeat_kv(k, q.shape[1] // k.shape[1])
        logits = torch.matmul(q.float(), kr.float().transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
        probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
        maps.probs.append(probs.cpu())
        maps.allowed.append(allowed[:, 0].cpu())
        if isinstance(module, DynamicSparseAttention):
            chosen = _dsa_selection(module, kwargs["hidden_states"], mask, allowed[:, 0])
            covered = (probs * chosen[:, None]).sum(-1).mean(1)  # (B, Tq) mean over heads
            has_key = allowed[:, 0].expand_as(chosen).any(-1)
            maps.selected.append(chosen.cpu())
            maps.coverage.append(torch.where(has_key, covered, float("nan")).cpu())
            maps.backends.append("dsa")
        else:
            maps.selected.append(None)
            maps.coverage.append(None)
            maps.backends.append(type(module).__name__)

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in _backends(model)]
    was_training = model.training
    model.eval()
    try:
        model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return maps


def attention_rollout(probs: list[torch.Tensor], residual: float = 0.5) -> torch.Tensor:
    """(B, T, T) rollout from per-layer (B, H, T, T) attention (see the module docstring)."""
    rollout = None
    for layer in probs:
        a = layer.float().mean(1)  # (B, T, T)
        eye = torch.eye(a.shape[-1], dtype=a.dtype)[None]
        a = residual * eye + (1 - residual) * a
        a = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
        rollout = a if rollout is None else a @ rollout
    return rollout


class AttentionExplainer(_Base):
    """Attention baselines as ``shap.Explanation``: ``method="attention"`` (last layer) or
    ``"rollout"``; a unit's value is the attention share of its tokens in the row of the
    position that produces the explained output (not in the output's units)."""

    def __init__(self, model, tokenizer=None, target=None, method: str = "attention", batch_size: int = DEFAULT_BATCH,
                 granularity: str = "word", max_new_tokens: int = 8, progress: bool = True):
        if method not in ATTENTION_METHODS:
            raise ConfigError("method", f"got {method!r}; accepted: {', '.join(ATTENTION_METHODS)}")
        self.method = method
        _backends(model)
        super().__init__(model, tokenizer, target, batch_size, granularity, max_new_tokens, progress)

    def _explain_one(self, prepared: Prepared) -> dict:
        ids = torch.tensor([self.scorer.full_ids(prepared)], device=self.model.device)
        maps = capture_attention(self.model, ids)
        self.scorer.calls += 1
        self.scorer.rows += 1
        matrix = maps.probs[-1].float().mean(1) if self.method == "attention" else attention_rollout(maps.probs)  # (1, T, T)
        n_prompt = len(prepared.units.token_ids)
        if self.scorer.kind == "classifier":
            query_rows = [ids.shape[1] - 1]
        else:  # the position before each continuation token predicts it
            query_rows = [n_prompt - 1 + j for j in range(len(prepared.continuation))]
        token_values = np.stack([matrix[0, r, :n_prompt].numpy() for r in query_rows], axis=1)  # (T_prompt, n_outputs)
        f_x = self.scorer.score_rows([prepared.units.token_ids], prepared)[0]
        return self._row(prepared, token_values, f_x)
