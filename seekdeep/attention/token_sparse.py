"""Token-level ``dsa`` training on one set of attention logits (the ``fused`` token kernel).

A training step of token-level ``dsa`` needs two things from the same query-key logits: the
dense attention distribution (the KL target of the indexer) and the attention over the selected
keys, whose logits carry the indexer's straight-through term. Computed separately (a dense
matmul + softmax for the target, then SDPA with a float mask that requires grad) that is two
full logit tensors, and a mask that requires grad sends SDPA to its unfused math path. On the
README main job (seq 256, 4 heads) that made ``dsa`` 0.62x of ``sdpa`` in tokens/s.

:class:`SharedLogitsAttention` computes the logits once, takes the dense softmax, reads the
target off it and renormalises it over the selected keys (softmax restricted to a subset is
the dense softmax renormalised on it); its backward is the attention backward written out,
and the gradient of the straight-through term is the logit gradient summed over heads, as
SDPA's math path gives for a float mask. :func:`topk_mask` picks the same keys as the stable
sort of :func:`seekdeep.attention.dsa.select_topk` with ``torch.topk`` plus an explicit
earliest-first tie break. The reference path (``token_kernel="masked_sdpa"``) stays
available by name and the tests compare the two.
"""

from __future__ import annotations

import torch

#: a renormalisation sum below this (the selected keys' dense probabilities underflowed) is
#: recomputed from the logits of the selected keys alone.
_UNDERFLOW = 1e-30


#: query chunks of the fused kernel: causality makes chunk i see (i + 1) / n of the keys.
MAX_CHUNKS = 4
MIN_CHUNK_ROWS = 32


