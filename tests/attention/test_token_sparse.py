"""The ``fused`` token-level dsa kernel against the ``masked_sdpa`` reference path."""

from __future__ import annotations

import pytest
import torch

from seekdeep.attention import AttentionMask, AttentionSpec
from seekdeep.attention.dsa import DynamicSparseAttention, select_topk
from seekdeep.attention.token_sparse import topk_mask
from seekdeep.errors import ConfigError

B, H, D, C = 2, 4, 8, 32
SCALE = D**-0.5


def make_pair(**options):
    """Two dsa modules with the same weights: the fused kernel and the reference path."""
    spec = AttentionSpec(hidden_size=C, num_heads=H, num_kv_heads=options.pop("hkv", 2), head_dim=D, v_head_dim=D,
                         options=options)
    torch.manual_seed(0)
    fused = DynamicSparseAttention(AttentionSpec(**{**spec.__dict__, "options": {**options, "token_kernel": "fused"}}))
    ref = DynamicSparseAttention(AttentionSpec(**{**spec.__dict__, "options": {**options, "token_kernel": "masked_sdpa"}}))
    ref.load_state_dict(fused.state_dict())
    with torch.no_grad():  # scores with real spread (and a distance bias where there is one)
        for m in (fused, ref):
            torch.manual_seed(1)
            m.index_q.weight.normal_(std=0.5)
            m.index_weights.weight.normal_(std=0.5)
            if m.index_distance is not None:
                m.index_distance.normal_(std=0.5)
    return fused, ref


def inputs(t: int, hkv: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, t, D, generator=g) * 2  # wide logits: renormalising the dense softmax is tested
    k = torch.randn(B, hkv, t, D, generator=g)
    v = torch.randn(B, hkv, t, D, generator=g)
    x = torch.randn(B, t, C, generator=g)
    return q, k, v, x


def run_with_grads(module, q, k, v, x, mask, weight):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    module.zero_grad(set_to_none=True)
    out = module(q, k, v, mask=mask, scale=SCALE, hidden_states=x)
    loss = (out * weight).sum()
    if module.indexer_loss is not None:
        loss = loss + 3.0 * module.indexer_loss
    loss.backward()
    grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    return out.detach(), module.indexer_loss, (q.grad, k.grad, v.grad), grads


