"""Decode kernel for ``dsa`` block mode that reads the selected key blocks where they lie.

A decode step attends one (or a few) query rows to ``n`` selected key blocks. The gather kernel
(:func:`seekdeep.attention.block_sparse.gather_row_attention`) first copies those blocks into
one contiguous tile and then multiplies: the copy reads the keys once, writes them once, and the
matmul reads them again, about three times the memory traffic the attention needs, and at one
query row per head the step is bound by exactly that traffic (profiled at 16K keys, budget
2048, fp32: ``index_select`` 39% and ``bmm`` 44% of the step). Here each run of consecutive
selected blocks is a strided view of the cache (no copy), multiplied in place:

* pass 1: the logits of every run (one ``bmm`` per run) into one (Hkv, rows, S) fp32 tensor;
* one softmax over the S selected keys (masked only where a key can be invisible: padding, a
  sliding window, or a later row of the same step);
* pass 2: the output accumulated in fp32 over the runs (one ``baddbmm`` per run).

bf16 / fp16 caches computed in fp32 (``compute_dtype``) convert each run in pieces that stay in
the cache (:data:`CONVERT_ELEMENTS`) into a reused buffer, never the whole selection at once.
The cost is a few small ops per run instead of one copy of every selected key, so it wins when a
block holds enough data (see :func:`prefer_blocks`); it does not carry the indexer's
straight-through term (training uses the gather kernel).
"""

from __future__ import annotations

import torch

from seekdeep.attention import block_sparse as bsa

#: elements of one converted piece of a run (K or V, all KV heads): 512 KiB in fp32, L2-sized.
CONVERT_ELEMENTS = 1 << 17
#: bytes of one key block (all KV heads) from which reading blocks in place beats gathering them:
#: below it a step is bound by the per-op cost of its ~4 ops per run, not by copying keys.
MIN_BLOCK_BYTES = 1 << 16


def prefer_blocks(kv_heads: int, block_size: int, head_dim: int, itemsize: int) -> bool:
    """Whether ``auto`` picks this kernel over the row gather for a cache of this shape."""
    return kv_heads * block_size * head_dim * itemsize >= MIN_BLOCK_BYTES


def _runs(blocks: list[int], block_size: int, k_len: int) -> list[tuple[int, int]]:
    """Ascending block ids -> (first slot, end slot) of each run of consecutive blocks, clipped to ``k_len``."""
    runs: list[list[int]] = []
    for j in blocks:
        if runs and runs[-1][1] == j:
            runs[-1][1] = j + 1
        else:
            runs.append([j, j + 1])
    return [(a * block_size, min(e * block_size, k_len)) for a, e in runs if a * block_size < k_len]


def _pieces(runs: list[tuple[int, int]], max_keys: int | None) -> list[tuple[int, int]]:
    if max_keys is None:
        return runs
    return [(s, min(e, s + max_keys)) for a, e in runs for s in range(a, e, max_keys)]


class _Converter:
    """Views of the cache as ``dtype``: a copy into a reused scratch buffer, or the view itself."""

    def __init__(self, dtype: torch.dtype, name: str):
        self.dtype, self.name = dtype, name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.dtype:
            return x
        buf = bsa._scratch(self.name, x.numel(), self.dtype, x.device).view(x.shape)
        return buf.copy_(x)


