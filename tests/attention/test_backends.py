"""Every attention backend against the eager reference, plus the DSA / gate specifics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seekdeep.attention import AttentionMask, AttentionSpec, available_backends, build_attention
from seekdeep.attention.dense import eager_attention, sdpa_attention
from seekdeep.attention.dsa import DynamicSparseAttention, select_topk
from seekdeep.attention.gated import GatedAttention
from seekdeep.errors import ConfigError, UnknownBackendError

B, H, D, C = 2, 4, 8, 32
SCALE = D**-0.5
ATOL = 1e-5


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # backend parameters are drawn from the global generator


def spec(num_kv_heads: int = 2, **options) -> AttentionSpec:
    return AttentionSpec(
        hidden_size=C, num_heads=H, num_kv_heads=num_kv_heads, head_dim=D, v_head_dim=D, options=options
    )


def inputs(tq: int = 10, tk: int = 10, hkv: int = 2, seed: int = 0):
    """q (B, H, Tq, D), k / v (B, Hkv, Tk, D), hidden states (B, Tk, C) for every key slot."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, tq, D, generator=g)
    k = torch.randn(B, hkv, tk, D, generator=g)
    v = torch.randn(B, hkv, tk, D, generator=g)
    x = torch.randn(B, tk, C, generator=g)
    return q, k, v, x


def left_padding(tk: int, pads=(0, 3)) -> torch.Tensor:
    """(B, Tk) key_valid with ``pads[b]`` padded slots on the left of row b."""
    return torch.stack([torch.arange(tk) >= p for p in pads])


def eager(q, k, v, mask: AttentionMask) -> torch.Tensor:
    return eager_attention(q, k, v, mask.to_bool("cpu"), SCALE)


def run(backend, q, k, v, x, mask, cache_state=None):
    return backend(q, k, v, mask=mask, scale=SCALE, hidden_states=x, cache_state=cache_state)


def nudge_gate(gated: GatedAttention) -> GatedAttention:
    """Give the zero-initialised gate real values so its tests are not trivially satisfied."""
    with torch.no_grad():
        gated.gate_out.weight.normal_(std=1.0, generator=torch.Generator().manual_seed(7))
    return gated


# --- sdpa vs eager ------------------------------------------------------------------------

SDPA_CASES = {
    "causal_mha": dict(tq=10, tk=10, hkv=4),
    "causal_gqa": dict(tq=10, tk=10, hkv=2),
    "left_padding": dict(tq=10, tk=10, hkv=2, pad=True),
    "sliding_window": dict(tq=10, tk=10, hkv=2, window=3),
    "decode_offset": dict(tq=3, tk=10, hkv=2),
    "decode_offset_padding_window": dict(tq=3, tk=10, hkv=1, pad=True, window=4),
}


@pytest.mark.parametrize("case", SDPA_CASES.values(), ids=SDPA_CASES.keys())
def test_sdpa_matches_eager(case):
    q, k, v, _ = inputs(case["tq"], case["tk"], case["hkv"])
    key_valid = left_padding(case["tk"]) if case.get("pad") else None
    mask = AttentionMask(case["tq"], case["tk"], key_valid=key_valid, sliding_window=case.get("window"))
    ref = eager(q, k, v, mask)
    torch.testing.assert_close(sdpa_attention(q, k, v, mask, SCALE), ref, atol=ATOL, rtol=0)
    if key_valid is not None and case["tq"] == case["tk"]:
        assert ref[1, :, :3].abs().max() == 0  # fully padded query rows give 0


# --- dsa: selection and equality with dense ------------------------------------------------


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "straight_through"])
@pytest.mark.parametrize("pad,window", [(False, None), (True, None), (True, 4)])
def test_dsa_equals_eager_when_topk_covers_keys(grad, pad, window):
    q, k, v, x = inputs()
    mask = AttentionMask(10, 10, key_valid=left_padding(10) if pad else None, sliding_window=window)
    dsa = DynamicSparseAttention(spec(topk=64))
    with torch.set_grad_enabled(grad):
        out = run(dsa, q, k, v, x, mask)
    torch.testing.assert_close(out, eager(q, k, v, mask), atol=ATOL, rtol=0)


