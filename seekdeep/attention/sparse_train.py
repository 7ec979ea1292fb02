"""Training kernel of dsa block mode on CPU: gathered key blocks with a recomputing backward.

Autograd through the chunked gather kernel kept every chunk's scores and probabilities alive
until the backward, and each chunk's gather backward filled and summed a zero tensor the size
of the whole K / V: forward + backward took 5x dense SDPA's time at 4K. This kernel keeps only
the output and one log-sum-exp per query row (as FlashAttention does), and its backward
recomputes each chunk's probabilities, so one chunk's temporaries exist at a time and the
key / value gradients are accumulated block by block into one fp32 buffer.

Per chunk of query blocks (``m`` blocks of ``bs`` rows, ``S = n * bs`` gathered keys), with
``P = softmax(scale * Q K^T + mask + bias)``:

* forward: ``O = P V`` and ``lse`` per row;
* backward: ``dV = P^T dO``, ``dS = P * (dO V^T - rowsum(dO * O))``, ``dQ = scale * dS K``,
  ``dK = scale * dS^T Q`` and, for the straight-through term, ``dbias = sum of dS`` over the
  heads, the rows of the query block and the keys of each selected block.

The matmuls run in ``compute_dtype`` (fp32 where the host has no fast bf16 matmul, see
:mod:`seekdeep.attention.cpu_kernels`); softmax, ``lse`` and the accumulators are fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from seekdeep.attention import block_sparse as bsa


@dataclass
class _Plan:
    """What the forward and the backward both need besides the differentiable inputs."""

    block_rows: torch.Tensor  # (B, Hkv, Nq, n) rows of the (B * Hkv * Nk, bs * D) block view
    tokens: torch.Tensor  # (B, Nq, S) key slot of each gathered key
    token_ok: torch.Tensor  # (B, Nq, S) the slot belongs to a valid selection
    key_valid: torch.Tensor | None
    k_len: int
    sliding_window: int | None
    first: int  # first query block
    lead: int  # rows of the first query block before q_offset
    block_size: int
    num_kv_blocks: int
    chunk: int  # query blocks per chunk
    scale: float
    compute_dtype: torch.dtype


def _chunk_mask(plan: _Plan, bias: torch.Tensor | None, c0: int, c1: int, q_slots: torch.Tensor):
    """Additive mask (B, m, bs, S) fp32 (0 / -inf, plus the block bias) and empty rows (B, m, bs)."""
    allowed, empty = bsa.gathered_token_mask(
        plan.tokens[:, c0:c1], plan.token_ok[:, c0:c1], q_slots, k_len=plan.k_len, key_valid=plan.key_valid,
        sliding_window=plan.sliding_window,
    )  # (B, m, bs, S), (B, m, bs)
    if bias is None:
        base = torch.zeros((), device=allowed.device)
    else:  # (B, m, n) per selected block -> (B, m, 1, S) per gathered key
        base = bias[:, c0:c1].float().repeat_interleave(plan.block_size, dim=-1)[:, :, None]
    return torch.where(allowed, base, float("-inf")), empty


def _buf(name: str, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    """A reused scratch tensor: a fresh multi-MB CPU allocation is page-faulted on first touch,
    which made a chunk's gather 2-5x slower than the copy itself. Nothing saved for the backward
    lives in one (the kernel saves only its inputs, the output and the lse)."""
    numel = 1
    for size in shape:
        numel *= size
    return bsa._scratch("train_" + name, numel, dtype, torch.device(device)).view(shape)


def _tiles(plan: _Plan, q_pad, k_blocks, v_blocks, c0: int, c1: int):
    """One chunk's queries (B, Hkv, m, rep * bs, D) and gathered keys / values (B, Hkv, m, S, D)."""
    b, hkv = plan.block_rows.shape[:2]
    bs, m = plan.block_size, c1 - c0
    rep = q_pad.shape[1] // hkv
    d, dv = q_pad.shape[-1], v_blocks.shape[-1] // bs
    rows = plan.block_rows[:, :, c0:c1].reshape(-1)
    n = plan.block_rows.shape[-1]
    cd, dev = q_pad.dtype, q_pad.device
    kg = torch.index_select(k_blocks, 0, rows, out=_buf("k", (rows.numel(), bs * d), cd, dev))
    vg = torch.index_select(v_blocks, 0, rows, out=_buf("v", (rows.numel(), bs * dv), cd, dev))
    nq = q_pad.shape[2] // bs
    qc = _buf("q", (b, hkv, m, rep, bs, d), cd, dev)
    qc.copy_(q_pad.view(b, hkv, rep, nq, bs, d)[:, :, :, c0:c1].permute(0, 1, 3, 2, 4, 5))
    return qc.view(b, hkv, m, rep * bs, d), kg.view(b, hkv, m, n * bs, d), vg.view(b, hkv, m, n * bs, dv), rows


