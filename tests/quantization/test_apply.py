"""QuantConfig.apply on whole models: which modules are swapped, how far the logits move,
how much smaller the model gets, and the options (observers, skip, tied embeddings)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from quant_helpers import VOCAB, rel_err, tiny_llama, token_batches
from seekdeep.quantization import (Int4Embedding, Int4WeightOnlyLinear, Int8DynamicLinear, Int8Embedding, Int8StaticLinear,
                                   Int8WeightOnlyLinear, QuantConfig, TiedEmbedding, model_size_bytes, quantized_state_dict,
                                   resolve_plan)
from seekdeep.quantization.observers import Observer

# method, bits, linear class, embedding class, max relative logit error, max size vs fp32
CASES = [
    ("static", 8, Int8StaticLinear, Int8Embedding, 0.05, 0.27),
    ("dynamic", 8, Int8DynamicLinear, Int8Embedding, 0.03, 0.27),
    ("weight_only", 8, Int8WeightOnlyLinear, Int8Embedding, 0.03, 0.27),
    ("weight_only", 4, Int4WeightOnlyLinear, Int4Embedding, 0.25, 0.17),
]


@pytest.mark.parametrize("method,bits,linear_cls,embedding_cls,max_err,max_size", CASES)
def test_methods_swap_every_layer_and_stay_close(method, bits, linear_cls, embedding_cls, max_err, max_size):
    model = tiny_llama()
    ids = token_batches(1, batch=2, seq=24, seed=7)[0]
    with torch.no_grad():
        expected = model(ids).logits
    float_bytes = model_size_bytes(model)
    cfg = QuantConfig(method=method, bits=bits, group_size=32 if bits == 4 else None)
    out = cfg.apply(model, token_batches() if method == "static" else None)
    assert out is model
    linears = [m for n, m in model.named_modules() if n.endswith(("_proj", "lm_head"))]
    assert linears and all(isinstance(m, linear_cls) for m in linears)
    assert isinstance(model.model.embed_tokens, embedding_cls)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    if bits == 4:
        assert all(m.layout == "cpu" for m in linears)  # the tinygemm kernel, not the fallback
    with torch.no_grad():
        actual = model(ids).logits
    assert rel_err(actual, expected) < max_err
    assert model_size_bytes(model) <= max_size * float_bytes
    record = model.quantization_config
    assert record["method"] == method and record["bits"] == bits and len(record["modules"]) == 16


def test_static_calibration_sets_activation_scales_from_the_data():
    model = tiny_llama()
    data = token_batches(4)
    QuantConfig(method="static", observe_steps=2).apply(model, data)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert float(q_proj.input_scale) > 0 and int(q_proj.input_zero_point) == 0
    # the scale is what min/max over the first two batches gives for this layer's input
    reference = tiny_llama()
    seen = []
    handle = reference.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        for ids in data[:2]:
            reference(ids)
    handle.remove()
    amax = max(float(t.abs().max()) for t in seen)
    assert float(q_proj.input_scale) == pytest.approx(amax / 127, rel=1e-6)


def test_observe_steps_bounds_the_batches_read():
    read = []

    def stream():
        for i, ids in enumerate(token_batches(6)):
            read.append(i)
            yield ids

    QuantConfig(method="static", observe_steps=3).apply(tiny_llama(), stream())
    assert read == [0, 1, 2]


def test_asymmetric_static_uses_zero_points_and_stays_close():
    model = tiny_llama()
    ids = token_batches(1, seed=5)[0]
    with torch.no_grad():
        expected = model(ids).logits
    QuantConfig(method="static", symmetric=False, observer="minmax").apply(model, token_batches())
    zero_points = [int(m.input_zero_point) for m in model.modules() if isinstance(m, Int8StaticLinear)]
    assert any(zp != 0 for zp in zero_points)
    with torch.no_grad():
        assert rel_err(model(ids).logits, expected) < 0.05


@pytest.mark.parametrize("observer", ["percentile", "mse"])
def test_clipping_observers_ignore_a_rare_outlier(observer):
    x = torch.randn(64, 512)
    x[0, 0] = 200.0
    minmax, clipped = Observer("minmax"), Observer(observer, percentile=99.9)
    for obs in (minmax, clipped):
        obs.observe(x)
    scale_minmax, _ = minmax.qparams(symmetric=True)
    scale_clipped, _ = clipped.qparams(symmetric=True)
    assert scale_minmax == pytest.approx(200 / 127)
    assert scale_clipped < scale_minmax / 10
    assert clipped.qparams(symmetric=False)[0] < minmax.qparams(symmetric=False)[0] / 10


@pytest.mark.parametrize("observer", ["percentile", "mse"])
def test_static_with_each_observer(observer):
    model = tiny_llama()
    ids = token_batches(1, seed=5)[0]
    with torch.no_grad():
        expected = model(ids).logits
    QuantConfig(method="static", observer=observer).apply(model, token_batches())
    with torch.no_grad():
        assert rel_err(model(ids).logits, expected) < 0.06


def test_skip_keeps_matching_layers_in_float():
    model = tiny_llama()
    QuantConfig(method="dynamic", skip=["lm_head", "*.down_proj"]).apply(model)
    assert type(model.lm_head) is nn.Linear
    assert all(type(layer.mlp.down_proj) is nn.Linear for layer in model.model.layers)
    assert all(isinstance(layer.mlp.up_proj, Int8DynamicLinear) for layer in model.model.layers)
    assert "lm_head" not in model.quantization_config["modules"]


def test_tied_embedding_reads_the_quantised_head():
    model = tiny_llama(tie_word_embeddings=True)
    float_bytes = model_size_bytes(model)
    QuantConfig(method="weight_only", bits=4, group_size=64).apply(model)
    embed, head = model.model.embed_tokens, model.lm_head
    assert isinstance(embed, TiedEmbedding) and isinstance(head, Int4WeightOnlyLinear)
    ids = torch.tensor([[0, 5, VOCAB - 1]])
    assert torch.equal(embed(ids)[0], head.dequantize()[ids[0]])
    # the shared matrix is stored once
    assert not any(k.startswith("model.embed_tokens") for k in model.state_dict())
    assert model_size_bytes(model) < 0.17 * float_bytes


def test_skipping_a_tied_head_keeps_the_shared_weight_float():
    model = tiny_llama(tie_word_embeddings=True)
    QuantConfig(method="weight_only", bits=8, skip=["lm_head"]).apply(model)
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_state_dict_offline_step_matches_the_converted_model():
    model = tiny_llama()
    cfg = QuantConfig(method="weight_only", bits=4, group_size=32)
    offline = quantized_state_dict(model, resolve_plan(model, cfg))
    cfg.apply(model)
    online = model.state_dict()
    assert offline.keys() == online.keys()
    for key in offline:
        assert torch.equal(offline[key], online[key]), key


def test_quantised_model_generates_like_its_logits_say():
    model = QuantConfig(method="dynamic").apply(tiny_llama())
    prompt = torch.tensor([[1, 2, 3, 4]])
    out = model.generate(prompt, max_new_tokens=6)
    with torch.no_grad():
        first = model(prompt).logits[0, -1].argmax()
    assert out.shape == (1, 10) and int(out[0, 4]) == int(first)


def test_deepseek_v3_experts_and_latent_attention_quantise():
    from seekdeep.models.deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    config = DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, first_k_dense_replace=1, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=64, n_group=1, topk_group=1)
    model = DeepseekV3ForCausalLM(config)
    model.init_weights(std=0.05)
    model.eval()
    ids = token_batches(1, seed=3)[0]
    with torch.no_grad():
        expected = model(ids).logits
    single_token = copy.deepcopy(model)
    QuantConfig(method="static").apply(model, [ids, token_batches(1, seed=4)[0]])
    assert isinstance(model.model.layers[0].self_attn.kv_b_proj, Int8StaticLinear)
    assert all(isinstance(e.gate_proj, Int8StaticLinear) for e in model.model.layers[1].mlp.experts)
    with torch.no_grad():
        assert rel_err(model(ids).logits, expected) < 0.1
    # one calibration token reaches 2 of the 8 experts: the rest fall back to dynamic activations
    with pytest.warns(UserWarning, match="saw no calibration input"):
        QuantConfig(method="static").apply(single_token, [ids[:1, :1]])
    kinds = [type(e.gate_proj) for e in single_token.model.layers[1].mlp.experts]
    assert kinds.count(Int8StaticLinear) == 2 and kinds.count(Int8DynamicLinear) == 6
