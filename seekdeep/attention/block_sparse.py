"""Block-sparse attention: the pieces behind the ``dsa`` backend's block mode.

Slots are grouped in blocks of ``block_size`` (block ``j`` holds slots ``[j*bs, (j+1)*bs)``),
keys and queries alike. Every query block attends to at most ``n`` key blocks: its
``local_blocks`` most recent ones (its own, the "diagonal" block, included) and the others the
lightning indexer scores best against the mean-pooled index keys of each block (the block
summaries). Inside the selected blocks the usual token mask (causality, padding, sliding
window) still applies.

A query block chooses once, from its *anchor*: its first valid slot. The anchor comes before
every query of the block, so the choice never depends on a later token, and a decode step
reproduces exactly what the prefill chose (the step that reaches a block's anchor selects; the
later steps of that block reuse the choice kept in the cache).

Kernels (same result, different trade-offs):

* :func:`gather_block_attention` (CPU): chunks of query blocks, one batched gather of the
  selected key / value blocks per chunk, batched matmuls (or SDPA's fused kernel over the
  gathered tiles, ``fused``). Memory is bounded by the chunk size. Under autograd it runs the
  recomputing kernel of :mod:`seekdeep.attention.sparse_train` (the straight-through term rides
  on the logits and gets its gradient).
* :func:`flex_block_attention` (CUDA): the selection becomes a ``BlockMask`` built straight from
  block indices (``BlockMask.from_kv_blocks``, no dense mask); a compiled ``flex_attention``
  does forward and backward. Lengths are padded to buckets so few shapes get compiled.
* :func:`gather_row_attention` (decode): a few query rows, each gathering its block's selected
  key blocks from the cache, so a step costs O(n * block_size), not O(context).
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F

from seekdeep.attention.base import AttentionMask, repeat_kv
from seekdeep.attention.dense import sdpa_attention

#: score elements (batch * heads * rows * keys) one chunk of the gather kernels may hold.
CHUNK_ELEMENTS = 1 << 23


def num_blocks(length: int, block_size: int) -> int:
    return -(-length // block_size)


def _pad_tokens(x: torch.Tensor, length: int, value=0) -> torch.Tensor:
    """Pad dim 1 of ``x`` (B, T, ...) up to ``length`` with ``value`` (works for bool)."""
    extra = length - x.shape[1]
    if extra <= 0:
        return x
    return torch.cat([x, x.new_full((x.shape[0], extra, *x.shape[2:]), value)], dim=1)


# ----------------------------------------------------------------------------- selection


def pool_block_keys(
    index_k: torch.Tensor, token_valid: torch.Tensor | None, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block summaries: the mean of each block's valid index keys.

    ``index_k``: (B, T, Di); ``token_valid``: (B, T) bool or None (all valid). Returns
    ``block_keys`` (B, N, Di) fp32 and ``block_counts`` (B, N) valid slots per block, with
    ``N = ceil(T / block_size)`` (the last block may be partial). An empty block's key is 0.
    """
    b, t, di = index_k.shape
    n = num_blocks(t, block_size)
    keys = index_k.float()
    if token_valid is not None:
        keys = keys * token_valid[..., None]
        counts = _pad_tokens(token_valid, n * block_size, False).view(b, n, block_size).sum(-1)
    else:
        counts = (torch.arange(n, device=keys.device) * block_size).neg().add(t).clamp(max=block_size)
        counts = counts[None].expand(b, n)
    sums = _pad_tokens(keys, n * block_size).view(b, n, block_size, di).sum(2)  # (B, N, Di)
    return sums / counts.clamp(min=1)[..., None], counts


def block_index_scores(index_q: torch.Tensor, weights: torch.Tensor, block_keys: torch.Tensor) -> torch.Tensor:
    """Lightning-indexer score of every key block for every query block's anchor.

    ``index_q`` (B, Nq, Hi, Di), ``weights`` (B, Nq, Hi) (head weights, already scaled),
    ``block_keys`` (B, Nk, Di). Returns (B, Nq, Nk) fp32: ``sum_h w_h relu(q_h . k) / sqrt(Di)``.
    """
    dots = torch.einsum("bqhd,bkd->bqhk", index_q.float(), block_keys.float()).relu()  # (B, Nq, Hi, Nk)
    return torch.einsum("bqhk,bqh->bqk", dots, weights.float()) * index_q.shape[-1] ** -0.5


def anchor_slots(
    q_blocks: torch.Tensor, key_valid: torch.Tensor | None, block_size: int, k_len: int
) -> torch.Tensor:
    """(B or 1, Nq): each query block's anchor, its first valid slot below ``k_len`` (its first
    slot when it has none: then its queries see no key of their own block anyway)."""
    start = q_blocks * block_size  # (Nq,)
    if key_valid is None:
        return start[None]
    n = num_blocks(k_len, block_size)
    valid = _pad_tokens(key_valid[:, :k_len].bool(), n * block_size, False).view(-1, n, block_size)
    valid = valid[:, q_blocks]  # (B, Nq, bs)
    first = valid.int().argmax(-1)  # argmax returns the first maximal index
    return start[None] + torch.where(valid.any(-1), first, 0)


