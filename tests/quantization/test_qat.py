"""QAT: fake quantisation with a straight-through estimator, the same grid as the converter,
a short fine-tune that lowers the quantised loss, and a conversion that keeps the logits."""

from __future__ import annotations

import pytest
import torch

from quant_helpers import patterned_batches, rel_err, tiny_llama, token_batches
from seekdeep.errors import ConfigError
from seekdeep.quantization import (FakeQuantEmbedding, FakeQuantLinear, Int4WeightOnlyLinear, Int8DynamicLinear,
                                   QuantConfig, TiedEmbedding, convert_qat, mean_loss, prepare_qat)
from seekdeep.quantization import kernels as K
from seekdeep.quantization.config import LayerScheme
from seekdeep.quantization.qat import fake_quantize_per_token, fake_quantize_weight


@pytest.mark.parametrize("scheme", [LayerScheme("int4_weight_only", group_size=32, symmetric=False),
                                    LayerScheme("int8_dynamic")])
def test_fake_quant_forward_is_the_converter_grid_and_backward_is_identity(scheme):
    w = torch.randn(64, 128, requires_grad=True)
    fq = fake_quantize_weight(w, scheme)
    if scheme.bits == 4:
        expected = K.dequantize_int4(*K.quantize_int4(w.detach(), 32, False), 32)
    else:
        expected = K.dequantize_int8(*K.quantize_int8(w.detach()))
    assert torch.equal(fq.detach(), expected)
    upstream = torch.randn(64, 128)
    (fq * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)  # straight through: the rounding passes the gradient unchanged


def test_per_token_activation_fake_quant_has_identity_gradient():
    x = torch.randn(2, 5, 32, requires_grad=True)
    y = fake_quantize_per_token(x)
    step = x.detach().abs().amax(-1, keepdim=True) / 127
    assert bool(((y.detach() - x.detach()).abs() <= step / 2 + 1e-6).all())
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("bits,tie", [(4, False), (4, True), (8, False)])
def test_prepare_shares_parameters_and_convert_keeps_the_logits(bits, tie):
    model = tiny_llama(tie_word_embeddings=tie)
    params = {id(p) for p in model.parameters()}
    prepare_qat(model, QuantConfig(method="qat", bits=bits, group_size=32 if bits == 4 else None))
    assert {id(p) for p in model.parameters()} == params  # an optimizer built before still trains them
    assert isinstance(model.lm_head, FakeQuantLinear) and isinstance(model.model.embed_tokens, FakeQuantEmbedding)
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = token_batches(1, seed=4)[0]
    with torch.no_grad():
        fake = model(ids).logits
    convert_qat(model)
    linear_cls = Int4WeightOnlyLinear if bits == 4 else Int8DynamicLinear
    assert isinstance(model.lm_head, linear_cls)
    assert isinstance(model.model.embed_tokens, TiedEmbedding) == tie
    with torch.no_grad():
        real = model(ids).logits
    # the converted model computes what was trained; only the kernels' bf16 activations differ (int4)
    assert rel_err(real, fake) < (1e-2 if bits == 4 else 1e-5)
    assert model.quantization_config["method"] == "qat"


def test_qat_apply_finetunes_then_converts():
    data = patterned_batches(2, batch=2, seq=16)
    model = tiny_llama()
    before = mean_loss(QuantConfig(method="weight_only", bits=4, group_size=32).apply(tiny_llama()), data)
    QuantConfig(method="qat", bits=4, group_size=32, qat_steps=8, qat_lr=3e-3).apply(model, data)
    assert isinstance(model.lm_head, Int4WeightOnlyLinear) and not hasattr(model, "qat_plan")
    assert mean_loss(model, data) < before - 0.1  # the quantised model learnt during the fine-tune


def test_qat_misuse():
    with pytest.raises(ConfigError, match="method"):
        prepare_qat(tiny_llama(), QuantConfig(method="dynamic"))
    with pytest.raises(ConfigError, match="prepare_qat"):
        convert_qat(tiny_llama())
    model = prepare_qat(tiny_llama(), QuantConfig(method="qat", bits=4, group_size=32))
    with pytest.raises(ConfigError, match="already prepared"):
        prepare_qat(model, QuantConfig(method="qat", bits=4, group_size=32))
    with pytest.raises(ConfigError, match="calibration_data"):
        QuantConfig(method="qat", bits=4, group_size=32).apply(tiny_llama())