def query_chunks(tq: int, past: int) -> list[tuple[int, int]]:
    """Query row ranges [start, stop) for the fused kernel. ``past``: cached key slots before the
    first query; chunking pays only when the chunks' visible keys differ a lot (no long past)."""
    n = max(1, min(MAX_CHUNKS, tq // MIN_CHUNK_ROWS))
    if past > tq:
        n = 1
    size = -(-tq // n)
    return [(start, min(start + size, tq)) for start in range(0, tq, size)]


def topk_mask(
    scores: torch.Tensor, allowed: torch.Tensor, topk: int, *, local_window: int = 1, q_offset: int = 0
) -> torch.Tensor:
    """The keys :func:`~seekdeep.attention.dsa.select_topk` keeps, as a (B, Tq, Tk) bool mask.

    ``scores``: (B, Tq, Tk); ``allowed``: (B or 1, Tq, Tk). Local keys rank +inf, disallowed
    ones -inf (never kept); among keys tied at the k-th value the earliest are kept, which is
    what the stable descending sort does. When every row keeps the same number L of allowed
    local keys (no padding past the first rows), the other ``k - L`` are picked among the
    non-local keys by a smaller ``topk`` (its cost grows with k: 7.4 vs 11.9 ms for 32 vs 64 of
    256 keys on 4096 rows), with the same result.
    """
    tq, tk = scores.shape[-2:]
    k = min(topk, tk)
    q_slots = torch.arange(q_offset, q_offset + tq, device=scores.device)[:, None]  # (Tq, 1)
    k_slots = torch.arange(tk, device=scores.device)[None, :]  # (1, Tk)
    local = (k_slots <= q_slots) & (q_slots - k_slots < local_window)  # (Tq, Tk)
    kept_local = local & allowed  # (B or 1, Tq, Tk): always kept
    fewest, most = kept_local.sum(-1).aminmax()
    others = k - int(most)
    # Additive masks (a few rows' worth when ``allowed`` broadcasts over B) instead of masked
    # fills of the (B, Tq, Tk) ranks: one add, and no clone of the scores.
    rank_mask = torch.zeros(kept_local.shape, dtype=torch.float32, device=scores.device)
    if int(fewest) == int(most):
        if others == 0:
            return kept_local.expand(scores.shape).clone()
        rank_mask.masked_fill_(~allowed | local, float("-inf"))
        return _top_earliest(scores.detach().float() + rank_mask, others) | kept_local
    rank_mask.masked_fill_(local, float("inf")).masked_fill_(~allowed, float("-inf"))
    return _top_earliest(scores.detach().float() + rank_mask, k)


def _top_earliest(ranked: torch.Tensor, k: int) -> torch.Tensor:
    """(B, Tq, Tk) bool: the ``k`` best finite-or-+inf entries of each row of ``ranked``, ties at
    the k-th value broken towards the earliest key; -inf entries never."""
    threshold = ranked.topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True)  # (B, Tq, 1) k-th best
    above = ranked > threshold
    tied = ranked == threshold
    need = k - above.sum(-1, keepdim=True)  # (B, Tq, 1) keys still to take from the tie
    if not torch.equal(tied.sum(-1, keepdim=True), need):  # some row must break a tie: earliest first
        tied = tied & (tied.cumsum(-1) <= need)
    return (above | tied) & (ranked > float("-inf"))


class SharedLogitsAttention(torch.autograd.Function):
    """Attention over ``selected`` keys and the dense attention target from one logit tensor.

    ``forward(q, k, v, scores, allowed, selected, scale, want_target)``:
    ``q`` (B, H, Tq, D), ``k`` (B, Hkv, Tk, D), ``v`` (B, Hkv, Tk, Dv); ``allowed`` (B or 1, 1,
    Tq, Tk) bool; ``selected`` (B, 1, Tq, Tk) bool inside ``allowed`` or None (every allowed
    key); ``scores`` (B, Tq, Tk): the indexer scores whose straight-through term sits on the
    selected logits (value 0; only their gradient is used), or None. Computes in fp32, returns
    ``out`` (B, H, Tq, Dv) in ``q``'s dtype and ``target`` (B, Tq, Tk) fp32 (the dense
    attention summed over heads and normalised per row; zeros for rows without a key) or None.
    Rows without a key give 0, with no gradient. ``target`` carries no gradient.
    """

    @staticmethod
    def forward(ctx, q, k, v, scores, allowed, selected, scale, want_target):
        b, h, tq, d = q.shape
        h_kv, tk = k.shape[1], k.shape[2]
        qs = (q.float() * scale).reshape(b, h_kv, h // h_kv * tq, d)  # (B, Hkv, rep*Tq, D): heads of a group stacked
        kf, vf = k.float(), v.float()
        logits = torch.matmul(qs, kf.transpose(-1, -2)).view(b, h, tq, tk)  # (B, H, Tq, Tk)
        # An additive -inf mask of allowed's (broadcast) size: adding it costs ~1/3 of a
        # broadcast masked_fill_ over the logits.
        logits.add_(torch.zeros(allowed.shape, dtype=logits.dtype, device=logits.device).masked_fill_(
            ~allowed, float("-inf")))
        probs = torch.softmax(logits, dim=-1)
        has_key = allowed.any(-1, keepdim=True)  # (B or 1, 1, Tq, 1)
        all_rows = bool(has_key.all())
        if not all_rows:
            probs.masked_fill_(~has_key, 0.0)  # softmax of an all -inf row is NaN
        target = None
        if want_target:
            target = probs.sum(1)  # (B, Tq, Tk)
            target /= target.sum(-1, keepdim=True).clamp_min(torch.finfo(target.dtype).tiny)
        if selected is not None:
            probs.mul_(selected)
            total = probs.sum(-1, keepdim=True)  # (B, H, Tq, 1) dense mass of the selected keys
            probs /= total.clamp_min(torch.finfo(total.dtype).tiny)
            low = (total < _UNDERFLOW) & has_key  # rows whose selected mass lost its precision
            if bool(low.any()):
                rows = low[..., 0].nonzero(as_tuple=True)  # (b, h, t) of each such row
                sel = selected.expand(b, h, tq, tk)[rows]
                probs[rows] = logits[rows].masked_fill(~sel, float("-inf")).softmax(-1)
        del logits
        out = torch.matmul(probs.view(b, h_kv, -1, tk), vf).view(b, h, tq, -1)  # (B, H, Tq, Dv)
        ctx.save_for_backward(qs, kf, vf, probs, out)
        ctx.scale, ctx.dtypes = scale, (q.dtype, k.dtype, v.dtype)
        if target is not None:
            ctx.mark_non_differentiable(target)
        return out.to(q.dtype), target

    @staticmethod
    def backward(ctx, grad_out, _grad_target):
        qs, kf, vf, probs, out = ctx.saved_tensors
        b, h, tq, tk = probs.shape
        h_kv = kf.shape[1]
        g = grad_out.float().reshape(b, h_kv, -1, grad_out.shape[-1])  # (B, Hkv, rep*Tq, Dv)
        p = probs.view(b, h_kv, -1, tk)  # (B, Hkv, rep*Tq, Tk)
        need_q, need_k, need_v, need_scores = ctx.needs_input_grad[:4]  # a frozen trunk needs only the scores'
        grad_v = torch.matmul(p.transpose(-1, -2), g) if need_v else None  # (B, Hkv, Tk, Dv)
        delta = (g * out.view_as(g)).sum(-1, keepdim=True)  # (B, Hkv, rep*Tq, 1)
        grad_logits = torch.matmul(g, vf.transpose(-1, -2)).sub_(delta).mul_(p)  # zero off the selection
        grad_q = torch.matmul(grad_logits, kf).mul_(ctx.scale).view(b, h, tq, -1) if need_q else None
        grad_k = torch.matmul(grad_logits.transpose(-1, -2), qs) if need_k else None  # qs carries the scale
        grad_scores = grad_logits.view(b, h, tq, tk).sum(1) if need_scores else None  # (B, Tq, Tk)
        dq, dk, dv = ctx.dtypes
        return (None if grad_q is None else grad_q.to(dq), None if grad_k is None else grad_k.to(dk),
                None if grad_v is None else grad_v.to(dv), grad_scores, None, None, None, None)


class IndexerScores(torch.autograd.Function):
    """The lightning indexer's ``sum_h w[h] * relu(q[h] . k) * scale``, per query and key.

    ``forward(q, k, w, scale)``: ``q`` (B, Tq, Hi, Di), ``k`` (B, Tk, Di), ``w`` (B, Tq, Hi);
    returns (B, Tq, Tk) fp32. The dots are laid out (B, Hi, Tq, Tk) so the head sum reads
    whole contiguous planes and the backward needs neither a permuted copy of the dots nor the
    4096 tiny batched matmuls autograd's einsum backward ran here.
    """

    @staticmethod
    def forward(ctx, q, k, w, scale):
        b, tq, hi, di = q.shape
        qh = q.float().transpose(1, 2).reshape(b, hi * tq, di)  # (B, Hi*Tq, Di)
        kf = k.float()
        dots = torch.matmul(qh, kf.transpose(1, 2)).view(b, hi, tq, -1).relu_()  # (B, Hi, Tq, Tk)
        wt = w.float().transpose(1, 2)[..., None] * scale  # (B, Hi, Tq, 1)
        scores = dots[:, 0] * wt[:, 0]
        for h in range(1, hi):
            scores.addcmul_(dots[:, h], wt[:, h])
        ctx.save_for_backward(qh, kf, wt, dots)
        ctx.shapes, ctx.dtypes = (b, tq, hi, di), (q.dtype, k.dtype, w.dtype)
        ctx.scale = scale
        return scores

    @staticmethod
    def backward(ctx, grad):
        qh, kf, wt, dots = ctx.saved_tensors
        b, tq, hi, di = ctx.shapes
        g = grad.float()[:, None]  # (B, 1, Tq, Tk)
        grad_w = torch.linalg.vecdot(dots, g).transpose(1, 2) * ctx.scale  # (B, Tq, Hi)
        grad_dots = torch.mul(wt, g, out=torch.empty_like(dots))  # (B, Hi, Tq, Tk), dots' layout
        # ReLU's backward in place (passes where dots > 0): one pass, no bool tensor, 2.6 vs 7.3 ms
        # for a 16 x 4 x 256 x 256 plane than multiplying by (dots > 0).
        torch.ops.aten.threshold_backward.grad_input(grad_dots, dots, 0, grad_input=grad_dots)
        grad_dots = grad_dots.view(b, hi * tq, -1)  # (B, Hi*Tq, Tk)
        grad_q = torch.matmul(grad_dots, kf).view(b, hi, tq, di).transpose(1, 2)  # (B, Tq, Hi, Di)
        grad_k = torch.matmul(grad_dots.transpose(1, 2), qh)  # (B, Tk, Di)
        dq, dk, dw = ctx.dtypes
        return grad_q.to(dq), grad_k.to(dk), grad_w.to(dw), None


class _IndexerKLSum(torch.autograd.Function):
    """Sum over rows of KL(target || softmax(scores over allowed keys)) with its closed-form
    gradient ``softmax * sum(target) - target`` (what autograd through log_softmax gives)."""

    @staticmethod
    def forward(ctx, scores, target, allowed, rows):
        masked = scores.float().masked_fill(~allowed, float("-inf"))  # (B, Tq, Tk)
        lse = torch.logsumexp(masked, -1, keepdim=True)  # (B, Tq, 1), -inf for a row without a key
        lse = lse.masked_fill(~rows[..., None], 0.0)
        mass = target.sum(-1, keepdim=True)  # 1 (0 for a row without a key)
        # target is 0 off the allowed keys, so the cross term needs no mask.
        kl = torch.xlogy(target, target).sum(-1) - torch.linalg.vecdot(target, scores.float()) + (lse * mass)[..., 0]
        ctx.save_for_backward(masked, lse, target, mass)
        return torch.where(rows, kl, 0.0).sum()

    @staticmethod
    def backward(ctx, grad):
        masked, lse, target, mass = ctx.saved_tensors
        probs = masked.sub_(lse).exp_()  # softmax over the allowed keys (0 elsewhere); masked is not reused
        return probs.mul_(mass).sub_(target).mul_(grad), None, None, None


def indexer_kl(scores: torch.Tensor, target: torch.Tensor, allowed: torch.Tensor, *,
               reduction: str = "mean") -> torch.Tensor | tuple[torch.Tensor, int]:
    """KL(target || softmax(scores over allowed keys)), averaged over rows with a key.

    ``scores``, ``target``: (B, Tq, Tk), ``target`` 0 off the allowed keys; ``allowed``: (B or
    1, Tq, Tk). ``reduction="sum"`` returns (sum over rows with a key, their number), for losses
    assembled from row chunks.
    """
    allowed = allowed.expand_as(scores)
    rows = allowed.any(-1)  # (B, Tq)
    total = _IndexerKLSum.apply(scores, target, allowed, rows)
    count = int(rows.sum())
    if reduction == "sum":
        return total, count
    return total / count if count else scores.sum() * 0.0