CASES = {
    "sparse_gqa": dict(t=24, hkv=2, opts=dict(topk=6, local_window=3)),
    "sparse_mha_padding": dict(t=24, hkv=4, pad=True, opts=dict(topk=5, local_window=2)),
    "sparse_window_distance": dict(t=24, hkv=1, window=9, opts=dict(topk=4, local_window=1, distance_bias=12)),
    # 96 queries: three row chunks, the first (32 rows, <= 32 keys each) under topk=40 keeps every key
    "chunked_padding_distance": dict(t=96, hkv=2, pad=True, opts=dict(topk=40, local_window=8, distance_bias=50)),
    "chunked_small_topk": dict(t=96, hkv=1, opts=dict(topk=5, local_window=2)),
    "dense_warmup_padding": dict(t=16, hkv=2, pad=True, warmup=True, opts=dict(topk=4, local_window=2)),
    "topk_covers_keys": dict(t=12, hkv=2, opts=dict(topk=64)),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("indexer_loss", [True, False], ids=["kl", "no_kl"])
def test_fused_matches_masked_sdpa_values_and_gradients(case, indexer_loss):
    t = case["t"]
    fused, ref = make_pair(hkv=case["hkv"], **case["opts"])
    key_valid = torch.stack([torch.arange(t) >= p for p in (0, 5)]) if case.get("pad") else None
    mask = AttentionMask(t, t, key_valid=key_valid, sliding_window=case.get("window"))
    q, k, v, x = inputs(t, case["hkv"])
    weight = torch.randn(B, H, t, D, generator=torch.Generator().manual_seed(5))
    for m in (fused, ref):
        m.train()
        m.compute_indexer_loss, m.dense_warmup = indexer_loss, case.get("warmup", False)
    got = run_with_grads(fused, q, k, v, x, mask, weight)
    want = run_with_grads(ref, q, k, v, x, mask, weight)
    assert fused.last_kernel == "fused" and ref.last_kernel in ("masked_sdpa", "dense_sdpa")
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    if indexer_loss:
        torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert got[3].keys() == want[3].keys() and any(n.startswith("index_") for n in got[3])
    for name in got[3]:
        scale = float(want[3][name].abs().max())  # layer norm's backward cancels: tolerance per tensor
        torch.testing.assert_close(got[3][name], want[3][name], atol=1e-5 * scale, rtol=1e-4, msg=name)
    if key_valid is not None:
        assert got[0][1, :, :5].abs().max() == 0  # rows without a key give 0


def test_fused_bf16_follows_fp32_reference():
    fused, ref = make_pair(topk=6, local_window=2)
    q, k, v, x = inputs(20, 2)
    mask = AttentionMask(20, 20)
    with torch.no_grad():
        fused.compute_indexer_loss = ref.compute_indexer_loss = True
        want = ref(q, k, v, mask=mask, scale=SCALE, hidden_states=x)
        got = fused(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask=mask, scale=SCALE, hidden_states=x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.05)


def test_fused_survives_underflowing_selected_mass():
    # One key with a huge logit takes all the dense mass: the selected keys' dense probabilities
    # underflow, and the renormalised softmax must be recomputed from their logits.
    fused, ref = make_pair(topk=2, local_window=1)
    q, k, v, x = inputs(8, 2)
    q = q.abs()
    k[:, :, 0] = 50.0  # key 0's logit is ~200 above the others for every query
    mask = AttentionMask(8, 8)
    with torch.no_grad():
        got = fused(q, k, v, mask=mask, scale=SCALE, hidden_states=x)
        want = ref(q, k, v, mask=mask, scale=SCALE, hidden_states=x)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_topk_mask_equals_stable_sort_selection(ties):
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(3, 40, 40, generator=g)
    if ties:  # ReLU'd scores: many exact zeros, broken earliest-first
        scores = scores.relu().round(decimals=1)
    tq_slots = torch.arange(40)[:, None]
    allowed = (torch.arange(40)[None] <= tq_slots)[None] & (torch.rand(3, 1, 40, generator=g) > 0.1)
    for topk, window in ((5, 1), (8, 3), (39, 4)):
        indices, valid = select_topk(scores, allowed, topk, local_window=window)
        want = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, indices, valid)
        assert torch.equal(topk_mask(scores, allowed, topk, local_window=window), want)


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_topk_mask_uniform_local_rows_equal_stable_sort(ties):
    """A later query chunk without padding: every row keeps the same number of local keys, so
    the others come from the smaller topk over the non-local keys; also topk == local_window."""
    g = torch.Generator().manual_seed(3)
    offset, tq, tk = 24, 16, 40
    scores = torch.randn(2, tq, tk, generator=g)
    if ties:
        scores = scores.relu().round(decimals=1)
    allowed = (torch.arange(tk)[None] <= torch.arange(offset, offset + tq)[:, None])[None]  # (1, Tq, Tk)
    for topk, window in ((12, 4), (6, 6), (30, 1)):
        indices, valid = select_topk(scores, allowed, topk, local_window=window, q_offset=offset)
        want = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, indices, valid)
        assert torch.equal(topk_mask(scores, allowed, topk, local_window=window, q_offset=offset), want)


def test_token_kernel_option_is_checked():
    spec = dict(hidden_size=C, num_heads=H, num_kv_heads=2, head_dim=D, v_head_dim=D)
    with pytest.raises(ConfigError, match="token_kernel"):
        DynamicSparseAttention(AttentionSpec(**spec, options={"token_kernel": "fast"}))
    with pytest.raises(ConfigError, match="token_kernel"):
        DynamicSparseAttention(AttentionSpec(**spec, options={"block_size": 4, "token_kernel": "fused"}))