def block_row_attention(
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
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Decode rows over their selected blocks, read in place (inference only, no logit bias).

    Same arguments as :func:`~seekdeep.attention.block_sparse.gather_row_attention`: ``q``
    (B, H, Tq, D) at slots ``q_offset ...``; ``k`` / ``v`` (B, Hkv, Tk, D) (any strides with a
    contiguous last dim, e.g. views of a preallocated cache); ``row_indices`` / ``row_valid``
    (B, Tq, n) each row's selected blocks. Returns (B, H, Tq, Dv) in ``q``'s dtype; a row
    without a visible key gives 0. ``compute_dtype``: the dtype of the matmuls (default ``q``'s);
    softmax and the output sum are fp32.
    """
    b, h, tq, d = q.shape
    hkv, tk, dv = k.shape[1], k.shape[2], v.shape[-1]
    rep = h // hkv
    bs = block_size
    cd = compute_dtype or q.dtype
    window = sliding_window if sliding_window is not None and sliding_window < tk else None
    convert_k, convert_v = _Converter(cd, "row_k"), _Converter(cd, "row_v")
    max_keys = None if cd == k.dtype else max(1, CONVERT_ELEMENTS // max(1, hkv * max(d, dv)))
    indices, valid = row_indices.tolist(), row_valid.tolist()  # a few rows of n ints: host-side run lists
    out = q.new_zeros(b, h, tq, dv)
    q_groups = (q * scale).to(cd).view(b, hkv, rep, tq, d)
    for bi in range(b):
        r0 = 0
        while r0 < tq:  # rows of one query block share its selection
            r1 = r0 + 1
            while r1 < tq and (q_offset + r1) // bs == (q_offset + r0) // bs:
                r1 += 1
            blocks = sorted(j for j, ok in zip(indices[bi][r0], valid[bi][r0]) if ok)
            pieces = _pieces(_runs(blocks, bs, min(tk, q_offset + r1)), max_keys)  # later keys are invisible
            if pieces:
                out[bi, :, r0:r1] = _attend_pieces(
                    q_groups[bi, :, :, r0:r1], k[bi], v[bi], pieces, q_slots=range(q_offset + r0, q_offset + r1),
                    key_valid=None if key_valid is None else key_valid[bi], window=window,
                    convert=(convert_k, convert_v),
                ).to(out.dtype)
            r0 = r1
    return out


def _attend_pieces(qg, k, v, pieces, *, q_slots: range, key_valid, window, convert) -> torch.Tensor:
    """``qg`` (Hkv, rep, R, D) scaled queries in the compute dtype; ``k`` / ``v`` (Hkv, Tk, D) one
    sequence's cache; ``pieces`` (start, end) key slots. Returns (Hkv * rep, R, Dv) fp32."""
    hkv, rep, r, d = qg.shape
    dv = v.shape[-1]
    rows = qg.reshape(hkv, rep * r, d)
    logits = torch.cat([torch.bmm(rows, convert[0](k[:, s:e]).transpose(1, 2)) for s, e in pieces], dim=-1)
    logits = logits.float()  # (Hkv, rep * R, S)
    last_key = pieces[-1][1] - 1
    needs_mask = key_valid is not None or window is not None or last_key > q_slots[0]
    if needs_mask:
        slots = torch.cat([torch.arange(s, e, device=qg.device) for s, e in pieces])  # (S,)
        q_pos = torch.tensor(list(q_slots), device=qg.device)[:, None]  # (R, 1)
        visible = slots[None] <= q_pos  # (R, S)
        if key_valid is not None:
            visible = visible & key_valid.bool()[slots][None]
        if window is not None:
            visible = visible & (q_pos - slots[None] < window)
        empty = ~visible.any(-1)  # (R,)
        visible = visible | empty[:, None]  # finite softmax; zeroed below
        logits = logits.view(hkv, rep, r, -1).masked_fill(~visible, float("-inf")).view(hkv, rep * r, -1)
    probs = torch.softmax(logits, dim=-1)
    low = convert[1].dtype != torch.float32
    if low:
        probs = probs.to(convert[1].dtype)
    acc = torch.zeros(hkv, rep * r, dv, dtype=torch.float32, device=qg.device)
    offset = 0
    for s, e in pieces:
        part = probs[..., offset:offset + e - s]
        if low:  # a low-precision matmul cannot accumulate into fp32: add its result
            acc += torch.bmm(part, convert[1](v[:, s:e]))
        else:
            acc.baddbmm_(part, convert[1](v[:, s:e]))
        offset += e - s
    if needs_mask:
        acc.view(hkv, rep, r, dv).masked_fill_(empty[:, None], 0.0)
    return acc.view(hkv * rep, r, dv)