def test_dsa_selection_path_equals_eager_when_window_bounds_keys():
    # topk < Tk, so the selection path runs, but no row has more than topk allowed keys.
    q, k, v, x = inputs()
    mask = AttentionMask(10, 10, sliding_window=4)
    dsa = DynamicSparseAttention(spec(topk=4))
    with torch.no_grad():
        torch.testing.assert_close(run(dsa, q, k, v, x, mask), eager(q, k, v, mask), atol=ATOL, rtol=0)


def reference_selection(scores, allowed, topk, local_window, q_offset):
    """Per-row python selection: allowed local keys first, then the best-scoring allowed keys."""
    b_n, tq, tk = scores.shape
    selected = torch.zeros(b_n, tq, tk, dtype=torch.bool)
    for b in range(b_n):
        for t in range(tq):
            slot = q_offset + t
            keys = [s for s in range(tk) if allowed[min(b, allowed.shape[0] - 1), t, s]]
            local = [s for s in keys if slot - local_window < s <= slot]
            rest = sorted((s for s in keys if s not in local), key=lambda s: -scores[b, t, s].item())
            for s in (local + rest)[: min(topk, tk)]:
                selected[b, t, s] = True
    return selected


@pytest.mark.parametrize("topk,local_window", [(9, 1), (3, 1), (3, 2), (3, 3)])
@pytest.mark.parametrize("pad", [False, True])
def test_dsa_selection_matches_independent_reference(topk, local_window, pad):
    q, k, v, x = inputs()
    mask = AttentionMask(10, 10, key_valid=left_padding(10) if pad else None)
    # 16 ReLU index heads: a key whose dots are all negative (score exactly 0, a tie) is rare.
    dsa = DynamicSparseAttention(spec(topk=topk, local_window=local_window, index_heads=16))
    allowed = mask.to_bool("cpu")[:, 0]  # (B or 1, Tq, Tk)
    with torch.no_grad():
        scores = dsa.index_scores(x, None)
        out = run(dsa, q, k, v, x, mask)
    ref_sel = reference_selection(scores, allowed, topk, local_window, mask.q_offset)
    for row, keys in zip(scores.flatten(0, 1), allowed.expand_as(scores).flatten(0, 1)):
        assert row[keys].unique().numel() == keys.sum()  # no ties: the selection is unique

    indices, valid = select_topk(scores, allowed, topk, local_window=local_window, q_offset=0)
    assert indices.shape == valid.shape == (B, 10, min(topk, 10))
    got_sel = torch.zeros_like(ref_sel).scatter(-1, indices, valid)
    assert torch.equal(got_sel, ref_sel)
    assert valid.sum(-1).tolist() == ref_sel.sum(-1).tolist()  # short rows: only allowed keys

    ref = eager_attention(q, k, v, (allowed & ref_sel)[:, None], SCALE)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    dsa.train()
    torch.testing.assert_close(run(dsa, q, k, v, x, mask), ref, atol=ATOL, rtol=0)  # STE: same value
    if topk <= 3:
        assert (out - eager(q, k, v, mask)).abs().max() > 1e-3  # sparsity really changed something


# --- all backends: causality and padding ---------------------------------------------------


def make_backend(name: str):
    backend = build_attention(name, spec(topk=3, local_window=2))
    return nudge_gate(backend) if name == "gated" else backend


@pytest.mark.parametrize("name", ["eager", "sdpa", "dsa", "gated"])
def test_future_tokens_do_not_change_past_outputs(name):
    backend = make_backend(name)
    q, k, v, x = inputs()
    q2, k2, v2, x2 = (t.clone() for t in (q, k, v, x))
    for t in (q2, k2, v2):
        t[:, :, 6:] += 5.0 * torch.randn_like(t[:, :, 6:])
    x2[:, 6:] += 5.0 * torch.randn_like(x2[:, 6:])
    mask = AttentionMask(10, 10)
    with torch.no_grad():
        out, out2 = run(backend, q, k, v, x, mask), run(backend, q2, k2, v2, x2, mask)
    torch.testing.assert_close(out2[:, :, :6], out[:, :, :6], atol=ATOL, rtol=0)
    assert (out2[:, :, 6:] - out[:, :, 6:]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["eager", "sdpa", "dsa", "gated"])
