"""Packed Paillier: packing round trip, homomorphic sums against plaintext sums, bounds, and
SecureAggregation.aggregate with and without encryption."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from phe import generate_paillier_keypair

from seekdeep.errors import ConfigError
from seekdeep.fl import SecureAggregation, ServerAggregator, UpdateRejected
from seekdeep.fl import keys as fl_keys
from seekdeep.fl import paillier
from seekdeep.fl.paillier import PackingSpec


@pytest.fixture(scope="module")
def keypair():
    return generate_paillier_keypair(n_length=1024)


def test_slot_layout_at_2048_bits():
    # r=16, three clients with weight 1 -> slots of 18 bits: 3 * 65535 < 2**18, 2047 // 18 = 113
    spec = PackingSpec(bits=16, clip=1.0, total_weight=3, key_bits=2048)
    assert spec.slot_bits == 18 and spec.slots == 113
    # 512-byte ciphertexts carry 113 values: 4.53 bytes per value vs 4 for float32
    assert 512 / spec.slots / 4 < 1.15
    # the Flower path: one round, one spare bit for unequal weights -> total weight 8, 19-bit
    # slots, 107 per plaintext: 1.20x float32
    flower = PackingSpec(bits=16, total_weight=paillier.weight_capacity(3, 16), key_bits=2048)
    assert flower.total_weight == 8 and flower.slot_bits == 19 and flower.slots == 107
    assert 512 / flower.slots / 4 < 1.2


def test_round_weights_are_exact_when_they_fit():
    assert paillier.round_weights([1.0, 1.0], 8) == ([1, 1], True)  # survivors of a dropout
    assert paillier.round_weights([16, 24, 8], 8) == ([2, 3, 1], True)  # example counts
    assert paillier.round_weights([0.5, 0.25, 0.25], 8) == ([2, 1, 1], True)
    weights, exact = paillier.round_weights([16, 24, 40], 8)  # 2 : 3 : 5 needs a total of 10
    assert not exact and sum(weights) == 8


def test_pack_round_trip_at_the_bounds():
    spec = PackingSpec(bits=16, clip=1.0, total_weight=3, key_bits=1024)
    rng = np.random.default_rng(0)
    q = rng.integers(0, spec.max_slot + 1, size=1000).astype(np.uint64)
    q[:5] = spec.max_slot  # every slot at its ceiling: no carry into the neighbour
    q[5:10] = 0
    plaintexts = paillier.pack(q, spec)
    assert len(plaintexts) == spec.num_ciphertexts(1000)
    assert all(m < 1 << (spec.key_bits - 1) for m in plaintexts)
    np.testing.assert_array_equal(paillier.unpack(plaintexts, spec, 1000), q)
    with pytest.raises(UpdateRejected) as info:
        paillier.pack(np.array([spec.max_slot + 1], dtype=np.uint64), spec)
    assert info.value.reason == "out-of-range"


def test_homomorphic_sum_equals_plaintext_sum_within_one_step(keypair):
    public_key, private_key = keypair
    k = 3
    spec = PackingSpec(bits=12, clip=0.5, total_weight=k, key_bits=1024)
    rng = np.random.default_rng(1)
    updates = [rng.uniform(-0.5, 0.5, size=700) for _ in range(k)]
    updates[0][:20] = -0.5  # negative bound
    updates[1][:20] = -0.5
    updates[2][:20] = -0.5
    updates[0][20:40] = 0.5  # positive bound for all K clients at once
    updates[1][20:40] = 0.5
    updates[2][20:40] = 0.5
    encrypted = [paillier.encode_update(u, spec, public_key, rng)[0] for u in updates]
    summed = paillier.weighted_sum(encrypted, [1] * k, public_key)
    mean = paillier.decode_sum(summed, spec, private_key, 700, total_weight=k)
    exact = np.mean(updates, axis=0)
    assert np.abs(mean - exact).max() <= spec.step
    np.testing.assert_allclose(mean[:20], -0.5, atol=1e-12)  # the bounds decode exactly
    np.testing.assert_allclose(mean[20:40], 0.5, atol=1e-12)


def test_weighted_sum_and_running_sum_over_rounds(keypair):
    public_key, private_key = keypair
    total = 6  # a one-process running total: every round's weights sum to 6 (equal weights of 3 or 2 clients)
    spec = PackingSpec(bits=16, clip=0.2, total_weight=total, rounds=2, key_bits=1024)
    rng = np.random.default_rng(2)
    running, exact = None, np.zeros(300)
    for weights in ([1, 1, 1], [1, 1]):  # round 2: one client dropped out
        updates = [rng.uniform(-0.2, 0.2, size=300) for _ in weights]
        int_weights = paillier.integer_weights(weights, total)
        assert int_weights in ([2, 2, 2], [3, 3])
        encrypted = [paillier.encode_update(u, spec, public_key, rng)[0] for u in updates]
        running = paillier.weighted_sum(encrypted, int_weights, public_key, running)
        exact += np.average(updates, axis=0, weights=weights)
    decoded = paillier.decode_sum(running, spec, private_key, 300, total_weight=total, rounds=2)
    assert np.abs(decoded - exact).max() <= 2 * spec.step


def test_non_finite_and_foreign_key_updates_are_refused(keypair):
    public_key, private_key = keypair
    spec = PackingSpec(bits=16, clip=1.0, total_weight=2, key_bits=1024)
    rng = np.random.default_rng(3)
    with pytest.raises(UpdateRejected) as info:
        paillier.encode_update(np.array([0.1, np.nan]), spec, public_key, rng)
    assert info.value.reason == "non-finite"
    server = ServerAggregator(spec, 10, public_key)
    good, _ = paillier.encode_update(np.zeros(10), spec, public_key, rng)
    with pytest.raises(UpdateRejected) as info:
        server.check(good, "0" * 16)
    assert info.value.reason == "wrong-key"
    with pytest.raises(UpdateRejected) as info:
        server.check(np.concatenate([good, good]), server.key_fingerprint)
    assert info.value.reason == "wrong-shape"
    bad = good.copy()
    bad[0] = 255  # >= n^2: not a ciphertext
    with pytest.raises(UpdateRejected) as info:
        server.check(bad, server.key_fingerprint)
    assert info.value.reason == "bad-ciphertext"
    # an update encoded outside its slots (a plaintext with bits above the last slot) is caught
    # when the sum is decoded, not turned into a silently wrong model
    summed = paillier.weighted_sum([good, paillier.encrypt([1 << (spec.slots * spec.slot_bits)], public_key)], [1, 1], public_key)
    with pytest.raises(UpdateRejected) as info:
        paillier.decode_sum(summed, spec, private_key, 10, total_weight=2)
    assert info.value.reason == "out-of-range"


def test_plaintext_server_checks_range_and_finiteness():
    spec = PackingSpec(bits=16, clip=0.5, total_weight=2, key_bits=1024)
    server = ServerAggregator(spec, 4)
    assert server.check(np.array([0.1, -0.5, 0.5, 0.0]), None).shape == (4,)
    for payload, reason in ((np.array([0.1, np.inf, 0, 0]), "non-finite"), (np.array([0.6, 0, 0, 0]), "out-of-range"),
                            (np.zeros(5), "wrong-shape")):
        with pytest.raises(UpdateRejected) as info:
            server.check(payload, None)
        assert info.value.reason == reason


def test_server_refuses_a_private_key(keypair, tmp_path):
    public_key, private_key = keypair
    with pytest.raises(ConfigError, match="private key"):
        ServerAggregator(PackingSpec(key_bits=1024), 4, private_key)
    public, private = fl_keys.generate_keypair(tmp_path / "keys", key_bits=1024)
    assert fl_keys.load_public_key(public).n == fl_keys.load_private_key(private).public_key.n
    assert "p" not in json.loads(public.read_text())
    with pytest.raises(ConfigError, match="private key"):
        fl_keys.load_public_key(private)
    with pytest.raises(ConfigError, match="does not exist"):
        fl_keys.load_public_key(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="no key file"):
        fl_keys.load_public_key(None)


def _max_abs(updates):
    return max(float(t.abs().max()) for u in updates for t in u.values())


def test_aggregate_paillier_matches_plaintext_for_state_dicts(keypair):
    torch.manual_seed(0)
    updates = [{"w": torch.randn(64, 33), "b": torch.randn(33) * 3, "steps": torch.tensor(7)} for _ in range(3)]
    _, private_key = keypair
    for weights in (None, [10, 20, 35]):
        enc = SecureAggregation.aggregate(updates, weights, encryption="paillier", private_key=private_key)
        plain = SecureAggregation.aggregate(updates, weights, encryption="none")
        w = np.ones(3) if weights is None else np.array(weights, dtype=np.float64)
        step = PackingSpec(bits=16, clip=_max_abs(updates)).step
        for key in ("w", "b"):
            exact = sum(float(wi) * u[key].double() for wi, u in zip(w, updates)) / w.sum()
            assert (plain[key].double() - exact).abs().max() < 1e-6
            assert (enc[key].double() - plain[key].double()).abs().max() <= step
            assert enc[key].dtype == torch.float32 and enc[key].shape == updates[0][key].shape
        assert int(enc["steps"]) == 7


def test_aggregate_models_and_adapters(keypair, tmp_path):
    from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM
    from seekdeep.peft import LoRAConfig
    from seekdeep.peft.io import adapter_tensors

    _, private_key = keypair
    config = LlamaConfig.from_name("tiny", vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=32)
    models = []
    for seed in range(3):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        model.init_weights()
        model.add_adapter("default", LoRAConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
        torch.manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.05)
        models.append(model)
    merged = SecureAggregation.aggregate(models, encryption="paillier", private_key=private_key, adapter_name="default")
    assert isinstance(merged, LlamaForCausalLM) and merged is not models[0]
    lora = {n: p for n, p in merged.named_parameters() if "lora_" in n}
    clip = max(float(p.detach().abs().max()) for m in models for n, p in m.named_parameters() if "lora_" in n)
    step = PackingSpec(bits=16, clip=clip).step
    for name, p in lora.items():
        exact = sum(dict(m.named_parameters())[name] for m in models) / 3
        assert (p - exact).abs().max() <= step
    # the base weights are not averaged (they are identical here, and taken from the first model)
    assert torch.equal(merged.state_dict()["model.embed_tokens.weight"], models[0].state_dict()["model.embed_tokens.weight"])
    # peft-layout adapter directories
    dirs = []
    for i, m in enumerate(models):
        m.save_adapter(tmp_path / f"a{i}", adapter_name="default")
        dirs.append(tmp_path / f"a{i}")
    from_dirs = SecureAggregation.aggregate(dirs, encryption="paillier", private_key=private_key)
    assert set(from_dirs) and all(k.startswith("base_model.model.") for k in from_dirs)
    key = next(k for k in from_dirs if k.endswith("q_proj.lora_A.weight"))
    exact = sum(adapter_tensors(m, "default")[key].detach() for m in models) / 3
    assert (from_dirs[key] - exact).abs().max() <= step


def test_aggregate_refuses_mismatched_updates():
    a = {"w": torch.zeros(3)}
    with pytest.raises(ConfigError, match="updates\\[1\\]"):
        SecureAggregation.aggregate([a, {"w": torch.zeros(4)}], encryption="none")
    with pytest.raises(ConfigError, match="updates\\[1\\]"):
        SecureAggregation.aggregate([a, {"v": torch.zeros(3)}], encryption="none")
    with pytest.raises(ConfigError, match="NaN"):
        SecureAggregation.aggregate([a, {"w": torch.tensor([0.0, float("nan"), 0.0])}], encryption="none")
    with pytest.raises(ConfigError, match="encryption"):
        SecureAggregation.aggregate([a, a], encryption="rsa")
    with pytest.raises(ConfigError, match="weights"):
        SecureAggregation.aggregate([a, a], weights=[1], encryption="none")
