"""dsa block mode (block_size > 1) against independent references built on the eager backend."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from seekdeep.attention import AttentionMask, AttentionSpec
from seekdeep.attention import block_sparse as bsa
from seekdeep.attention.dense import eager_attention
from seekdeep.attention.dsa import DynamicSparseAttention
from seekdeep.errors import ConfigError

B, H, D, C = 2, 4, 8, 32
BS = 4  # block size
SCALE = D**-0.5
ATOL = 1e-5
KERNELS = ["gather", "gather_sdpa", "flex_eager"]  # gather_fp32 equals gather in fp32: bf16 tests in test_cpu_kernels.py


@pytest.fixture(autouse=True)
def _seed_and_quiet():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        yield


def make_dsa(hkv: int = 2, **options) -> DynamicSparseAttention:
    options = {"block_size": BS, "index_heads": 16, **options}
    return DynamicSparseAttention(AttentionSpec(C, H, hkv, D, D, options))


def inputs(t: int, hkv: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, t, D, generator=g), torch.randn(B, hkv, t, D, generator=g),
            torch.randn(B, hkv, t, D, generator=g), torch.randn(B, t, C, generator=g))


def left_padding(t: int, pads=(0, 5)) -> torch.Tensor:
    return torch.stack([torch.arange(t) >= p for p in pads])


def run(dsa, q, k, v, x, mask, cache_state=None):
    return dsa(q, k, v, mask=mask, scale=SCALE, hidden_states=x, cache_state=cache_state)


# --- independent references ----------------------------------------------------------------


def reference_scores(dsa, x, key_valid):
    """Block scores from the documented rule, with loops: anchor = first valid slot of the query
    block, key block summary = mean of its valid index keys, score = sum_h w_h relu(q_h . k)/sqrt(Di)."""
    b_n, t, _ = x.shape
    nb = -(-t // BS)
    hi, di = dsa.index_heads, dsa.index_head_dim
    valid = key_valid if key_valid is not None else torch.ones(b_n, t, dtype=torch.bool)
    keys = dsa.index_k_norm(dsa.index_k(x))  # (B, T, Di)
    scores = torch.zeros(b_n, nb, nb)
    for b in range(b_n):
        summaries = []
        for j in range(nb):
            slots = [s for s in range(j * BS, min(t, (j + 1) * BS)) if valid[b, s]]
            summaries.append(keys[b, slots].mean(0) if slots else torch.zeros(di))
        summaries = torch.stack(summaries)
        for qb in range(nb):
            slots = [s for s in range(qb * BS, min(t, (qb + 1) * BS)) if valid[b, s]]
            anchor = slots[0] if slots else qb * BS
            iq = dsa.index_q(x[b, anchor]).view(hi, di)
            w = dsa.index_weights(x[b, anchor]) * hi**-0.5
            scores[b, qb] = ((iq @ summaries.T).relu() * w[:, None]).sum(0) * di**-0.5
    return scores


def reference_selection(scores, t, n_sel, local_blocks, key_valid=None, window=None):
    """(B, Nb, Nb) bool: per query block, allowed local blocks first, then by descending score
    (earlier block on ties), ``n_sel`` at most. Allowed: j <= qb, j holds a valid slot, and some
    slot of j is within the window of some slot of qb (brute force over slot pairs)."""
    b_n, nb = scores.shape[0], scores.shape[1]
    selected = torch.zeros(b_n, nb, nb, dtype=torch.bool)
    for b in range(b_n):
        for qb in range(nb):
            allowed = []
            for j in range(qb + 1):
                has_valid = any(key_valid is None or key_valid[b, s] for s in range(j * BS, min(t, (j + 1) * BS)))
                reach = window is None or any(
                    0 <= s - u < window for s in range(qb * BS, (qb + 1) * BS) for u in range(j * BS, (j + 1) * BS)
                )
                if has_valid and reach:
                    allowed.append(j)
            local = [j for j in allowed if qb - j < local_blocks]
            rest = sorted((j for j in allowed if j not in local), key=lambda j: (-scores[b, qb, j].item(), j))
            for j in (local + rest)[:n_sel]:
                selected[b, qb, j] = True
    return selected


def token_mask(selected, mask: AttentionMask):
    """Dense (B, 1, Tq, Tk) mask: the attention mask restricted to the selected blocks."""
    q_blocks = torch.arange(mask.q_offset, mask.k_len) // BS
    k_blocks = torch.arange(mask.k_len) // BS
    in_selection = selected[:, q_blocks][:, :, k_blocks]  # (B, Tq, Tk)
    return mask.to_bool("cpu") & in_selection[:, None]


def reference_attention(q, k, v, allowed, bias=None):
    """Eager softmax attention with an optional additive (B, Tq, Tk) bias; empty rows give 0."""
    kr = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    vr = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    logits = q @ kr.transpose(-1, -2) * SCALE
    if bias is not None:
        logits = logits + bias[:, None]
    empty = ~allowed.any(-1, keepdim=True)
    probs = logits.masked_fill(~(allowed | empty), float("-inf")).softmax(-1)
    return (probs @ vr).masked_fill(empty, 0.0)


# --- exactness when the budget covers the sequence -------------------------------------------

CASES = {
    "causal_gqa": dict(hkv=2),
    "causal_mha": dict(hkv=4),
    "padding": dict(hkv=2, pad=True),
    "padding_window": dict(hkv=1, pad=True, window=6),
}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_block_mode_equals_eager_when_budget_covers_sequence(kernel, case):
    t = 37  # not a multiple of the block size
    q, k, v, x = inputs(t, case["hkv"])
    mask = AttentionMask(t, t, key_valid=left_padding(t) if case.get("pad") else None,
                         sliding_window=case.get("window"))
    dsa = make_dsa(case["hkv"], topk=t + 3, block_kernel=kernel)
    ref = eager_attention(q, k, v, mask.to_bool("cpu"), SCALE)
    with torch.no_grad():
        torch.testing.assert_close(run(dsa, q, k, v, x, mask), ref, atol=ATOL, rtol=0)
    if kernel == "gather":  # with the straight-through term on (value unchanged)
        dsa.train()
        torch.testing.assert_close(run(dsa, q, k, v, x, mask).detach(), ref, atol=ATOL, rtol=0)


def test_auto_kernel_uses_dense_when_budget_covers_every_block():
    q, k, v, x = inputs(12)
    mask = AttentionMask(12, 12, key_valid=left_padding(12))
    with torch.no_grad():
        out = run(make_dsa(topk=12), q, k, v, x, mask)
    torch.testing.assert_close(out, eager_attention(q, k, v, mask.to_bool("cpu"), SCALE), atol=ATOL, rtol=0)


# --- selection against the independent reference ---------------------------------------------

SELECTION_CASES = {
    "plain": dict(),
    "whole_blocks": dict(t=44),  # Tk a multiple of the block size: block-row gather
    "gqa_mha": dict(hkv=4),
    "local2": dict(local_blocks=2),
    "padding": dict(pad=True),
    "window": dict(window=11),
    "padding_window_local2": dict(pad=True, window=14, local_blocks=2),
}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", SELECTION_CASES.values(), ids=SELECTION_CASES.keys())
def test_selection_and_output_match_reference(kernel, case):
    t, topk, hkv = case.get("t", 42), 12, case.get("hkv", 2)  # 11 blocks, 3 selected per query block
    q, k, v, x = inputs(t, hkv)
    key_valid = left_padding(t) if case.get("pad") else None
    mask = AttentionMask(t, t, key_valid=key_valid, sliding_window=case.get("window"))
    local = case.get("local_blocks", 1)
    dsa = make_dsa(hkv, topk=topk, block_kernel=kernel, local_blocks=local)
    with torch.no_grad():
        ref_scores = reference_scores(dsa, x, key_valid)
        _, scores, *_ , indices, valid, _ = dsa.block_selection(x, mask)
        out = run(dsa, q, k, v, x, mask)
    torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=1e-5)
    ref_sel = reference_selection(ref_scores, t, 3, local, key_valid, case.get("window"))
    got_sel = torch.zeros_like(ref_sel)
    for b in range(B):
        for qb in range(ref_sel.shape[1]):
            got_sel[b, qb, indices[b, qb][valid[b, qb]]] = True
    assert torch.equal(got_sel, ref_sel)
    allowed = token_mask(ref_sel, mask)
    ref = eager_attention(q, k, v, allowed, SCALE)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert (out - eager_attention(q, k, v, mask.to_bool("cpu"), SCALE)).abs().max() > 1e-3  # sparsity is real


def test_unselected_keys_do_not_matter():
    t = 42
    q, k, v, x = inputs(t)
    mask = AttentionMask(t, t)
    dsa = make_dsa(topk=12)
    with torch.no_grad():
        _, _, _, _, indices, valid, _ = dsa.block_selection(x, mask)
        out = run(dsa, q, k, v, x, mask)
    last = indices[:, -1][valid[:, -1]].view(B, -1)  # blocks the last query block reads
    k2, v2 = k.clone(), v.clone()
    for b in range(B):
        for j in set(range(11)) - set(last[b].tolist()):
            k2[b, :, j * BS:(j + 1) * BS] += 3.0
            v2[b, :, j * BS:(j + 1) * BS] -= 3.0
    with torch.no_grad():
        out2 = run(dsa, q, k2, v2, x, mask)  # the index input x is unchanged: same selection
    torch.testing.assert_close(out2[:, :, -2:], out[:, :, -2:], atol=ATOL, rtol=0)


# --- gradients ------------------------------------------------------------------------------


@pytest.mark.parametrize("pad,window", [(False, None), (True, None), (True, 10)])
def test_gather_gradients_match_dense_masked_reference(pad, window):
    t = 30
    q, k, v, x = inputs(t)
    key_valid = left_padding(t) if pad else None
    mask = AttentionMask(t, t, key_valid=key_valid, sliding_window=window)
    dsa = make_dsa(topk=8, block_kernel="gather", local_blocks=1).train()
    leaves = [z.clone().requires_grad_() for z in (q, k, v)]
    out = run(dsa, *leaves, x, mask)
    cotangent = torch.randn_like(out)
    (out * cotangent).sum().backward()
    got = [z.grad for z in leaves] + [p.grad.clone() for p in dsa.parameters()]

    dsa.zero_grad()
    ref_leaves = [z.clone().requires_grad_() for z in (q, k, v)]
    scores = reference_scores(dsa, x, key_valid)  # differentiable w.r.t. the indexer
    selected = reference_selection(scores.detach(), t, 2, 1, key_valid, window)
    chosen = selected.clone()
    nb = scores.shape[1]
    chosen[:, torch.arange(nb), torch.arange(nb)] = False  # the forced (diagonal) block carries no choice
    block_bias = torch.where(chosen, scores - scores.detach(), 0.0)
    q_blocks = torch.arange(t) // BS
    bias = block_bias[:, q_blocks][:, :, q_blocks]  # (B, T, T)
    ref = reference_attention(*ref_leaves, token_mask(selected, mask), bias)
    (ref * cotangent).sum().backward()
    expected = [z.grad for z in ref_leaves] + [p.grad for p in dsa.parameters()]

    torch.testing.assert_close(out.detach(), ref.detach(), atol=ATOL, rtol=0)
    for name, g, e in zip(["q", "k", "v"] + [n for n, _ in dsa.named_parameters()], got, expected):
        assert e is not None and torch.isfinite(g).all(), name
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4, msg=name)
    assert got[0].abs().max() > 0 and dsa.index_q.weight.grad.abs().max() > 0  # the STE reaches the indexer


def test_flex_training_on_cpu_raises_config_error():
    q, k, v, x = inputs(16)
    dsa = make_dsa(topk=8, block_kernel="flex_eager").train()
    with pytest.raises(ConfigError, match="gather") as err:
        run(dsa, q, k, v, x, AttentionMask(16, 16))
    assert err.value.field == "attention_options.block_kernel"


# --- decode with the cache --------------------------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("pad,window", [(False, None), (True, None), (True, 9)])
def test_decode_with_cache_matches_full_sequence(kernel, pad, window):
    t_total, prefill = 31, 13  # prefill ends inside a block; steps cross several block starts
    q, k, v, x = inputs(t_total)
    key_valid = left_padding(t_total, pads=(0, 3)) if pad else None
    dsa = make_dsa(topk=8, block_kernel=kernel, local_blocks=1)

    def mask(q_len, k_len):
        return AttentionMask(q_len, k_len, key_valid=None if key_valid is None else key_valid[:, :k_len],
                             sliding_window=window)

    with torch.no_grad():
        full = run(dsa, q, k, v, x, mask(t_total, t_total))
        state: dict = {}
        pre = run(dsa, q[:, :, :prefill], k[:, :, :prefill], v[:, :, :prefill], x[:, :prefill],
                  mask(prefill, prefill), state)
        torch.testing.assert_close(pre, full[:, :, :prefill], atol=ATOL, rtol=0)
        t = prefill
        for step in (1, 1, 6, 1, 3, 1, 4, 1):  # single tokens, chunks shorter than a block (row kernel) and not
            end = t + step
            out = run(dsa, q[:, :, t:end], k[:, :, :end], v[:, :, :end], x[:, t:end], mask(step, end), state)
            torch.testing.assert_close(out, full[:, :, t:end], atol=ATOL, rtol=0)
            t = end
    assert t == t_total
    assert state["index_block_k"].shape == (B, t_total // BS, dsa.index_head_dim)
    assert state["index_tail_k"].shape[1] == t_total % BS
    assert state["block_selection_block"] == (t_total - 1) // BS


def test_decode_rejects_cache_out_of_step():
    q, k, v, x = inputs(12)
    dsa = make_dsa(topk=8)
    state: dict = {}
    with torch.no_grad():
        run(dsa, q[:, :, :6], k[:, :, :6], v[:, :, :6], x[:, :6], AttentionMask(6, 6), state)
        with pytest.raises(ValueError, match="cache_state"):
            run(dsa, q[:, :, 8:9], k[:, :, :9], v[:, :, :9], x[:, 8:9], AttentionMask(1, 9), state)
        with pytest.raises(ValueError, match="cache_state"):
            run(dsa, q[:, :, 8:9], k[:, :, :9], v[:, :, :9], x[:, 8:9], AttentionMask(1, 9), None)


# --- padding, determinism, ties -----------------------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS)
def test_padding_is_ignored(kernel):
    t = 26
    q, k, v, x = inputs(t)
    mask = AttentionMask(t, t, key_valid=left_padding(t, pads=(0, 6)))
    dsa = make_dsa(topk=8, block_kernel=kernel)
    k2, v2, x2 = k.clone(), v.clone(), x.clone()
    k2[1, :, :6] += 5.0
    v2[1, :, :6] += 5.0
    x2[1, :6] += 5.0
    with torch.no_grad():
        out, out2 = run(dsa, q, k, v, x, mask), run(dsa, q, k2, v2, x2, mask)
    torch.testing.assert_close(out2, out, atol=ATOL, rtol=0)
    assert out[1, :, :6].abs().max() == 0 and torch.isfinite(out).all()


def test_future_tokens_do_not_change_past_outputs():
    t = 30
    q, k, v, x = inputs(t)
    q2, k2, v2, x2 = (z.clone() for z in (q, k, v, x))
    for z in (q2, k2, v2):
        z[:, :, 14:] += 5.0 * torch.randn_like(z[:, :, 14:])
    x2[:, 14:] += 5.0 * torch.randn_like(x2[:, 14:])  # 14 is inside block 3: its anchor (12) is earlier
    dsa = make_dsa(topk=8)
    with torch.no_grad():
        out, out2 = run(dsa, q, k, v, x, AttentionMask(t, t)), run(dsa, q2, k2, v2, x2, AttentionMask(t, t))
    torch.testing.assert_close(out2[:, :, :14], out[:, :, :14], atol=ATOL, rtol=0)


def test_deterministic_and_ties_break_towards_earlier_blocks():
    t = 40
    q, k, v, x = inputs(t)
    dsa = make_dsa(topk=12, local_blocks=1)
    with torch.no_grad():
        a, b = run(dsa, q, k, v, x, AttentionMask(t, t)), run(dsa, q, k, v, x, AttentionMask(t, t))
        assert torch.equal(a, b)
        dsa.index_q.weight.zero_()  # every score is exactly 0: pure ties
        _, scores, *_, indices, valid, _ = dsa.block_selection(x, AttentionMask(t, t))
    assert scores.abs().max() == 0
    for qb in range(2, 10):
        assert indices[0, qb][valid[0, qb]].tolist() == [0, 1, qb]


# --- indexer loss -----------------------------------------------------------------------------


def reference_block_loss(q, k, scores, mask, n_blocks, local_blocks):
    """KL over selectable blocks from eager probabilities summed over heads and block rows."""
    allowed = mask.to_bool("cpu")
    kr = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    probs = (q @ kr.transpose(-1, -2) * SCALE).masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    probs = probs.sum(1)  # (B, T, T)
    losses = []
    for b in range(q.shape[0]):
        for qb in range(n_blocks):
            mass = torch.stack([probs[b, qb * BS:(qb + 1) * BS, j * BS:(j + 1) * BS].sum() for j in range(n_blocks)])
            selectable = [j for j in range(n_blocks)
                          if j <= qb - local_blocks and allowed[min(b, allowed.shape[0] - 1), 0, :, j * BS:(j + 1) * BS].any()]
            if not selectable or mass[selectable].sum() == 0:
                continue
            target = mass[selectable] / mass[selectable].sum()
            log_pred = scores[b, qb, selectable].log_softmax(-1)
            losses.append(torch.nn.functional.kl_div(log_pred, target, reduction="sum"))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("dense_warmup", [True, False])
def test_block_indexer_loss_matches_reference_and_decreases(dense_warmup):
    t = 32
    q, k, v, x = inputs(t)
    mask = AttentionMask(t, t, key_valid=left_padding(t))
    dsa = make_dsa(topk=8).train()
    dsa.compute_indexer_loss, dsa.dense_warmup = True, dense_warmup
    out = run(dsa, q, k, v, x, mask)
    if dense_warmup:
        torch.testing.assert_close(out.detach(), eager_attention(q, k, v, mask.to_bool("cpu"), SCALE), atol=ATOL, rtol=0)
    with torch.no_grad():
        ref = reference_block_loss(q, k, reference_scores(dsa, x, mask.key_valid), mask, t // BS, 1)
    torch.testing.assert_close(dsa.indexer_loss.detach(), ref, atol=1e-5, rtol=1e-5)

    q, k, x = q.requires_grad_(), k.requires_grad_(), x.requires_grad_()
    opt = torch.optim.SGD([p for n, p in dsa.named_parameters() if n.startswith("index_")], lr=2.0)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        run(dsa, q, k, v, x, mask)
        dsa.indexer_loss.backward()
        losses.append(dsa.indexer_loss.item())
        opt.step()
    assert losses[-1] < 0.8 * losses[0], losses
    assert q.grad is None and k.grad is None and x.grad is None


# --- kernels directly ---------------------------------------------------------------------------


def test_kernels_agree_on_a_chunked_offset_call():
    """The gather kernel's chunk loop (tiny CHUNK_ELEMENTS) and flex, for a chunk at an offset."""
    t, offset = 45, 6
    q, k, v, _ = inputs(t)
    q = q[:, :, offset:]
    g = torch.Generator().manual_seed(3)
    nq = bsa.num_blocks(t, BS) - offset // BS
    q_blocks = torch.arange(offset // BS, offset // BS + nq)
    counts = torch.full((B, bsa.num_blocks(t, BS)), BS)
    allowed = bsa.allowed_blocks(q_blocks, counts, BS)
    forced = bsa.forced_blocks(q_blocks, counts.shape[1], 1)
    indices, valid = bsa.select_blocks(torch.rand(B, nq, counts.shape[1], generator=g), allowed, forced, 4)
    mask = AttentionMask(t - offset, t)
    selected = torch.zeros(B, counts.shape[1], counts.shape[1], dtype=torch.bool)
    for b in range(B):
        for row, qb in enumerate(q_blocks.tolist()):
            selected[b, qb, indices[b, row][valid[b, row]]] = True
    ref = eager_attention(q, k, v, token_mask(selected, mask), SCALE)
    args = dict(q_offset=offset, block_size=BS, scale=SCALE)
    old = bsa.CHUNK_ELEMENTS
    bsa.CHUNK_ELEMENTS = 1  # one query block per chunk
    try:
        with torch.no_grad():
            fast = bsa.gather_block_attention(q, k, v, indices, valid, **args)
        masked = bsa.gather_block_attention(q.requires_grad_(), k, v, indices, valid, **args)
    finally:
        bsa.CHUNK_ELEMENTS = old
    with torch.no_grad():
        flex = bsa.flex_block_attention(q, k, v, indices, valid, compiled=False, **args)
    for got in (fast, masked.detach(), flex):
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    # A caller's selection with a missing diagonal block: the gather kernel must not assume one.
    valid[:, -1, -1] = False
    selected[:, q_blocks[-1], q_blocks[-1]] = False
    ref = eager_attention(q, k, v, token_mask(selected, mask), SCALE)
    with torch.no_grad():
        got = bsa.gather_block_attention(q, k, v, indices, valid, **args)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_bucket_length_bounds_shapes_and_padding():
    assert bsa.bucket_length(1, 64) == 64
    assert bsa.bucket_length(8192, 64) == 8192
    lengths = {bsa.bucket_length(n, 64) for n in range(4097, 8193)}
    assert len(lengths) == 8 and all(n % 64 == 0 for n in lengths)
    assert all(bsa.bucket_length(n, 64) - n < n / 8 + 64 for n in range(1, 20000, 37))


# --- options, model and recipe ------------------------------------------------------------------


@pytest.mark.parametrize(
    "options,field",
    [
        ({"block_size": 0}, "block_size"),
        ({"block_size": 4, "local_window": 2}, "local_window"),
        ({"block_size": 4, "topk": 8, "local_blocks": 3}, "local_blocks"),
        ({"block_size": 4, "block_kernel": "triton"}, "block_kernel"),
        ({"local_blocks": 2}, "local_blocks"),
        ({"block_kernel": "gather"}, "block_kernel"),
    ],
)
def test_bad_block_options_raise_config_error(options, field):
    with pytest.raises(ConfigError, match="accepted") as err:
        DynamicSparseAttention(AttentionSpec(C, H, 2, D, D, options))
    assert err.value.field == f"attention_options.{field}"


def test_model_block_mode_decode_matches_full_forward_and_trains():
    from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig.from_name(
        "tiny", vocab_size=64, max_position_embeddings=128, attention_backend="dsa",
        attention_options={"topk": 16, "block_size": 8}))
    model.init_weights()
    model.eval()
    ids = torch.randint(0, 64, (1, 45))
    with torch.no_grad():
        full = model(ids).logits
        cache = model(ids[:, :21], use_cache=True).past_key_values
        for t in range(21, 45):
            step = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits[:, -1]
            assert (step - full[:, t]).abs().max().item() < 1e-4
    model.train()
    for module in model.modules():
        if isinstance(module, DynamicSparseAttention):
            module.compute_indexer_loss = True
    out = model(ids, labels=ids)
    (out.loss + out.aux_loss).backward()
    index_grads = [p.grad for n, p in model.named_parameters() if "index_q" in n]
    assert index_grads and all(g is not None and g.abs().max() > 0 for g in index_grads)


def test_train_recipe_passes_block_size():
    from seekdeep.recipes.train import TrainConfig, build_model

    tokenizer = SimpleNamespace(vocab_size=300, eos_token_id=1, pad_token_id=0)
    model = build_model(TrainConfig(topk=32, block_size=8), tokenizer, torch.device("cpu"))
    inner = model.model.layers[0].self_attn.inner
    assert inner.block_size == 8 and inner.num_selected_blocks == 4
    assert "block_size" not in build_model(TrainConfig(), tokenizer, torch.device("cpu")).config.attention_options
    with pytest.raises(ConfigError):
        TrainConfig(block_size=0)