def allowed_blocks(
    q_blocks: torch.Tensor, block_counts: torch.Tensor, block_size: int, sliding_window: int | None = None
) -> torch.Tensor:
    """(B, Nq, Nk) bool: key block ``j`` may hold a visible key for some query of block ``qb``:
    ``j <= qb``, the block has a valid slot, and (with a window) its last slot is in reach of
    the query block's first slot."""
    j = torch.arange(block_counts.shape[1], device=block_counts.device)[None, :]  # (1, Nk)
    qb = q_blocks[:, None]  # (Nq, 1)
    ok = j <= qb
    if sliding_window is not None:
        ok = ok & ((qb - j - 1) * block_size + 1 < sliding_window)
    return ok[None] & (block_counts > 0)[:, None, :]


def forced_blocks(q_blocks: torch.Tensor, num_kv_blocks: int, local_blocks: int) -> torch.Tensor:
    """(Nq, Nk) bool: the ``local_blocks`` most recent blocks of each query block (diagonal included)."""
    j = torch.arange(num_kv_blocks, device=q_blocks.device)[None, :]
    distance = q_blocks[:, None] - j
    return (distance >= 0) & (distance < local_blocks)


def select_blocks(
    scores: torch.Tensor, allowed: torch.Tensor, forced: torch.Tensor, num_selected: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top key blocks per query block: the allowed ``forced`` ones, then the best-scoring allowed.

    ``scores`` (B, Nq, Nk), ``allowed`` (B, Nq, Nk), ``forced`` (Nq, Nk) (at most
    ``num_selected`` per row). Returns ``indices`` (B, Nq, n) and ``valid`` (B, Nq, n) with
    ``n = min(num_selected, Nk)``: each row lists its valid blocks first, in ascending block
    order (so the diagonal block, when valid, is the last valid entry), then unused slots (index
    0, ``valid`` False). Ties break towards the earlier block, by a stable sort, so a prefill and
    a decode step agree even where ReLU'd scores are exactly 0.
    """
    nk = scores.shape[-1]
    n = min(num_selected, nk)
    ranked = scores.detach().float().masked_fill(forced & allowed, float("inf"))
    ranked = ranked.masked_fill(~allowed, float("-inf"))
    order = ranked.sort(dim=-1, descending=True, stable=True).indices[..., :n]  # (B, Nq, n)
    valid = allowed.gather(-1, order)
    ordered = torch.where(valid, order, order + nk).sort(dim=-1).values  # valid ascending first
    valid = ordered < nk
    return torch.where(valid, ordered, 0), valid


# ----------------------------------------------------------------------------- workspace


class _Workspace(threading.local):
    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}


_WORKSPACE = _Workspace()


def _scratch(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable flat buffer (CPU inference only). Large fresh CPU allocations are served by
    mmap and page-faulted on first touch, which costs more than the gather that fills them."""
    key = (name, dtype, device)
    buf = _WORKSPACE.buffers.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype, device=device)
        _WORKSPACE.buffers[key] = buf
    return buf[:numel]


def _use_scratch(*tensors: torch.Tensor | None) -> bool:
    """Scratch buffers only for CPU inference: nothing saved for backward may live in them."""
    first = tensors[0]
    return (
        first.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))
    )


def release_workspace() -> None:
    """Free the gather kernels' scratch buffers held by this thread."""
    _WORKSPACE.buffers.clear()