def test_padding_is_ignored(name):
    backend = make_backend(name)
    q, k, v, x = inputs()
    key_valid = left_padding(10, pads=(0, 3))
    mask = AttentionMask(10, 10, key_valid=key_valid)
    k2, v2, x2 = k.clone(), v.clone(), x.clone()
    k2[1, :, :3] += 5.0
    v2[1, :, :3] += 5.0
    x2[1, :3] += 5.0
    with torch.no_grad():
        out, out2 = run(backend, q, k, v, x, mask), run(backend, q, k2, v2, x2, mask)
    torch.testing.assert_close(out2, out, atol=ATOL, rtol=0)
    assert out[1, :, :3].abs().max() == 0  # padded queries see no key
    assert torch.isfinite(out).all()


# --- dsa: decode with cache, gradients, indexer loss ---------------------------------------


def test_dsa_decode_with_cache_matches_full_sequence():
    t_total, prefill = 12, 5
    q, k, v, x = inputs(t_total, t_total)
    key_valid = left_padding(t_total, pads=(0, 2))
    dsa = DynamicSparseAttention(spec(topk=3, local_window=2, index_heads=16, index_head_dim=16))
    with torch.no_grad():
        full = run(dsa, q, k, v, x, AttentionMask(t_total, t_total, key_valid=key_valid))
        state: dict = {}
        mask = AttentionMask(prefill, prefill, key_valid=key_valid[:, :prefill])
        pre = run(dsa, q[:, :, :prefill], k[:, :, :prefill], v[:, :, :prefill], x[:, :prefill], mask, state)
        torch.testing.assert_close(pre, full[:, :, :prefill], atol=ATOL, rtol=0)
        for t in range(prefill, t_total):
            mask = AttentionMask(1, t + 1, key_valid=key_valid[:, : t + 1])
            step = run(dsa, q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], x[:, t : t + 1], mask, state)
            torch.testing.assert_close(step, full[:, :, t : t + 1], atol=ATOL, rtol=0)
    assert state["index_k"].shape == (B, t_total, 16)


def test_dsa_rejects_index_cache_out_of_step():
    q, k, v, x = inputs(1, 6)
    dsa = DynamicSparseAttention(spec(topk=3))
    state = {"index_k": torch.zeros(B, 2, 32)}  # 2 cached + 1 new index keys, but Tk = 6
    with pytest.raises(ValueError, match="index_k"):
        run(dsa, q, k, v, x[:, -1:], AttentionMask(1, 6), state)


def test_dsa_straight_through_trains_indexer():
    q, k, v, x = inputs()
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    dsa = DynamicSparseAttention(spec(topk=3)).train()
    mask = AttentionMask(10, 10, key_valid=left_padding(10))
    out = run(dsa, q, k, v, x, mask)
    (out * torch.randn_like(out)).sum().backward()
    for name in ("index_q.weight", "index_k.weight", "index_weights.weight", "index_k_norm.weight"):
        grad = dsa.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().max() > 0, name
    assert all(torch.isfinite(t.grad).all() and t.grad.abs().max() > 0 for t in (q, k, v))


def reference_indexer_loss(q, k, scores, allowed):
    """KL over allowed keys, computed with F.kl_div from the eager attention probabilities."""
    kr = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    probs = (q @ kr.transpose(-1, -2) * SCALE).masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
    target = probs.nan_to_num(0.0).sum(1)
    target = target / target.sum(-1, keepdim=True)
    losses = []
    for b in range(scores.shape[0]):
        for t in range(scores.shape[1]):
            keys = allowed[min(b, allowed.shape[0] - 1), t]
            if keys.any():
                log_pred = scores[b, t, keys].log_softmax(-1)
                losses.append(F.kl_div(log_pred, target[b, t, keys], reduction="sum"))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("dense_warmup", [True, False])
