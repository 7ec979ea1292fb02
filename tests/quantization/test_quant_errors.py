"""Bad input fails with a ConfigError naming the field and what would be accepted."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quant_helpers import VOCAB, tiny_llama, token_batches
from seekdeep.errors import ConfigError
from seekdeep.quantization import QuantConfig, quantize


@pytest.mark.parametrize("kwargs,field,accepted", [
    (dict(bits=3), "bits", "8, 4"),
    (dict(bits=16), "bits", "8, 4"),
    (dict(bits=True), "bits", "8, 4"),
    (dict(method="gptq"), "method", "static, dynamic, weight_only, qat"),
    (dict(method="static", bits=4), "bits", "weight_only"),
    (dict(method="dynamic", bits=4), "bits", "weight_only"),
    (dict(method="weight_only", bits=4, group_size=100), "group_size", "32, 64, 128, 256"),
    (dict(method="weight_only", bits=4, group_size=16), "group_size", "32, 64, 128, 256"),
    (dict(method="weight_only", bits=8, group_size=128), "group_size", "bits=4"),
    (dict(observe_steps=0), "observe_steps", "an integer in [1,"),
    (dict(observer="kl"), "observer", "minmax, percentile, mse"),
    (dict(percentile=20), "percentile", "(50, 100]"),
    (dict(per_channel="yes"), "per_channel", "True or False"),
    (dict(symmetric=1), "symmetric", "True, False or None"),
    (dict(skip="lm_head"), "skip", "list"),
    (dict(method="static", layer_bits={"lm_head": 8}), "layer_bits", "weight_only"),
    (dict(method="weight_only", layer_bits={"lm_head": 2}), "layer_bits", "4, 8, 16"),
    (dict(method="qat", qat_steps=0), "qat_steps", "an integer in [1,"),
])
def test_config_fields(kwargs, field, accepted):
    with pytest.raises(ConfigError) as info:
        QuantConfig(**kwargs)
    assert info.value.field == field and accepted in str(info.value)


def test_group_size_that_does_not_divide_a_layer():
    model = tiny_llama(intermediate_size=320)  # down_proj has 320 inputs: 64 divides it, 128 does not
    with pytest.raises(ConfigError) as info:
        QuantConfig(method="weight_only", bits=4, group_size=128).apply(model)
    assert info.value.field == "group_size"
    assert "in_features=320" in str(info.value) and "down_proj" in str(info.value) and "[32, 64]" in str(info.value)
    # skipping the layer, or a group that divides it, works
    QuantConfig(method="weight_only", bits=4, group_size=128, skip=["*.down_proj"]).apply(tiny_llama(intermediate_size=320))
    QuantConfig(method="weight_only", bits=4, group_size=64).apply(tiny_llama(intermediate_size=320))


@pytest.mark.parametrize("data,field,message", [
    (None, "calibration_data", "needs an iterable"),
    ([], "calibration_data", "is empty"),
    (iter([]), "calibration_data", "is empty"),
    (torch.zeros(2, 8, dtype=torch.long), "calibration_data", "wrap it in a list"),
    (42, "calibration_data", "got int"),
    ([torch.zeros(8, dtype=torch.long)], "calibration_data[0]", "(batch, seq)"),
    ([torch.zeros(2, 8, 3, dtype=torch.long)], "calibration_data[0]", "(batch, seq)"),
    ([torch.zeros(2, 0, dtype=torch.long)], "calibration_data[0]", "(batch, seq)"),
    ([torch.zeros(2, 8)], "calibration_data[0]", "integer token ids"),
    ([torch.zeros(2, 8, dtype=torch.long), "def f(): pass"], "calibration_data[1]", "got str"),
    ([torch.full((2, 8), VOCAB, dtype=torch.long)], "calibration_data[0]", f"[0, {VOCAB})"),
    ([torch.full((2, 8), -1, dtype=torch.long)], "calibration_data[0]", f"[0, {VOCAB})"),
])
def test_bad_calibration_data(data, field, message):
    model = tiny_llama()
    with pytest.raises(ConfigError) as info:
        QuantConfig(method="static").apply(model, data)
    assert info.value.field == field and message in str(info.value)
    assert isinstance(model.lm_head, nn.Linear)  # nothing was swapped


def test_skip_and_layer_bits_must_name_real_layers():
    with pytest.raises(ConfigError, match="skip.*'lm_hed' matches no"):
        QuantConfig(method="dynamic", skip=["lm_hed"]).apply(tiny_llama())
    with pytest.raises(ConfigError, match="layer_bits.*'model.layers.9.mlp.up_proj'"):
        QuantConfig(method="weight_only", layer_bits={"model.layers.9.mlp.up_proj": 8}).apply(tiny_llama())
    with pytest.raises(ConfigError, match="shares its weight with 'lm_head'"):
        QuantConfig(method="weight_only", layer_bits={"model.embed_tokens": 8}).apply(tiny_llama(tie_word_embeddings=True))
    with pytest.raises(ConfigError, match="no module to quantise"):
        QuantConfig(method="dynamic", skip=["*"]).apply(tiny_llama())


def test_model_state_errors():
    model = QuantConfig(method="dynamic").apply(tiny_llama())
    with pytest.raises(ConfigError, match="already quantised"):
        QuantConfig(method="dynamic").apply(model)
    with torch.device("meta"):
        meta = type(tiny_llama())(tiny_llama().config)
    with pytest.raises(ConfigError, match="meta device"):
        QuantConfig(method="dynamic").apply(meta)
    with pytest.raises(ConfigError, match="QuantConfig"):
        quantize(tiny_llama(), {"method": "dynamic"})
    with pytest.raises(ConfigError, match="torch.nn.Module"):
        QuantConfig(method="dynamic").apply("model-dir")


def test_unused_calibration_data_is_not_silently_dropped():
    with pytest.warns(UserWarning, match="does not use calibration_data"):
        QuantConfig(method="dynamic").apply(tiny_llama(), token_batches(1))


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="quantization_config.bitz"):
        QuantConfig.from_dict({"method": "dynamic", "bitz": 8})
    assert QuantConfig.from_dict(QuantConfig(method="weight_only", bits=4).to_dict()) == QuantConfig(method="weight_only", bits=4)