def _row_view(x: torch.Tensor, keep_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (B, H, T, D) as rows (R, D) plus the row of slot 0 of each (b, h): (B, H) long.

    Without autograd a strided cache (e.g. a slice of a preallocated buffer) is used in place;
    otherwise (or for odd strides) a contiguous copy is made.
    """
    b, h, t, d = x.shape
    strided_ok = x.stride(3) == 1 and x.stride(2) == d and x.stride(1) % d == 0 and x.stride(0) % d == 0
    if keep_graph or not strided_ok:
        x = x.contiguous()
    s0, s1 = x.stride(0) // d, x.stride(1) // d
    base = torch.arange(b, device=x.device)[:, None] * s0 + torch.arange(h, device=x.device)[None, :] * s1
    if keep_graph:
        return x.view(b * h * t, d), base
    rows = (b - 1) * s0 + (h - 1) * s1 + t
    return x.as_strided((rows, d), (d, 1)), base


def _gather_tokens(rows: torch.Tensor, base: torch.Tensor, tokens: torch.Tensor, out: torch.Tensor | None = None):
    """rows (R, D), base (B, H), tokens (B, G, S) -> (B, H, G, S, D)."""
    flat = (base[:, :, None, None] + tokens[:, None]).reshape(-1)
    shape = (*base.shape, *tokens.shape[1:], rows.shape[-1])
    if out is None:
        return rows.index_select(0, flat).view(shape)
    return torch.index_select(rows, 0, flat, out=out.view(-1, rows.shape[-1])).view(shape)


# ----------------------------------------------------------------------------- gather kernels


def _masked_group_attention(
    q_groups: torch.Tensor,
    k_rows: tuple[torch.Tensor, torch.Tensor],
    v_rows: tuple[torch.Tensor, torch.Tensor],
    tokens: torch.Tensor,
    token_ok: torch.Tensor,
    q_slots: torch.Tensor,
    *,
    k_len: int,
    scale: float,
    key_valid: torch.Tensor | None,
    sliding_window: int | None,
    bias: torch.Tensor | None,
    compute_dtype: torch.dtype | None = None,
    fused: bool = False,
) -> torch.Tensor:
    """Attention of query groups over their own gathered keys, with the full token mask.

    ``q_groups`` (B, Hkv, G, rep, R, D): R query rows per group; ``tokens`` (B, G, S) key slots
    of each group (may run past ``k_len``: those are masked); ``token_ok`` (B, G, S) slots of
    valid selections; ``q_slots`` (G, R); ``bias`` (B, G, S) added to the logits (the
    straight-through term). Returns (B, Hkv, G, rep, R, Dv) in ``q_groups``' dtype; rows without
    a key give 0. ``compute_dtype``: the gathered tiles are converted to it and the matmuls run
    in it (fp32 where the host has no fast bf16 matmul, see :mod:`seekdeep.attention.cpu_kernels`).
    ``fused``: SDPA's fused kernel runs over the gathered tiles instead of the matmuls (it
    converts bf16 tiles to fp32 itself; ``compute_dtype`` is then not used); needs ``bias`` None.
    """
    if fused and bias is not None:
        raise ValueError("the fused gather kernel takes no logit bias (the straight-through term)")
    b, hkv, g, rep, r, d = q_groups.shape
    s = tokens.shape[-1]
    clamped = tokens.clamp(max=k_len - 1)
    k_out = v_out = None
    if _use_scratch(q_groups, k_rows[0], v_rows[0], bias):
        k_out = _scratch("k", b * hkv * g * s * k_rows[0].shape[-1], k_rows[0].dtype, q_groups.device)
        v_out = _scratch("v", b * hkv * g * s * v_rows[0].shape[-1], v_rows[0].dtype, q_groups.device)
    kg = _gather_tokens(*k_rows, clamped, k_out)  # (B, Hkv, G, S, D)
    vg = _gather_tokens(*v_rows, clamped, v_out)
    out_dtype = q_groups.dtype
    if compute_dtype is not None and compute_dtype != out_dtype and not fused:  # tiles, not the whole cache
        q_groups, kg, vg = q_groups.to(compute_dtype), kg.to(compute_dtype), vg.to(compute_dtype)
    allowed, empty = gathered_token_mask(tokens, token_ok, q_slots, k_len=k_len, key_valid=key_valid,
                                         sliding_window=sliding_window)  # (B, G, R, S), (B, G, R)
    if fused:  # (B * Hkv, G, rep * R, D) against (B * Hkv, G, S, D): the groups play SDPA's heads
        rows_mask = allowed[:, None, :, None].expand(b, hkv, g, rep, r, s).reshape(b * hkv, g, rep * r, s)
        out = F.scaled_dot_product_attention(
            q_groups.reshape(b * hkv, g, rep * r, d), kg.view(b * hkv, g, s, d), vg.view(b * hkv, g, s, -1),
            attn_mask=rows_mask, scale=scale,
        ).view(b, hkv, g, rep, r, -1)
        return out.masked_fill(empty[:, None, :, None, :, None], 0.0)
    scores = torch.matmul(q_groups.reshape(b, hkv, g, rep * r, d) * scale, kg.transpose(-1, -2))
    scores = scores.view(b, hkv, g, rep, r, s).float()
    if bias is not None:
        scores = scores + bias[:, None, :, None, None, :]
    scores = scores.masked_fill(~allowed[:, None, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(vg.dtype).view(b, hkv, g, rep * r, s)
    out = torch.matmul(probs, vg).view(b, hkv, g, rep, r, -1)
    return out.masked_fill(empty[:, None, :, None, :, None], 0.0).to(out_dtype)


def _selected_tokens(block_indices: torch.Tensor, block_valid: torch.Tensor, block_size: int):
    """(B, G, n) blocks -> (B, G, n * bs) key slots and whether each belongs to a valid block."""
    offsets = torch.arange(block_size, device=block_indices.device)
    tokens = (block_indices[..., None] * block_size + offsets).flatten(-2)
    return tokens, block_valid[..., None].expand(*block_valid.shape, block_size).flatten(-2)


def _chunk_blocks(batch: int, heads: int, rows: int, keys: int, elements: int | None = None) -> int:
    """Query blocks per chunk so a chunk's logits hold about ``elements`` (CHUNK_ELEMENTS) values."""
    return max(1, (CHUNK_ELEMENTS if elements is None else elements) // max(1, batch * heads * rows * keys))


def query_block_chunks(num_query_blocks: int, chunk: int, first_block: int, block_size: int, device):
    """The chunks the gather kernels walk: (c0, c1, q_slots) per chunk of ``chunk`` query blocks,
    ``q_slots`` (c1 - c0, bs) the slot of each query row (blocks counted from ``first_block``)."""
    offsets = torch.arange(block_size, device=device)
    for c0 in range(0, num_query_blocks, chunk):
        c1 = min(num_query_blocks, c0 + chunk)
        yield c0, c1, (first_block + torch.arange(c0, c1, device=device))[:, None] * block_size + offsets


def gathered_token_mask(tokens: torch.Tensor, token_ok: torch.Tensor, q_slots: torch.Tensor, *, k_len: int,
                        key_valid: torch.Tensor | None, sliding_window: int | None):
    """Which gathered keys each query row may see, shared by the inference and training kernels.

    ``tokens`` / ``token_ok`` (B, G, S) from :func:`_selected_tokens` (slots may run past
    ``k_len``: masked), ``q_slots`` (G, R). Returns ``allowed`` (B, G, R, S) bool, in which rows
    without a key see every key (so softmax and its backward stay finite; zero them afterwards),
    and those rows, ``empty`` (B, G, R).
    """
    b, g, s = tokens.shape
    allowed = (tokens[:, :, None, :] <= q_slots[None, :, :, None]) & token_ok[:, :, None, :]  # (B, G, R, S)
    if key_valid is not None:
        clamped = tokens.clamp(max=k_len - 1)
        allowed = allowed & key_valid.bool().gather(1, clamped.view(b, -1)).view(b, g, 1, s)
    if sliding_window is not None:
        allowed = allowed & (q_slots[None, :, :, None] - tokens[:, :, None, :] < sliding_window)
    empty = ~allowed.any(-1)  # (B, G, R)
    return allowed | empty[..., None], empty


def gather_block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    block_valid: torch.Tensor,
    *,
    q_offset: int,
    block_size: int,
    scale: float,
    key_valid: torch.Tensor | None = None,
    sliding_window: int | None = None,
    block_bias: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
    fused: bool = False,
) -> torch.Tensor:
    """Block-sparse attention by gathering, chunked over query blocks.

    ``q`` (B, H, Tq, D) at slots ``q_offset ...``; ``k``/``v`` (B, Hkv, Tk, D);
    ``block_indices``/``block_valid`` (B, Nq, n) from :func:`select_blocks` for the query blocks
    ``q_offset // bs ...`` that the rows touch; ``block_bias`` (B, Nq, n) is added to the
    logits of every key of a selected block (the straight-through term). Returns (B, H, Tq, Dv)
    in ``q``'s dtype; ``compute_dtype`` (default: ``q``'s) is the dtype the kernel computes in;
    ``fused`` runs SDPA's fused kernel over each chunk's gathered tiles (no ``block_bias``).

    Without autograd, padding or a window, query blocks whose every allowed block is selected
    (the first ``n - 1``) run as one dense causal SDPA call, and the rest, which all hold ``n``
    valid blocks with the diagonal last, skip the token mask except on the diagonal block.
    """
    if fused and block_bias is not None:
        raise ValueError("the fused gather kernel takes no block_bias (the straight-through term)")
    if not fused and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, block_bias)):
        # Training: autograd through this loop would keep every chunk's scores for the backward.
        from seekdeep.attention.sparse_train import gathered_block_attention_train

        return gathered_block_attention_train(
            q, k, v, block_indices, block_valid, q_offset=q_offset, block_size=block_size, scale=scale,
            key_valid=key_valid, sliding_window=sliding_window, block_bias=block_bias, compute_dtype=compute_dtype,
            chunk_elements=CHUNK_ELEMENTS,
        )
    if compute_dtype is not None and compute_dtype != q.dtype and not fused:
        # A prefill gathers each key many times (once per query block selecting it): converting
        # K / V once costs less than converting every gathered tile.
        out = gather_block_attention(
            q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype), block_indices, block_valid,
            q_offset=q_offset, block_size=block_size, scale=scale, key_valid=key_valid,
            sliding_window=sliding_window, block_bias=block_bias,
        )
        return out.to(q.dtype)
    bs = block_size
    b, h, tq, d = q.shape
    hkv, tk, dv = k.shape[1], k.shape[2], v.shape[-1]
    rep = h // hkv
    n = block_indices.shape[-1]
    first = q_offset // bs
    lead = q_offset - first * bs
    nq = block_indices.shape[1]
    if nq != num_blocks(lead + tq, bs):
        raise ValueError(f"block_indices covers {nq} query blocks; rows {q_offset}..{q_offset + tq - 1} touch "
                         f"{num_blocks(lead + tq, bs)}")
    window = sliding_window if sliding_window is not None and sliding_window < tk else None
    keep_graph = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, block_bias)
    )
    fast = not keep_graph and key_valid is None and window is None and block_bias is None
    sparse_from = min(nq, max(0, n - 1 - first))  # first query block (relative) past the dense prefix
    if fast:
        # What the fast kernel assumes (select_blocks guarantees it without padding or window):
        # prefix blocks hold all their qb + 1 blocks; the others n valid blocks, the diagonal last.
        diagonal = first + torch.arange(nq, device=q.device)
        fast = bool((block_valid[:, :sparse_from].sum(-1) == diagonal[:sparse_from] + 1).all()) and bool(
            block_valid[:, sparse_from:].all()) and bool((block_indices[:, sparse_from:, -1] == diagonal[sparse_from:]).all())
    q_pad = F.pad(q, (0, 0, lead, nq * bs - lead - tq)) if (lead or (lead + tq) % bs) else q  # (B, H, Nq*bs, D)

    if fast:
        out = q.new_empty(b, h, nq * bs, dv)
        # Blocks before n - 1 see at most n blocks, all selected: dense causal attention there.
        prefix_end = min((n - 1) * bs, tk)
        if prefix_end > q_offset:
            rows = prefix_end - q_offset
            out[:, :, lead:lead + rows] = sdpa_attention(
                q[:, :, :rows], k[:, :, :prefix_end], v[:, :, :prefix_end], AttentionMask(rows, prefix_end), scale
            )
        if sparse_from < nq:
            _fast_sparse_blocks(q_pad, k, v, block_indices, out, start=sparse_from, first_block=first,
                                block_size=bs, scale=scale, fused=fused)
        return out[:, :, lead:lead + tq]

    k_rows, v_rows = _row_view(k, keep_graph), _row_view(v, keep_graph)
    q_groups = q_pad.view(b, hkv, rep, nq, bs, d).permute(0, 1, 3, 2, 4, 5)  # (B, Hkv, Nq, rep, bs, D)
    tokens, token_ok = _selected_tokens(block_indices, block_valid, bs)  # (B, Nq, S)
    bias = None if block_bias is None else block_bias.float().repeat_interleave(bs, dim=-1)  # (B, Nq, S)
    outs = []
    for c0, c1, q_slots in query_block_chunks(nq, _chunk_blocks(b, h, bs, n * bs), first, bs, q.device):
        outs.append(_masked_group_attention(
            q_groups[:, :, c0:c1], k_rows, v_rows, tokens[:, c0:c1], token_ok[:, c0:c1], q_slots, k_len=tk,
            scale=scale, key_valid=key_valid, sliding_window=window, bias=None if bias is None else bias[:, c0:c1],
            fused=fused,
        ))
    out = torch.cat(outs, dim=2)  # (B, Hkv, Nq, rep, bs, Dv)
    out = out.permute(0, 1, 3, 2, 4, 5).reshape(b, h, nq * bs, dv)
    return out[:, :, lead:lead + tq]