def test_indexer_loss_matches_reference_and_decreases(dense_warmup):
    q, k, v, x = inputs()
    mask = AttentionMask(10, 10, key_valid=left_padding(10))
    dsa = DynamicSparseAttention(spec(topk=3)).train()
    dsa.compute_indexer_loss, dsa.dense_warmup = True, dense_warmup
    out = run(dsa, q, k, v, x, mask)
    if dense_warmup:
        torch.testing.assert_close(out.detach(), eager(q, k, v, mask), atol=ATOL, rtol=0)
    with torch.no_grad():
        ref = reference_indexer_loss(q, k, dsa.index_scores(x, None), mask.to_bool("cpu")[:, 0])
    torch.testing.assert_close(dsa.indexer_loss.detach(), ref, atol=1e-5, rtol=1e-5)

    q, k, x = q.requires_grad_(), k.requires_grad_(), x.requires_grad_()
    indexer_params = [p for n, p in dsa.named_parameters() if n.startswith("index_")]
    opt = torch.optim.SGD(indexer_params, lr=2.0)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        run(dsa, q, k, v, x, mask)
        loss = dsa.indexer_loss
        assert torch.isfinite(loss) and loss >= 0
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert losses[-1] < 0.8 * losses[0], losses
    assert q.grad is None and k.grad is None and x.grad is None  # target and trunk stay detached


def test_indexer_loss_is_off_by_default():
    q, k, v, x = inputs()
    dsa = DynamicSparseAttention(spec(topk=3))
    run(dsa, q, k, v, x, AttentionMask(10, 10))
    assert dsa.indexer_loss is None


# --- gated ---------------------------------------------------------------------------------


def test_gated_at_init_equals_sdpa():
    q, k, v, x = inputs()
    mask = AttentionMask(10, 10, key_valid=left_padding(10), sliding_window=5)
    gated = GatedAttention(spec())
    assert torch.equal(gated.gate(x), torch.ones(B, 10, H))
    torch.testing.assert_close(run(gated, q, k, v, x, mask), sdpa_attention(q, k, v, mask, SCALE), atol=0, rtol=0)


def test_gated_gradients_reach_gate_params():
    q, k, v, x = inputs()
    gated = GatedAttention(spec())
    out = run(gated, q, k, v, x, AttentionMask(10, 10))
    (out * torch.randn_like(out)).sum().backward()
    assert gated.gate_out.weight.grad.abs().max() > 0 and gated.gate_out.bias.grad.abs().max() > 0
    gated.zero_grad()
    nudge_gate(gated)
    out = run(gated, q, k, v, x, AttentionMask(10, 10))
    assert (out - sdpa_attention(q, k, v, AttentionMask(10, 10), SCALE)).abs().max() > 1e-3
    (out * torch.randn_like(out)).sum().backward()
    assert gated.gate_proj.weight.grad.abs().max() > 0 and torch.isfinite(gated.gate_proj.weight.grad).all()


# --- registry, options, meta-device materialisation ----------------------------------------


def test_unknown_backend_names_accepted_ones():
    assert {"eager", "sdpa", "dsa", "gated"} <= set(available_backends())
    with pytest.raises(UnknownBackendError) as err:
        build_attention("flashy", spec())
    for name in ("eager", "sdpa", "dsa", "gated", "flashy"):
        assert name in str(err.value)


@pytest.mark.parametrize(
    "options,field",
    [
        ({"topk": 0}, "topk"),
        ({"topk": "8"}, "topk"),
        ({"topk": True}, "topk"),
        ({"index_heads": -1}, "index_heads"),
        ({"index_head_dim": 2.5}, "index_head_dim"),
        ({"local_window": 0}, "local_window"),
        ({"topk": 2, "local_window": 3}, "local_window"),
    ],
)
def test_bad_dsa_options_raise_config_error(options, field):
    with pytest.raises(ConfigError, match="accepted") as err:
        build_attention("dsa", spec(**options))
    assert err.value.field == f"attention_options.{field}"


def test_bad_gate_hidden_raises_config_error():
    with pytest.raises(ConfigError) as err:
        GatedAttention(spec(gate_hidden=0))
    assert err.value.field == "attention_options.gate_hidden"


@pytest.mark.parametrize("name", ["dsa", "gated"])
def test_meta_construction_then_reset_parameters(name):
    with torch.device("meta"):
        backend = build_attention(name, spec(topk=3))
    backend.to_empty(device="cpu")
    backend.reset_parameters()
    assert all(torch.isfinite(p).all() for p in backend.parameters())
    q, k, v, x = inputs()
    with torch.no_grad():
        out = run(backend, q, k, v, x, AttentionMask(10, 10))
    assert torch.isfinite(out).all()
    if name == "gated":
        torch.testing.assert_close(out, eager(q, k, v, AttentionMask(10, 10)), atol=ATOL, rtol=0)


