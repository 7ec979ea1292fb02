"""The in-place block decode kernel (``row_kernel="blocks"``) against the gather kernel and an fp32
reference: strided cache views, runs of adjacent blocks, partial last blocks, several rows across a
block boundary, padding, windows, GQA, rows without a key, bf16 in both precisions; the module's
choice between the row kernels and the precision probe of this kernel."""

from __future__ import annotations

import pytest
import torch

from seekdeep.attention import AttentionMask, AttentionSpec, block_decode, cpu_kernels
from seekdeep.attention import block_sparse as bsa
from seekdeep.attention.dsa import DynamicSparseAttention
from seekdeep.errors import ConfigError

B, H, HKV, D, C, BS = 2, 4, 2, 8, 32, 4
SCALE = D**-0.5


def cache_views(tk: int, dtype=torch.float32):
    """k, v (B, Hkv, tk, D) as views of a longer preallocated cache (strided, as in decoding)."""
    g = torch.Generator().manual_seed(3)
    k_buf, v_buf = (torch.randn(B, HKV, tk + 9, D, generator=g).to(dtype) for _ in range(2))
    return k_buf[:, :, :tk], v_buf[:, :, :tk]


def selection(tq: int, q_offset: int, n: int):
    """(B, Tq, n) per-row block selections, shared by the rows of one query block: adjacent runs,
    an unused slot in the second sequence, the diagonal block always."""
    rows = []
    for bi in range(B):
        per_block = {}
        for r in range(tq):
            qb = (q_offset + r) // BS
            if qb not in per_block:
                g = torch.Generator().manual_seed(100 * bi + qb)
                others = torch.randperm(qb, generator=g)[: n - 1].sort().values.tolist() if qb else []
                blocks = others + [qb]
                valid = [True] * len(blocks)
                if bi == 1 and len(blocks) > 2:
                    valid[0] = False  # an unused slot: its block must not count
                pad = n - len(blocks)
                per_block[qb] = (blocks + [0] * pad, valid + [False] * pad)
            rows.append(per_block[qb])
    idx = torch.tensor([[r[0] for r in rows[bi * tq:(bi + 1) * tq]] for bi in range(B)])
    ok = torch.tensor([[r[1] for r in rows[bi * tq:(bi + 1) * tq]] for bi in range(B)])
    return idx, ok


def reference(q, k, v, idx, ok, q_offset, key_valid, window):
    """fp32 attention of each row over the keys of its valid selected blocks that it may see."""
    tq, tk = q.shape[2], k.shape[2]
    out = torch.zeros(B, H, tq, D)
    for bi in range(B):
        for r in range(tq):
            slot = q_offset + r
            keys = [s for j, o in zip(idx[bi, r].tolist(), ok[bi, r].tolist()) if o
                    for s in range(j * BS, min((j + 1) * BS, tk))]
            keys = [s for s in keys if s <= slot and (key_valid is None or key_valid[bi, s])
                    and (window is None or slot - s < window)]
            if not keys:
                continue
            for hi in range(H):
                kk, vv = k[bi, hi // (H // HKV), keys].float(), v[bi, hi // (H // HKV), keys].float()
                p = torch.softmax(q[bi, hi, r].float() @ kk.T * SCALE, -1)
                out[bi, hi, r] = p @ vv
    return out


@pytest.mark.parametrize("case", ["plain", "rows_across_blocks", "padding", "window", "partial_last_block"])
def test_block_kernel_matches_gather_and_reference(case):
    tk = {"partial_last_block": 30}.get(case, 32)
    tq = 3 if case == "rows_across_blocks" else 1
    q_offset = tk - tq
    k, v = cache_views(tk)
    q = torch.randn(B, H, tq, D, generator=torch.Generator().manual_seed(4))
    key_valid = None
    if case == "padding":  # the second sequence starts at slot 13: whole blocks and half a block padded
        key_valid = torch.stack([torch.ones(tk, dtype=torch.bool), torch.arange(tk) >= 13])
    window = 9 if case == "window" else None
    idx, ok = selection(tq, q_offset, n=4)
    args = dict(q_offset=q_offset, block_size=BS, scale=SCALE, key_valid=key_valid, sliding_window=window)
    got = block_decode.block_row_attention(q, k, v, idx, ok, **args)
    want = bsa.gather_row_attention(q, k, v, idx, ok, **args)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, reference(q, k, v, idx, ok, q_offset, key_valid, window), atol=1e-5, rtol=1e-5)


def test_rows_without_a_visible_key_give_zero():
    tk = 32
    k, v = cache_views(tk)
    q = torch.randn(B, H, 1, D)
    idx = torch.tensor([[[0, 1]], [[0, 7]]])
    ok = torch.tensor([[[True, True]], [[False, False]]])  # the second sequence selected nothing
    key_valid = torch.stack([torch.arange(tk) >= 8, torch.ones(tk, dtype=torch.bool)])  # blocks 0, 1 padded
    got = block_decode.block_row_attention(q, k, v, idx, ok, q_offset=tk - 1, block_size=BS, scale=SCALE,
                                           key_valid=key_valid)
    assert torch.equal(got, torch.zeros_like(got))