def _fast_sparse_blocks(q_pad, k, v, block_indices, out, *, start, first_block, block_size, scale,
                        fused=False) -> None:
    """Inference kernel for query blocks ``start ...`` (relative) that all hold ``n`` valid
    selected blocks with the diagonal last: reused buffers, in-place ops, and only the diagonal
    block is masked. Writes into ``out`` (B, H, Nq*bs, Dv). ``fused``: SDPA's fused kernel over
    the gathered tiles (one (rep * bs, S) mask, causal on the diagonal block, serves every
    chunk) instead of materialised scores."""
    bs = block_size
    b, h, _, d = q_pad.shape
    hkv, tk, dv = k.shape[1], k.shape[2], v.shape[-1]
    rep = h // hkv
    nq, n = block_indices.shape[1], block_indices.shape[2]
    s = n * bs
    k_rows, k_base = _row_view(k, False)
    v_rows, v_base = _row_view(v, False)
    whole_blocks = tk % bs == 0
    if whole_blocks:
        # Overlapping windows of bs rows starting at every row: the window at a block's first
        # row is the block, read in place (row views are read only).
        k_blocks = k_rows.as_strided((k_rows.shape[0] - bs + 1, bs * d), (d, 1))
        v_blocks = v_rows.as_strided((v_rows.shape[0] - bs + 1, bs * dv), (dv, 1))
    q_view = q_pad.view(b, hkv, rep, nq, bs, d)
    out_view = out.view(b, hkv, rep, nq, bs, dv)
    above_diagonal = torch.ones(bs, bs, dtype=torch.bool, device=q_pad.device).triu(1)
    offsets = torch.arange(bs, device=q_pad.device)
    chunk = _chunk_blocks(b, h, bs, s)
    dev, dt = q_pad.device, q_pad.dtype
    scratch = _use_scratch(q_pad, k, v)
    if fused:
        # Additive, in the tiles' dtype: SDPA would otherwise convert a bool mask on every call.
        tile_mask = torch.zeros(bs, s, dtype=dt, device=dev)
        tile_mask[:, -bs:].masked_fill_(above_diagonal, float("-inf"))
        tile_mask = tile_mask.repeat(rep, 1)  # (rep * bs, S), rows ordered (rep, bs) as in the tiles
    for c0 in range(start, nq, chunk):
        c1 = min(nq, c0 + chunk)
        m = c1 - c0

        def buf(name, numel, dtype=dt):
            return _scratch(name, numel, dtype, dev) if scratch else torch.empty(numel, dtype=dtype, device=dev)

        if whole_blocks:  # one row of bs * D per selected block: 64x fewer, longer copies
            starts = block_indices[:, c0:c1] * bs  # (B, m, n)
            kg = _gather_tokens(k_blocks, k_base, starts, buf("k", b * hkv * m * s * d)).view(b, hkv, m, s, d)
            vg = _gather_tokens(v_blocks, v_base, starts, buf("v", b * hkv * m * s * dv)).view(b, hkv, m, s, dv)
        else:
            tokens = (block_indices[:, c0:c1, :, None] * bs + offsets).view(b, m, s).clamp_(max=tk - 1)
            kg = _gather_tokens(k_rows, k_base, tokens, buf("k", b * hkv * m * s * d))  # (B, Hkv, m, S, D)
            vg = _gather_tokens(v_rows, v_base, tokens, buf("v", b * hkv * m * s * dv))
        if fused:  # the m query blocks play SDPA's heads: (B * Hkv, m, rep * bs, D)
            qc = q_view[:, :, :, c0:c1].permute(0, 1, 3, 2, 4, 5).reshape(b * hkv, m, rep * bs, d)
            oc = F.scaled_dot_product_attention(qc, kg.view(b * hkv, m, s, d), vg.view(b * hkv, m, s, dv),
                                                attn_mask=tile_mask, scale=scale)
            out_view[:, :, :, c0:c1] = oc.view(b, hkv, m, rep, bs, dv).permute(0, 1, 3, 2, 4, 5)
            continue
        qc = buf("q", b * hkv * m * rep * bs * d).view(b, hkv, m, rep, bs, d)
        torch.mul(q_view[:, :, :, c0:c1].permute(0, 1, 3, 2, 4, 5), scale, out=qc)
        scores = buf("s", b * hkv * m * rep * bs * s).view(b, hkv, m, rep * bs, s)
        torch.matmul(qc.view(b, hkv, m, rep * bs, d), kg.transpose(-1, -2), out=scores)
        diagonal = scores.view(b, hkv, m, rep, bs, n, bs)[..., n - 1, :]  # (B, Hkv, m, rep, bs, bs)
        diagonal.masked_fill_(above_diagonal, float("-inf"))
        probs = buf("p", scores.numel()).view(scores.shape)
        torch.ops.aten._softmax.out(scores, -1, False, out=probs)
        oc = buf("o", b * hkv * m * rep * bs * dv).view(b, hkv, m, rep * bs, dv)
        torch.matmul(probs, vg, out=oc)
        out_view[:, :, :, c0:c1] = oc.view(b, hkv, m, rep, bs, dv).permute(0, 1, 3, 2, 4, 5)


