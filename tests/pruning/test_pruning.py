"""Structured pruning: exactness against masking, what the scores choose, sizes and the
report, save / load, generation and transformers parity of the pruned model."""

from __future__ import annotations

import copy

import pytest
import torch
from prune_helpers import VARIANTS, VOCAB, logits, tiny_model, token_batches

import seekdeep
from seekdeep.pruning import (PruneConfig, closest_head_layout, count_parameters, prune, prune_model, score_heads,
                              score_mlp_channels, select_channels, select_heads)


def _random_keep(model, seed: int = 3):
    """Per layer, random channels (a third removed) and heads: one KV group with its heads and
    one query head of every other group removed (the same layout in every layer)."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    per_group = c.num_attention_heads // c.num_key_value_heads
    keep_groups = max(1, c.num_key_value_heads - 1)
    keep_per_group = max(1, per_group - 1)
    channels, heads = [], []
    for _ in range(c.num_hidden_layers):
        channels.append(torch.randperm(c.intermediate_size, generator=g)[: 2 * c.intermediate_size // 3])
        groups = torch.randperm(c.num_key_value_heads, generator=g)[:keep_groups]
        heads.append(torch.cat([grp * per_group + torch.randperm(per_group, generator=g)[:keep_per_group]
                                for grp in groups]))
    return channels, heads


@torch.no_grad()
def _masked(model, keep_channels, keep_heads):
    """A copy of ``model`` whose removed channels / heads write nothing: their down_proj /
    o_proj columns are zero (the removed KV groups then have no query head reading them)."""
    masked = copy.deepcopy(model)
    d = model.config.head_dim
    for layer, channels, heads in zip(masked.model.layers, keep_channels, keep_heads):
        drop = torch.ones(model.config.intermediate_size, dtype=torch.bool)
        drop[channels] = False
        layer.mlp.down_proj.weight[:, drop] = 0
        drop_heads = torch.ones(model.config.num_attention_heads, dtype=torch.bool)
        drop_heads[heads] = False
        layer.self_attn.o_proj.weight[:, drop_heads.repeat_interleave(d)] = 0
    return masked


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_pruned_model_equals_original_with_removed_parts_masked(variant):
    model = tiny_model(**VARIANTS[variant])
    keep_channels, keep_heads = _random_keep(model)
    pruned = prune_model(model, keep_channels, keep_heads)
    c, p = model.config, pruned.config
    per_group = c.num_attention_heads // c.num_key_value_heads
    kept_groups = (keep_heads[0] // per_group).unique().numel()
    assert p.intermediate_size == 2 * c.intermediate_size // 3
    assert p.num_attention_heads == keep_heads[0].numel()
    assert p.num_key_value_heads == kept_groups
    assert p.num_attention_heads % p.num_key_value_heads == 0
    assert p.head_dim == c.head_dim  # explicit: hidden_size // heads would give another value
    attn = pruned.model.layers[1].self_attn
    assert attn.q_proj.weight.shape == (p.num_attention_heads * c.head_dim, c.hidden_size)
    assert attn.k_proj.weight.shape == (kept_groups * c.head_dim, c.hidden_size)
    assert attn.o_proj.weight.shape == (c.hidden_size, p.num_attention_heads * c.head_dim)
    assert pruned.model.layers[0].mlp.down_proj.weight.shape == (c.hidden_size, p.intermediate_size)
    if variant == "gated":
        assert attn.inner.gate_out.weight.shape[0] == p.num_attention_heads
    assert (pruned.lm_head.weight is pruned.model.embed_tokens.weight) == c.tie_word_embeddings
    ids = token_batches(1)[0]
    torch.testing.assert_close(logits(pruned, ids), logits(_masked(model, keep_channels, keep_heads), ids),
                               atol=1e-5, rtol=1e-5)
    # and it is not trivially equal: the removed parts did contribute
    assert (logits(pruned, ids) - logits(model, ids)).abs().max() > 1e-3


@pytest.mark.parametrize("variant", ["llama-gqa-bias", "gated"])
def test_pruning_nothing_is_exact(variant):
    model = tiny_model(**VARIANTS[variant])
    c = model.config
    pruned = prune_model(model, [range(c.intermediate_size)] * 2, [range(c.num_attention_heads)] * 2)
    ids = token_batches(1)[0]
    assert torch.equal(logits(pruned, ids), logits(model, ids))
    # a ratio too small to remove a whole channel or head changes nothing either
    pruned, report = prune(model, PruneConfig(ratio=0.001))
    assert report.prunable_params_after == report.prunable_params_before
    assert torch.equal(logits(pruned, ids), logits(model, ids))


def test_zeroed_channels_are_what_l1_removes_and_logits_do_not_move():
    model = tiny_model(**VARIANTS["mha-tied"])
    zeroed = {0: 5, 1: 17}  # layer -> channel whose weights are all zero
    with torch.no_grad():
        for i, ch in zeroed.items():
            mlp = model.model.layers[i].mlp
            mlp.gate_proj.weight[ch] = 0
            mlp.up_proj.weight[ch] = 0
            mlp.down_proj.weight[:, ch] = 0
    size = model.config.intermediate_size
    pruned, report = prune(model, PruneConfig(mlp_ratio=1 / size))
    assert pruned.config.intermediate_size == size - 1
    for i, ch in zeroed.items():
        expected = torch.cat([model.model.layers[i].mlp.down_proj.weight[:, :ch],
                              model.model.layers[i].mlp.down_proj.weight[:, ch + 1:]], dim=1)
        assert torch.equal(pruned.model.layers[i].mlp.down_proj.weight, expected)
    ids = token_batches(1)[0]
    torch.testing.assert_close(logits(pruned, ids), logits(model, ids), atol=1e-5, rtol=1e-5)
    assert report.num_attention_heads_after == report.num_attention_heads_before


def test_l1_removes_the_smallest_channels_and_heads():
    model = tiny_model(**VARIANTS["mha-tied"])
    small_channels, small_head = [3, 9, 30], 2
    d = model.config.head_dim
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight[small_channels] *= 1e-3
            layer.mlp.up_proj.weight[small_channels] *= 1e-3
            layer.mlp.down_proj.weight[:, small_channels] *= 1e-3
            rows = slice(small_head * d, (small_head + 1) * d)
            for proj in ("q_proj", "k_proj", "v_proj"):
                getattr(layer.self_attn, proj).weight[rows] *= 1e-3
            layer.self_attn.o_proj.weight[:, rows] *= 1e-3
    scores = score_mlp_channels(model, "l1")
    assert set(torch.argsort(scores[0])[:3].tolist()) == set(small_channels)
    pruned, report = prune(model, PruneConfig(mlp_ratio=3 / 48, head_ratio=0.25))
    assert report.kept_heads == [[0, 1, 3], [0, 1, 3]]
    assert pruned.config.intermediate_size == 45
    kept = pruned.model.layers[0].mlp.gate_proj.weight
    expected = model.model.layers[0].mlp.gate_proj.weight[[i for i in range(48) if i not in small_channels]]
    assert torch.equal(kept, expected)


def test_select_heads_keeps_the_best_groups_and_the_best_heads_in_each():
    scores = [torch.tensor([0.1, 0.2, 0.9, 0.3, 0.4, 0.8])]  # 3 KV groups of 2 query heads
    # best single head per group: 0.2, 0.9, 0.8 -> groups 1 and 2, heads 2 and 5
    assert select_heads(scores, 3, keep_groups=2, keep_per_group=1)[0].tolist() == [2, 5]
    # whole groups: 0.3, 1.2, 1.2 -> a tie, broken towards the lower index
    assert select_heads(scores, 3, keep_groups=1, keep_per_group=2)[0].tolist() == [2, 3]
    assert select_channels([torch.tensor([3.0, 1.0, 2.0, 1.0])], 2)[0].tolist() == [0, 2]


def test_activation_scores_see_what_l1_cannot():
    """Channel 5 has big gate / up rows but a near-zero down column: large in L1, nearly
    silent in the output. Heads 0 and 3 have big q rows but zero o columns: they write nothing."""
    model = tiny_model(attention_bias=True, mlp_bias=True)  # 4 query heads in 2 KV groups
    d = model.config.head_dim
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight[5] *= 10
            layer.mlp.up_proj.weight[5] *= 10
            layer.mlp.down_proj.weight[:, 5] *= 1e-4
            for head in (0, 3):
                layer.self_attn.q_proj.weight[head * d:(head + 1) * d] *= 10
                layer.self_attn.o_proj.weight[:, head * d:(head + 1) * d] = 0
    data = token_batches(3)
    cfg = dict(mlp_ratio=1 / 48, head_ratio=1 / 3)  # one channel; one query head per KV group
    by_l1, l1_report = prune(model, PruneConfig(method="l1", **cfg))
    by_act, act_report = prune(model, PruneConfig(method="activation", **cfg), data)
    assert act_report.kept_heads == [[1, 2], [1, 2]]
    assert l1_report.kept_heads == [[0, 3], [0, 3]]
    l1_channels = score_mlp_channels(model, "l1")
    act_channels = score_mlp_channels(model, "activation", data)
    assert int(act_channels[0].argmin()) == 5 and int(l1_channels[0].argmax()) == 5
    assert by_act.config.num_key_value_heads == 2 and by_act.config.num_attention_heads == 2
    # the removed heads wrote nothing, so only the (nearly silent) channel moves the logits
    ids = data[0]
    assert (logits(by_act, ids) - logits(model, ids)).abs().max() < 1e-3
    assert (logits(by_l1, ids) - logits(model, ids)).abs().max() > 1e-2


def test_activation_scores_match_a_direct_computation():
    model = tiny_model(**VARIANTS["qwen3-qk-norm"])
    data = token_batches(2)
    seen = {"o": [], "down": []}
    layer = model.model.layers[1]
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen["o"].append(a[0].detach())),
             layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen["down"].append(a[0].detach()))]
    with torch.no_grad():
        for ids in data:
            model(ids)
    for h in hooks:
        h.remove()
    c = model.config
    x = torch.cat([t.flatten(0, 1) for t in seen["o"]])  # (N, H * D)
    w = layer.self_attn.o_proj.weight
    per_head = torch.stack([(x[:, h * c.head_dim:(h + 1) * c.head_dim] @ w[:, h * c.head_dim:(h + 1) * c.head_dim].T)
                            .norm(dim=-1).mean() for h in range(c.num_attention_heads)])
    torch.testing.assert_close(score_heads(model, "activation", data)[1], per_head, atol=1e-5, rtol=1e-4)
    inter = torch.cat([t.flatten(0, 1) for t in seen["down"]])  # (N, I)
    expected = inter.abs().mean(0) * layer.mlp.down_proj.weight.norm(dim=0)
    torch.testing.assert_close(score_mlp_channels(model, "activation", data)[1], expected, atol=1e-6, rtol=1e-4)


def test_one_ratio_is_split_so_the_total_matches_and_the_report_counts_real_parameters():
    model = tiny_model(hidden_size=64, intermediate_size=160, num_attention_heads=8, num_key_value_heads=4)
    pruned, report = prune(model, PruneConfig(ratio=0.4))
    c = model.config
    # attention in units of 2 * hidden * head_dim: 4 groups x (2 query heads + 1 KV head) = 12;
    # keeping 60% (7.2) is closest to 4 groups of 1 query head (8), not 2 x 2 or 3 x 1 (6)
    assert (pruned.config.num_key_value_heads, pruned.config.num_attention_heads) == (4, 4)
    per_channel_total = 3 * c.hidden_size * c.num_hidden_layers
    assert abs(report.prunable_fraction_removed - 0.4) <= per_channel_total / report.prunable_params_before
    before, after = count_parameters(model), count_parameters(pruned)
    assert (report.prunable_params_before, report.prunable_params_after) == (before["prunable"], after["prunable"])
    assert report.total_params_after == sum(p.numel() for p in pruned.parameters())
    assert report.total_params_before - report.total_params_after == \
        report.prunable_params_before - report.prunable_params_after  # nothing else changed
    assert report.to_dict()["prunable_fraction_removed"] == pytest.approx(report.prunable_fraction_removed)
    assert "prunable parameters" in report.summary()

    mlp_only, r = prune(model, PruneConfig(ratio=0.25, targets=("mlp",)))
    assert mlp_only.config.intermediate_size == 120 and mlp_only.config.num_attention_heads == 8
    assert r.mlp_fraction_removed == pytest.approx(0.25)
    heads_only, r = prune(model, PruneConfig(head_ratio=0.5))
    assert heads_only.config.intermediate_size == 160 and r.attention_fraction_removed == pytest.approx(0.5)


@pytest.mark.parametrize("heads,kv,ratio,expected", [
    (8, 4, 0.5, (2, 2)),  # tie between (2 groups x 2) and (3 x 1): more query heads
    (8, 2, 0.2, (2, 3)),  # keep every KV group, one query head fewer in each
    (8, 8, 0.25, (6, 1)),  # MHA: single heads
    (8, 4, 0.75, (1, 2)),  # coarse: keep one whole group
])
def test_gqa_head_layouts_stay_valid_llama_configs(heads, kv, ratio, expected):
    model = tiny_model(hidden_size=64, num_attention_heads=heads, num_key_value_heads=kv)
    assert closest_head_layout(model.config, ratio) == expected
    pruned = PruneConfig(head_ratio=ratio).apply(model)
    assert (pruned.config.num_key_value_heads, pruned.config.num_attention_heads // pruned.config.num_key_value_heads) \
        == expected
    out = logits(pruned, token_batches(1)[0])
    assert out.shape == (2, 12, VOCAB) and torch.isfinite(out).all()


def test_original_model_is_left_alone():
    model = tiny_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = PruneConfig(ratio=0.3).apply(model)
    with torch.no_grad():
        pruned.model.embed_tokens.weight.zero_()
        pruned.model.norm.weight.zero_()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_saved_pruned_model_reloads_and_generates(tmp_path):
    model = tiny_model(**VARIANTS["qwen3-qk-norm"])
    pruned = PruneConfig(ratio=0.4, method="activation").apply(model, token_batches(2))
    pruned.save_pretrained(tmp_path)
    back = seekdeep.AutoModel.from_pretrained(tmp_path)
    assert back.config.head_dim == 12 and back.config.num_attention_heads == pruned.config.num_attention_heads
    assert back.config.intermediate_size == pruned.config.intermediate_size
    ids = token_batches(1)[0]
    torch.testing.assert_close(logits(back, ids), logits(pruned, ids), atol=0, rtol=0)
    # cached generation through the pruned KV heads equals greedy decoding without a cache
    prompt = ids[:1, :5]
    generated = back.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None)
    expected = prompt
    for _ in range(8):
        expected = torch.cat([expected, logits(back, expected)[:, -1:].argmax(-1)], dim=1)
    assert generated.tolist() == expected.tolist()


@pytest.mark.parametrize("variant", ["llama-gqa-bias", "qwen2-qkv-bias", "qwen3-qk-norm", "mha-tied"])
def test_pruned_model_loads_in_transformers_with_equal_logits(variant, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_model(**VARIANTS[variant])
    pruned = PruneConfig(ratio=0.4).apply(model)
    assert pruned.config.num_attention_heads < model.config.num_attention_heads
    pruned.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert hf.config.intermediate_size == pruned.config.intermediate_size
    assert hf.config.num_key_value_heads == pruned.config.num_key_value_heads
    ids = token_batches(1)[0]
    with torch.no_grad():
        assert (hf(ids).logits - logits(pruned, ids)).abs().max().item() <= 1e-4


def test_config_round_trips_through_json():
    cfg = PruneConfig(mlp_ratio=0.3, head_ratio=0.2, method="activation", calibration_batches=4)
    assert PruneConfig.from_dict(cfg.to_dict()) == cfg