def _matmul(name: str, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``a @ b`` into a scratch tensor, returned in ``dtype`` (a second scratch if it differs)."""
    out = torch.matmul(a, b, out=_buf(name, (*a.shape[:-1], b.shape[-1]), a.dtype, a.device))
    if out.dtype == dtype:
        return out
    return _buf(name + "_" + str(dtype), out.shape, dtype, out.device).copy_(out)


def _probs(plan: _Plan, qc, kg, mask, lse=None):
    """Logits + mask -> probabilities (B, Hkv, m, rep * bs, S) fp32 in scratch (and the lse)."""
    b, hkv, m, rows, _ = qc.shape
    bs = plan.block_size
    logits = _matmul("s", qc, kg.transpose(-1, -2)).mul_(plan.scale)  # (B, Hkv, m, rep * bs, S)
    logits.view(b, hkv, m, rows // bs, bs, -1).add_(mask[:, None, :, None])
    if lse is None:
        lse = torch.logsumexp(logits, dim=-1)  # (B, Hkv, m, rep * bs)
    return logits.sub_(lse[..., None]).exp_(), lse


def _row_zero_(x: torch.Tensor, empty: torch.Tensor, rep: int) -> torch.Tensor:
    """Zero, in place, the rows (B, Hkv, m, rep * bs, X) of query rows without a key; ``empty`` (B, m, bs)."""
    b, hkv, m, rows, _ = x.shape
    if bool(empty.any()):
        x.masked_fill_(empty[:, None, :, None].expand(b, hkv, m, rep, rows // rep).reshape(b, hkv, m, rows, 1), 0.0)
    return x


class _GatheredBlockAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, plan: _Plan):
        cd, bs = plan.compute_dtype, plan.block_size
        b, h, tq, d = q.shape
        hkv, tk, dv = k.shape[1], k.shape[2], v.shape[-1]
        rep = h // hkv
        nq, nk = plan.tokens.shape[1], plan.num_kv_blocks
        q_pad = F.pad(q, (0, 0, plan.lead, nq * bs - plan.lead - tq)).to(cd)  # (B, H, Nq * bs, D)
        k_blocks = F.pad(k, (0, 0, 0, nk * bs - tk)).to(cd).contiguous().view(-1, bs * d)  # (B * Hkv * Nk, bs * D)
        v_blocks = F.pad(v, (0, 0, 0, nk * bs - tk)).to(cd).contiguous().view(-1, bs * dv)
        out = q_pad.new_empty(b, hkv, nq, rep * bs, dv)
        lses = []
        for c0, c1, q_slots in bsa.query_block_chunks(nq, plan.chunk, plan.first, bs, q.device):
            mask, empty = _chunk_mask(plan, bias, c0, c1, q_slots)
            qc, kg, vg, _ = _tiles(plan, q_pad, k_blocks, v_blocks, c0, c1)
            p, lse = _probs(plan, qc, kg, mask)
            p_c = p if cd == torch.float32 else _buf("p_c", p.shape, cd, p.device).copy_(p)
            out[:, :, c0:c1] = _row_zero_(_matmul("o", p_c, vg, cd), empty, rep)
            lses.append(lse)
        ctx.save_for_backward(q, k, v, bias, out, torch.cat(lses, dim=2))
        ctx.plan = plan
        # (B, Hkv, Nq, rep, bs, Dv) -> (B, H, Nq * bs, Dv), rows of this call only
        result = out.view(b, hkv, nq, rep, bs, dv).permute(0, 1, 3, 2, 4, 5).reshape(b, h, nq * bs, dv)
        return result[:, :, plan.lead:plan.lead + tq].to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, bias, out, lse = ctx.saved_tensors
        plan: _Plan = ctx.plan
        cd, bs = plan.compute_dtype, plan.block_size
        b, h, tq, d = q.shape
        hkv, tk, dv = k.shape[1], k.shape[2], v.shape[-1]
        rep = h // hkv
        nq, nk = plan.tokens.shape[1], plan.num_kv_blocks
        pad_rows = (0, 0, plan.lead, nq * bs - plan.lead - tq)
        q_pad = F.pad(q, pad_rows).to(cd)
        k_blocks = F.pad(k, (0, 0, 0, nk * bs - tk)).to(cd).contiguous().view(-1, bs * d)
        v_blocks = F.pad(v, (0, 0, 0, nk * bs - tk)).to(cd).contiguous().view(-1, bs * dv)
        go = F.pad(grad_out, pad_rows).to(cd).view(b, hkv, rep, nq, bs, dv).permute(0, 1, 3, 2, 4, 5)
        go = go.reshape(b, hkv, nq, rep * bs, dv)  # same layout as ``out``
        dq = q_pad.new_empty(b, hkv, nq, rep * bs, d)
        dk = torch.zeros(k_blocks.shape, dtype=torch.float32, device=q.device)
        dvv = torch.zeros(v_blocks.shape, dtype=torch.float32, device=q.device)
        need_bias = bias is not None and ctx.needs_input_grad[3]
        dbias = torch.zeros(bias.shape, dtype=torch.float32, device=q.device) if need_bias else None
        n = plan.block_rows.shape[-1]
        for c0, c1, q_slots in bsa.query_block_chunks(nq, plan.chunk, plan.first, bs, q.device):
            m = c1 - c0
            mask, empty = _chunk_mask(plan, bias, c0, c1, q_slots)
            qc, kg, vg, rows = _tiles(plan, q_pad, k_blocks, v_blocks, c0, c1)
            p, _ = _probs(plan, qc, kg, mask, lse[:, :, c0:c1])
            doc = _row_zero_(_buf("do", go[:, :, c0:c1].shape, cd, q.device).copy_(go[:, :, c0:c1]), empty, rep)
            delta = (doc.float() * out[:, :, c0:c1].float()).sum(-1, keepdim=True)  # (B, Hkv, m, rep * bs, 1)
            p_c = p if cd == torch.float32 else _buf("p_c", p.shape, cd, p.device).copy_(p)
            dvv.index_add_(0, rows, _matmul("dv", p_c.transpose(-1, -2), doc).view(-1, bs * dv))
            ds = p.mul_(_matmul("dp", doc, vg.transpose(-1, -2)).sub_(delta))  # (B, Hkv, m, rep * bs, S), in place
            if need_bias:
                dbias[:, c0:c1] = ds.view(b, hkv, m, rep * bs, n, bs).sum((1, 3, 5))
            ds_c = ds if cd == torch.float32 else _buf("p_c", ds.shape, cd, ds.device).copy_(ds)
            dq[:, :, c0:c1] = _matmul("dq", ds_c, kg, cd).mul_(plan.scale)
            dk.index_add_(0, rows, _matmul("dk", ds_c.transpose(-1, -2), qc).mul_(plan.scale).view(-1, bs * d))
        dq = dq.view(b, hkv, nq, rep, bs, d).permute(0, 1, 3, 2, 4, 5).reshape(b, h, nq * bs, d)
        dq = dq[:, :, plan.lead:plan.lead + tq].to(q.dtype)
        dk = dk.view(b, hkv, nk * bs, d)[:, :, :tk].to(k.dtype)
        dvv = dvv.view(b, hkv, nk * bs, dv)[:, :, :tk].to(v.dtype)
        return dq, dk, dvv, None if dbias is None else dbias.to(bias.dtype), None


def gathered_block_attention_train(
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
    chunk_elements: int = 1 << 23,
) -> torch.Tensor:
    """Block-sparse attention for training: the arguments and result of
    :func:`seekdeep.attention.block_sparse.gather_block_attention`, with the memory-light
    recomputing backward of this module. ``block_bias`` (B, Nq, n) gets its gradient."""
    bs = block_size
    b, h, tq, _ = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    nq, n = block_indices.shape[1], block_indices.shape[2]
    first = q_offset // bs
    nk = -(-tk // bs)
    tokens, token_ok = bsa._selected_tokens(block_indices, block_valid, bs)  # (B, Nq, S)
    base = (torch.arange(b, device=q.device)[:, None] * hkv + torch.arange(hkv, device=q.device)[None]) * nk  # (B, Hkv)
    plan = _Plan(
        block_rows=base[:, :, None, None] + block_indices[:, None], tokens=tokens, token_ok=token_ok,
        key_valid=key_valid, k_len=tk,
        sliding_window=sliding_window if sliding_window is not None and sliding_window < tk else None,
        first=first, lead=q_offset - first * bs, block_size=bs, num_kv_blocks=nk,
        chunk=bsa._chunk_blocks(b, h, bs, n * bs, chunk_elements), scale=scale,
        compute_dtype=compute_dtype or q.dtype,
    )
    return _GatheredBlockAttention.apply(q, k, v, block_bias, plan)