def test_dsa_model_decode_matches_full_forward_with_default_indexer():
    """Regression: with 4 index heads many ReLU'd scores are exactly 0; ties must break the
    same way in a prefill and in a decode step."""
    from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.from_name("tiny", vocab_size=64, max_position_embeddings=128,
                                                   attention_backend="dsa", attention_options={"topk": 4}))
    model.init_weights()
    model.eval()
    ids = torch.randint(0, 64, (1, 20))
    with torch.no_grad():
        full = model(ids).logits
        cache = model(ids[:, :12], use_cache=True).past_key_values
        for t in range(12, 20):
            step = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits[:, -1]
            assert (step - full[:, t]).abs().max().item() < 1e-4


# --- dsa local window ----------------------------------------------------------------------


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "straight_through"])
@pytest.mark.parametrize("pad", [False, True])
def test_dsa_local_window_filling_topk_is_sliding_window_attention(grad, pad):
    # local_window == topk < Tk: the indexer has no say, every query keeps exactly its last topk slots.
    q, k, v, x = inputs(tq=12, tk=12)
    key_valid = left_padding(12) if pad else None
    dsa = DynamicSparseAttention(spec(topk=4, local_window=4))
    dsa.train(grad)
    with torch.set_grad_enabled(grad):
        out = run(dsa, q, k, v, x, AttentionMask(12, 12, key_valid=key_valid))
    expected = eager(q, k, v, AttentionMask(12, 12, key_valid=key_valid, sliding_window=4))
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)


def test_dsa_local_window_is_kept_whatever_the_indexer_prefers():
    q, k, v, x = inputs(tq=16, tk=16)
    dsa = DynamicSparseAttention(spec(topk=6, local_window=3, index_heads=16))
    allowed = AttentionMask(16, 16).to_bool("cpu")[:, 0]
    with torch.no_grad():
        scores = dsa.index_scores(x, None)
    # Make the local keys the indexer's worst choices: they must still be selected.
    slots = torch.arange(16)
    local = (slots[None, :] <= slots[:, None]) & (slots[:, None] - slots[None, :] < 3)  # (Tq, Tk)
    scores = scores.masked_fill(local, -1e9)
    indices, valid = select_topk(scores, allowed, 6, local_window=3)
    selected = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, indices, valid)
    assert bool((selected | ~local).all())
    assert selected.sum(-1).tolist() == [[min(t + 1, 6) for t in range(16)]] * B
    # The rest of the budget goes to the best-scoring older keys.
    older = allowed & ~local
    best_older = scores.masked_fill(~older, float("-inf")).topk(3, dim=-1).indices[:, 8:]  # rows with >= 3 older keys
    assert bool(selected[:, 8:].gather(-1, best_older).all())


def test_train_recipe_passes_local_window():
    from types import SimpleNamespace

    from seekdeep.recipes.train import TrainConfig, build_model

    tokenizer = SimpleNamespace(vocab_size=300, eos_token_id=1, pad_token_id=0)

    def options(**kwargs):
        return build_model(TrainConfig(**kwargs), tokenizer, torch.device("cpu")).config.attention_options

    token = build_model(TrainConfig(topk=32, local_window=8), tokenizer, torch.device("cpu"))
    assert token.model.layers[0].self_attn.inner.local_window == 8
    assert token.config.attention_options == {"topk": 32, "local_window": 8, "distance_bias": 256}
    assert options(topk=32, distance_bias=0) == {"topk": 32, "local_window": 16}  # default: half the budget
    assert options(topk=1, distance_bias=0) == {"topk": 1}  # the backend's own default (its own slot) stays implicit
    block = build_model(TrainConfig(topk=64, block_size=16, local_window=20), tokenizer, torch.device("cpu"))
    assert block.model.layers[0].self_attn.inner.local_blocks == 2  # the blocks holding the last 20 slots
    assert options(topk=64, block_size=16) == {"topk": 64, "block_size": 16, "local_blocks": 2}
    assert options(topk=64, block_size=16, local_window=16) == {"topk": 64, "block_size": 16}
    assert options(topk=20, block_size=16, local_window=20)["local_blocks"] == 2  # capped at the selected blocks
    for bad in (17, 0, True):
        with pytest.raises(ConfigError, match="local_window"):
            TrainConfig(topk=16, local_window=bad)