def gather_row_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    row_indices: torch.Tensor,
    row_valid: torch.Tensor,
    *,
    q_offset: int,
    block_size: int,
    scale: float,
    key_valid: torch.Tensor | None = None,
    sliding_window: int | None = None,
    row_bias: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
    fused: bool = False,
) -> torch.Tensor:
    """Decode kernel: each query row gathers its own selected blocks.

    ``q`` (B, H, Tq, D) with Tq small; ``row_indices``/``row_valid``/``row_bias`` (B, Tq, n),
    the selection of each row's block. Cost O(Tq * n * block_size), independent of Tk. The
    gathered tiles are converted to ``compute_dtype`` (default: ``q``'s), never the whole cache.
    """
    b, h, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    rep = h // hkv
    keep_graph = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, row_bias)
    )
    tokens, token_ok = _selected_tokens(row_indices, row_valid, block_size)  # (B, Tq, S)
    bias = None if row_bias is None else row_bias.float().repeat_interleave(block_size, dim=-1)
    q_groups = q.view(b, hkv, rep, tq, 1, d).transpose(2, 3)  # (B, Hkv, Tq, rep, 1, D)
    q_slots = torch.arange(q_offset, q_offset + tq, device=q.device)[:, None]  # (Tq, 1)
    window = sliding_window if sliding_window is not None and sliding_window < tk else None
    out = _masked_group_attention(
        q_groups, _row_view(k, keep_graph), _row_view(v, keep_graph), tokens, token_ok, q_slots, k_len=tk,
        scale=scale, key_valid=key_valid, sliding_window=window, bias=bias, compute_dtype=compute_dtype,
        fused=fused,
    )  # (B, Hkv, Tq, rep, 1, Dv)
    return out.squeeze(4).transpose(2, 3).reshape(b, h, tq, -1)


