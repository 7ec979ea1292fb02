"""Mixed precision: measured per-layer sensitivity, a greedy assignment that respects the
size budget, and the resulting model's size and quality."""

from __future__ import annotations

import pytest
import torch

from quant_helpers import tiny_llama, token_batches
from seekdeep.errors import ConfigError
from seekdeep.quantization import (Bf16Linear, Int4WeightOnlyLinear, Int8WeightOnlyLinear, assign_bits, layer_bytes,
                                   layer_sensitivity, mean_loss, mixed_precision_config, model_size_bytes)


@pytest.fixture(scope="module")
def sensitivity():
    return layer_sensitivity(tiny_llama(), token_batches(1), bits=(4, 8, 16), group_size=32)


def test_sensitivity_is_measured_per_layer_and_restores_the_weights(sensitivity):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    again = layer_sensitivity(model, token_batches(1), bits=(4,), group_size=32, skip=["*.k_proj"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "model.layers.0.self_attn.k_proj" not in again and "lm_head" in again
    assert len(sensitivity) == 16  # 14 block linears + embedding + head
    for name, per_bits in sensitivity.items():
        assert set(per_bits) == {4, 8, 16}
        # fewer bits move the loss more (either way on a random model)
        assert abs(per_bits[4]) + 1e-3 > abs(per_bits[8]) and abs(per_bits[16]) < 1e-3, name
        assert again.get(name, {4: per_bits[4]})[4] == pytest.approx(per_bits[4], abs=1e-6)


def test_layer_bytes_match_the_real_modules():
    linear = tiny_llama().model.layers[0].mlp.down_proj  # 384 -> 128
    assert layer_bytes(linear, 16) == 384 * 128 * 2
    assert layer_bytes(linear, 8) == 384 * 128 + 128 * 2  # int8 + bf16 scales
    assert layer_bytes(linear, 4, group_size=32) == 384 * 128 // 2 + (384 // 32) * 128 * 2 * 2


def test_assign_bits_is_a_knapsack_within_budget():
    sens = {"a": {4: 1.0, 8: 0.1, 16: 0.0}, "b": {4: 0.05, 8: 0.01, 16: 0.0}, "c": {4: 0.5, 8: 0.4, 16: 0.0}}
    sizes = {name: {4: 10, 8: 20, 16: 40} for name in sens}
    assert assign_bits(sens, sizes, budget_bytes=30) == {"a": 4, "b": 4, "c": 4}
    assert assign_bits(sens, sizes, budget_bytes=40) == {"a": 8, "b": 4, "c": 4}  # best gain per byte first
    assert assign_bits(sens, sizes, budget_bytes=1000) == {"a": 16, "b": 16, "c": 16}
    for budget in (30, 45, 60, 75, 90, 120):
        chosen = assign_bits(sens, sizes, budget_bytes=budget, fixed_bytes=0)
        assert sum(sizes[n][b] for n, b in chosen.items()) <= budget
    with pytest.raises(ConfigError, match="budget"):
        assign_bits(sens, sizes, budget_bytes=29)


@pytest.mark.parametrize("budget", ["smallest", 0.3, 0.45])
def test_mixed_model_respects_the_budget(sensitivity, budget):
    model = tiny_llama()
    float_bytes = model_size_bytes(model)
    sizes = {name: {b: layer_bytes(model.get_submodule(name), b, 32) for b in (4, 8, 16)} for name in sensitivity}
    fixed = float_bytes - sum(4 * model.get_submodule(name).weight.numel() for name in sensitivity)
    if budget == "smallest":  # room for every layer at 4 bits and not one upgrade
        budget = (fixed + sum(s[4] for s in sizes.values()) + 100) / float_bytes
    cfg = mixed_precision_config(model, token_batches(1), budget=budget, group_size=32, sensitivity=sensitivity)
    assert cfg.layer_bits == assign_bits(sensitivity, sizes, budget * float_bytes, fixed)
    chosen = set(cfg.layer_bits.values())
    assert (chosen == {4}) == (budget < 0.2)  # a larger budget buys upgrades
    cfg.apply(model)
    assert model_size_bytes(model) <= budget * float_bytes
    kinds = {type(m) for m in model.modules()}
    assert (Int4WeightOnlyLinear in kinds) == (4 in chosen) and (Bf16Linear in kinds) == (16 in chosen)
    assert (Int8WeightOnlyLinear in kinds) == (8 in chosen)
    assert mean_loss(model, token_batches(1)) < 10  # runs, and is still a language model over 96 tokens


def test_budget_below_the_smallest_reachable_size(sensitivity):
    with pytest.raises(ConfigError, match="budget"):
        mixed_precision_config(tiny_llama(), token_batches(1), budget=0.1, group_size=32, sensitivity=sensitivity)
    for bad in (0, 1.5, "half", True):
        with pytest.raises(ConfigError, match="budget"):
            mixed_precision_config(tiny_llama(), token_batches(1), budget=bad, sensitivity=sensitivity)


def test_int8_only_choices_give_int8_modules(sensitivity):
    model = tiny_llama()
    sens8 = {n: {8: v[8], 16: v[16]} for n, v in sensitivity.items()}
    cfg = mixed_precision_config(model, token_batches(1), budget=0.3, bits=(8, 16), sensitivity=sens8)
    assert cfg.group_size is None and set(cfg.layer_bits.values()) <= {8, 16}
    cfg.apply(model)
    assert any(isinstance(m, Int8WeightOnlyLinear) for m in model.modules())