# --- dsa distance bias (a learned indexer score per query-key distance) ----------------------


def test_dsa_distance_bias_adds_one_score_per_distance():
    q, k, v, x = inputs(tq=10, tk=10)
    torch.manual_seed(0)
    plain = DynamicSparseAttention(spec(topk=3))
    torch.manual_seed(0)
    biased = DynamicSparseAttention(spec(topk=3, distance_bias=4))
    with torch.no_grad():
        assert torch.equal(biased.index_scores(x, None), plain.index_scores(x, None))  # zero init: no change
        biased.index_distance.copy_(torch.tensor([0.5, -1.0, 2.0, 3.0]))
        got = biased.index_scores(x, None) - plain.index_scores(x, None)  # (B, Tq, Tk)
    slots = torch.arange(10)
    distance = (slots[:, None] - slots[None, :]).clamp(0, 3)  # farther keys share the last entry
    torch.testing.assert_close(got, biased.index_distance[distance].expand(B, -1, -1))


def test_dsa_distance_bias_steers_selection_to_a_distance():
    q, k, v, x = inputs(tq=16, tk=16)
    dsa = DynamicSparseAttention(spec(topk=2, local_window=1, distance_bias=16))
    with torch.no_grad():
        dsa.index_distance[7] = 1e4  # every query with 7 earlier keys must pick the key 7 slots back
        allowed = AttentionMask(16, 16).to_bool("cpu")[:, 0]
        indices, valid = select_topk(dsa.index_scores(x, None), allowed, 2, local_window=1)
    picked = torch.zeros(B, 16, 16, dtype=torch.bool).scatter(-1, indices, valid)
    rows = torch.arange(7, 16)
    assert bool(picked[:, rows, rows - 7].all())


def test_dsa_distance_bias_decode_matches_full_sequence():
    t_total, prefill = 12, 5
    q, k, v, x = inputs(t_total, t_total)
    dsa = DynamicSparseAttention(spec(topk=3, local_window=1, distance_bias=6))
    with torch.no_grad():
        dsa.index_distance.normal_(std=5.0, generator=torch.Generator().manual_seed(3))
        full = run(dsa, q, k, v, x, AttentionMask(t_total, t_total))
        state: dict = {}
        run(dsa, q[:, :, :prefill], k[:, :, :prefill], v[:, :, :prefill], x[:, :prefill],
            AttentionMask(prefill, prefill), state)
        for t in range(prefill, t_total):
            step = run(dsa, q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], x[:, t : t + 1],
                       AttentionMask(1, t + 1), state)
            torch.testing.assert_close(step, full[:, :, t : t + 1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("options", [{"distance_bias": -1}, {"distance_bias": True}, {"distance_bias": 1.5},
                                     {"distance_bias": 8, "block_size": 4}])
def test_bad_distance_bias_raises_config_error(options):
    with pytest.raises(ConfigError, match="accepted") as err:
        build_attention("dsa", spec(**options))
    assert err.value.field == "attention_options.distance_bias"


def test_train_recipe_passes_distance_bias():
    from types import SimpleNamespace

    from seekdeep.recipes.train import TrainConfig, build_model

    tokenizer = SimpleNamespace(vocab_size=300, eos_token_id=1, pad_token_id=0)
    model = build_model(TrainConfig(topk=32, distance_bias=64), tokenizer, torch.device("cpu"))
    assert model.config.attention_options == {"topk": 32, "local_window": 16, "distance_bias": 64}
    assert model.model.layers[0].self_attn.inner.index_distance.shape == (64,)
    default = build_model(TrainConfig(topk=32, seq_len=128), tokenizer, torch.device("cpu"))
    assert default.config.attention_options["distance_bias"] == 128  # default: every distance of a sequence
    off = build_model(TrainConfig(topk=32, distance_bias=0), tokenizer, torch.device("cpu"))
    assert "distance_bias" not in off.config.attention_options
    assert off.model.layers[0].self_attn.inner.index_distance is None
    assert TrainConfig(topk=64, block_size=16).dsa_distance_bias == 0  # block mode: none
    for bad in (-1, True):
        with pytest.raises(ConfigError, match="distance_bias"):
            TrainConfig(distance_bias=bad)
    with pytest.raises(ConfigError, match="distance_bias"):
        TrainConfig(distance_bias=8, block_size=16)