# ----------------------------------------------------------------------------- flex kernel

_COMPILED_FLEX = None


def _flex_attention(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention)
    return _COMPILED_FLEX


def bucket_length(length: int, block_size: int) -> int:
    """Round up to a multiple of ``max(block_size, 2**(ceil(log2 length) - 4))``: at most 8
    shapes per doubling of the length (bounded recompiles), less than 1/8 of padding."""
    p2 = 1 << max(0, math.ceil(math.log2(max(length, 1))))
    step = max(block_size, p2 // 16)
    step = -(-step // block_size) * block_size
    return -(-length // step) * step


def flex_block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    block_valid: torch.Tensor,
    *,
    q_offset: int,
    block_size: int,
    scale: float,
    key_valid: torch.Tensor | None = None,
    sliding_window: int | None = None,
    block_bias: torch.Tensor | None = None,
    compiled: bool = True,
) -> torch.Tensor:
    """Block-sparse attention with FlexAttention and a BlockMask made from block indices.

    Same arguments as :func:`gather_block_attention`. Selected blocks other than the diagonal
    are "full" blocks (no mask_mod) when there is no padding or window; the mask_mod applies the
    token mask and also looks the block up in a (B, Nq, Nk) table, which keeps the uncompiled
    (reference, CPU) flex path exact, since it evaluates mask_mod everywhere. The
    straight-through bias goes in through a score_mod reading a (B, Nq, Nk) table.
    """
    from torch.nn.attention.flex_attention import BlockMask

    bs = block_size
    b, h, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    first = q_offset // bs
    lead = q_offset - first * bs
    nq, n = block_indices.shape[1], block_indices.shape[2]
    q_len, k_len = bucket_length(lead + tq, bs), bucket_length(tk, bs)
    nq_pad, nk_pad = q_len // bs, k_len // bs
    # Copies only where a length is off its bucket (each copy adds to the peak memory).
    q_pad = F.pad(q, (0, 0, lead, q_len - lead - tq)) if q_len != tq else q
    k_pad = F.pad(k, (0, 0, 0, k_len - tk)) if k_len != tk else k
    v_pad = F.pad(v, (0, 0, 0, k_len - tk)) if k_len != tk else v
    window = sliding_window if sliding_window is not None and sliding_window < tk else None
    dev = q.device

    def as_block_mask_rows(x: torch.Tensor) -> torch.Tensor:  # (B, Nq, w) -> (B, 1, Nq_pad, Nk_pad) int32
        x = _pad_tokens(x.to(torch.int32), nq_pad, 0)
        return F.pad(x, (0, nk_pad - x.shape[-1]))[:, None]

    count = block_valid.sum(-1, dtype=torch.int32)  # (B, Nq)
    if key_valid is None and window is None:
        # The diagonal block (the last valid entry) needs the causal mask; the others are full.
        diagonal = (first + torch.arange(nq, device=dev))[None, :, None]
        has_diagonal = (block_valid & (block_indices == diagonal)).any(-1).to(torch.int32)  # (B, Nq)
        partial_num = as_block_mask_rows(has_diagonal[..., None])[..., 0]
        partial_idx = as_block_mask_rows(diagonal.expand(b, nq, 1))
        full_num = as_block_mask_rows((count - has_diagonal)[..., None])[..., 0]
        full_idx = as_block_mask_rows(block_indices)
    else:
        partial_num, partial_idx = as_block_mask_rows(count[..., None])[..., 0], as_block_mask_rows(block_indices)
        full_num = full_idx = None

    # Unused selection slots point at an extra column, dropped, so they never overwrite a real entry.
    scatter_index = _pad_tokens(torch.where(block_valid, block_indices, nk_pad), nq_pad, nk_pad)  # (B, Nq_pad, n)
    table = torch.zeros(b, nq_pad, nk_pad + 1, dtype=torch.bool, device=dev)
    table = table.scatter(-1, scatter_index, True)[..., :nk_pad]
    kv_ok = _pad_tokens(key_valid.bool(), k_len, False) if key_valid is not None else None
    # Scalars travel as tensors so that a new length or offset does not recompile.
    limits = torch.tensor([first * bs, tk, window or 0], device=dev)

    def mask_mod(bi, hi, qi, ki):
        q_slot = qi + limits[0]
        ok = (ki <= q_slot) & (ki < limits[1]) & table[bi, qi // bs, ki // bs]
        if kv_ok is not None:
            ok = ok & kv_ok[bi, ki]
        if window is not None:
            ok = ok & (q_slot - ki < limits[2])
        return ok

    score_mod = None
    if block_bias is not None:
        bias = _pad_tokens(block_bias.float(), nq_pad, 0.0)  # (B, Nq_pad, n)
        bias_table = torch.zeros(b, nq_pad, nk_pad + 1, dtype=torch.float32, device=dev)
        bias_table = bias_table.scatter(-1, scatter_index, bias)[..., :nk_pad]

        def score_mod(score, bi, hi, qi, ki):
            return score + bias_table[bi, qi // bs, ki // bs]

    block_mask = BlockMask.from_kv_blocks(
        partial_num, partial_idx, full_num, full_idx, BLOCK_SIZE=bs, mask_mod=mask_mod, seq_lengths=(q_len, k_len)
    )
    kernel_options = None
    if dev.type == "cuda" and bs % 128:  # the default tiles are 128 rows; a mask block must be a multiple
        tile = math.gcd(bs, 64)
        kernel_options = {"BLOCK_M": tile, "BLOCK_N": tile}
    out = _flex_attention(compiled)(
        q_pad, k_pad, v_pad, score_mod=score_mod, block_mask=block_mask, scale=scale,
        enable_gqa=h != hkv, kernel_options=kernel_options,
    )
    return out[:, :, lead:lead + tq]


# ----------------------------------------------------------------------------- indexer loss


@torch.no_grad()
def dense_block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    q_offset: int,
    block_size: int,
    scale: float,
    key_valid: torch.Tensor | None,
    sliding_window: int | None,
) -> torch.Tensor:
    """(B, Nq, Nk) dense attention probability per key block, summed over the heads and the
    query rows of each query block (the indexer's KL target). Chunked over query blocks."""
    bs = block_size
    b, h, tq, d = q.shape
    tk = k.shape[2]
    first = q_offset // bs
    lead = q_offset - first * bs
    nq, nk = num_blocks(lead + tq, bs), num_blocks(tk, bs)
    q_pad = F.pad(q, (0, 0, lead, nq * bs - lead - tq)).float()
    kr = repeat_kv(k, h // k.shape[1]).float()
    k_slots = torch.arange(tk, device=q.device)
    chunk = max(1, (CHUNK_ELEMENTS * 4) // max(1, b * h * bs * tk))
    masses = []
    for c0 in range(0, nq, chunk):
        c1 = min(nq, c0 + chunk)
        q_slots = torch.arange((first + c0) * bs, (first + c1) * bs, device=q.device)  # (rows,)
        allowed = (k_slots[None, :] <= q_slots[:, None]) & (q_slots >= q_offset)[:, None] & (q_slots < tk)[:, None]
        if sliding_window is not None:
            allowed = allowed & (q_slots[:, None] - k_slots[None, :] < sliding_window)
        allowed = allowed[None]  # (1, rows, Tk)
        if key_valid is not None:
            allowed = allowed & key_valid.bool()[:, None, :]
        logits = torch.matmul(q_pad[:, :, c0 * bs:c1 * bs], kr.transpose(-1, -2)) * scale  # (B, H, rows, Tk)
        probs = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).nan_to_num(0.0).sum(1)
        probs = F.pad(probs, (0, nk * bs - tk)).view(b, c1 - c0, bs, nk, bs)
        masses.append(probs.sum((2, 4)))  # (B, c, Nk)
    return torch.cat(masses, dim=1)


def block_indexer_loss(scores: torch.Tensor, target: torch.Tensor, selectable: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(scores)) over each query block's selectable key blocks.

    ``scores``/``target``/``selectable`` (B, Nq, Nk); the target is renormalised over the
    selectable blocks. Averaged over query blocks that have a selectable block with mass.
    """
    target = target.masked_fill(~selectable, 0.0)
    total = target.sum(-1, keepdim=True)
    rows = selectable.any(-1) & (total[..., 0] > 0)  # (B, Nq)
    target = target / total.clamp_min(torch.finfo(target.dtype).tiny)
    log_pred = scores.masked_fill(~(selectable | ~rows[..., None]), float("-inf")).log_softmax(-1)
    kl = torch.where(selectable, torch.xlogy(target, target) - target * log_pred, 0.0).sum(-1)  # (B, Nq)
    return kl[rows].mean() if rows.any() else scores.sum() * 0.0