@pytest.mark.parametrize("precision", [torch.float32, torch.bfloat16])
def test_bf16_cache_in_both_precisions(precision, monkeypatch):
    """bf16 cache: fp32 compute converts runs in pieces (a tiny piece size forces several per
    run), native runs bf16 matmuls; both within bf16 error of the fp32 reference."""
    monkeypatch.setattr(block_decode, "CONVERT_ELEMENTS", HKV * D * 3)  # 3 keys per converted piece
    tk, tq = 32, 2
    k, v = cache_views(tk, torch.bfloat16)
    q = torch.randn(B, H, tq, D).bfloat16()
    idx, ok = selection(tq, tk - tq, n=4)
    got = block_decode.block_row_attention(q, k, v, idx, ok, q_offset=tk - tq, block_size=BS, scale=SCALE,
                                           compute_dtype=precision)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), reference(q, k, v, idx, ok, tk - tq, None, None), atol=3e-2, rtol=0)


def make(row_kernel: str, dtype=torch.float32, block_kernel: str = "auto") -> DynamicSparseAttention:
    torch.manual_seed(0)
    spec = AttentionSpec(C, H, HKV, D, D, {"block_size": BS, "topk": 12, "row_kernel": row_kernel,
                                           "block_kernel": block_kernel})
    return DynamicSparseAttention(spec).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pad", [False, True])
def test_module_decode_with_blocks_kernel_matches_full_sequence(dtype, pad):
    """Steps of one and two tokens through the module with ``row_kernel="blocks"`` reproduce the
    full-sequence forward (selection kept in the cache, padding)."""
    t, prefill = 30, 17
    g = torch.Generator().manual_seed(1)
    q, k, v, x = (torch.randn(*s, generator=g).to(dtype) for s in ((B, H, t, D), (B, HKV, t, D), (B, HKV, t, D), (B, t, C)))
    key_valid = torch.stack([torch.arange(t) >= p for p in (0, 6)]) if pad else None

    def mask(q_len, k_len):
        return AttentionMask(q_len, k_len, key_valid=None if key_valid is None else key_valid[:, :k_len])

    dsa = make("blocks", dtype)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    with torch.no_grad():
        full = dsa(q, k, v, mask=mask(t, t), scale=SCALE, hidden_states=x)
        state: dict = {}
        dsa(q[:, :, :prefill], k[:, :, :prefill], v[:, :, :prefill], mask=mask(prefill, prefill), scale=SCALE,
            hidden_states=x[:, :prefill], cache_state=state)
        end = prefill
        while end < t:
            stop = min(t, end + (1 if end % 3 else 2))
            out = dsa(q[:, :, end:stop], k[:, :, :stop], v[:, :, :stop], mask=mask(stop - end, stop), scale=SCALE,
                      hidden_states=x[:, end:stop], cache_state=state)
            assert dsa.last_kernel.startswith("row_blocks")
            torch.testing.assert_close(out.float(), full[:, :, end:stop].float(), atol=tol, rtol=0)
            end = stop


def test_auto_row_kernel_choice(monkeypatch):
    t = 21
    q, x = torch.randn(B, H, 1, D), torch.randn(B, 1, C)
    k, v = cache_views(t)
    dsa = make("auto")
    state: dict = {}
    with torch.no_grad():
        dsa(torch.randn(B, H, t - 1, D), k[:, :, :t - 1], v[:, :, :t - 1], mask=AttentionMask(t - 1, t - 1),
            scale=SCALE, hidden_states=torch.randn(B, t - 1, C), cache_state=state)
        step = dict(mask=AttentionMask(1, t), scale=SCALE, hidden_states=x, cache_state=dict(state))
        dsa(q, k, v, **step)
        assert dsa.last_kernel == "row_gather"  # a block of 2 x 4 x 8 floats: per-op cost dominates, gather
        monkeypatch.setattr(block_decode, "MIN_BLOCK_BYTES", 1)
        step["cache_state"] = dict(state)
        dsa(q, k, v, **step)
        assert dsa.last_kernel == "row_blocks"
        step["cache_state"] = dict(state)
        make("gather")(q, k, v, **step)  # named: the gather kernel whatever the size
    sdpa_rows = make("auto", block_kernel="gather_sdpa")
    with torch.no_grad():
        step["cache_state"] = dict(state)
        sdpa_rows(q, k, v, **step)
    assert sdpa_rows.last_kernel == "row_gather_sdpa"
    trained = make("blocks").train()
    step["cache_state"] = dict(state)
    with pytest.raises(ConfigError) as err:  # no backward: refused under autograd
        trained(q.requires_grad_(), k, v, **step)
    assert err.value.field == "attention_options.row_kernel"
    with pytest.raises(ConfigError):
        make("fused")


def test_blocks_precision_probe_is_cached_per_kernel():
    choice = cpu_kernels.choose_precision(torch.bfloat16, 1, 128, 16, kernel="blocks")
    assert choice in cpu_kernels.COMPUTE_CHOICES
    assert cpu_kernels.probed_choices()[(cpu_kernels.cpu_class(), torch.bfloat16, (1, 128, 16), "blocks")] == choice
    assert cpu_kernels.choose_precision(torch.float32, 1, 128, 16, kernel="blocks") == "native"
    with pytest.raises(ValueError, match="accepted"):
        cpu_kernels.choose_precision(torch.bfloat16, 1, 128, 16, kernel="flash")
