"""Quantised checkpoints: save_pretrained writes the integer tensors and the plan into
config.json; AutoModel.from_pretrained rebuilds the quantised modules on the meta device,
assigns the tensors and generates exactly as the model that was saved."""

from __future__ import annotations

import json

import pytest
import torch

import seekdeep
from quant_helpers import tiny_llama, token_batches
from seekdeep.errors import ConfigError
from seekdeep.quantization import Int4WeightOnlyLinear, QuantConfig, TiedEmbedding, model_size_bytes

CONFIGS = {
    "static": QuantConfig(method="static", observe_steps=2),
    "static-asymmetric": QuantConfig(method="static", symmetric=False, observer="percentile"),
    "dynamic": QuantConfig(method="dynamic"),
    "int8-weight-only": QuantConfig(method="weight_only", bits=8),
    "int4-weight-only": QuantConfig(method="weight_only", bits=4, group_size=32),
    "mixed": QuantConfig(method="weight_only", bits=4, group_size=64,
                         layer_bits={"lm_head": 16, "model.layers.0.mlp.down_proj": 8}),
}


def _quantised(name: str, tie: bool = False):
    cfg = CONFIGS[name]
    data = token_batches() if cfg.method == "static" else None
    return QuantConfig.from_dict(cfg.to_dict()).apply(tiny_llama(tie_word_embeddings=tie), data)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_same_logits_and_generations(tmp_path, name, tie):
    model = _quantised(name, tie)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "seekdeep"
    assert config["quantization_config"]["modules"] == model.quantization_config["modules"]
    assert config["dtype"] == "float32"
    loaded = seekdeep.AutoModel.from_pretrained(tmp_path)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    ids = token_batches(1, seed=9)[0]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    prompt = ids[:1, :5]
    assert torch.equal(loaded.generate(prompt, max_new_tokens=8), model.generate(prompt, max_new_tokens=8))
    assert model_size_bytes(loaded) == model_size_bytes(model)
    assert not any(t.is_meta for t in loaded.state_dict().values())


def test_checkpoint_holds_portable_int4_and_is_small(tmp_path):
    model = _quantised("int4-weight-only", tie=True)
    float_dir, quant_dir = tmp_path / "float", tmp_path / "int4"
    tiny_llama(tie_word_embeddings=True).save_pretrained(float_dir)
    model.save_pretrained(quant_dir)
    from safetensors import safe_open

    with safe_open(str(quant_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        packed = f.get_tensor("lm_head.weight_int4")
    assert "lm_head.weight_int4" in keys and not any(k.startswith("model.embed_tokens") for k in keys)
    assert packed.dtype == torch.uint8
    assert torch.equal(packed, model.lm_head.portable_weight())  # not the CPU kernel's layout
    ratio = (quant_dir / "model.safetensors").stat().st_size / (float_dir / "model.safetensors").stat().st_size
    assert ratio < 0.17


def test_sharded_and_bf16_loads(tmp_path):
    model = _quantised("static")
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    loaded = seekdeep.AutoModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.model.norm.weight.dtype == torch.bfloat16
    q_proj = loaded.model.layers[0].self_attn.q_proj
    assert q_proj.weight_scale.dtype == torch.float32 and q_proj.weight_int8.dtype == torch.int8  # kernel dtypes kept
    ids = token_batches(1, seed=9)[0]
    with torch.no_grad():
        logits = loaded(ids).logits
        expected = model(ids).logits
    assert logits.dtype == torch.bfloat16
    assert float((logits.float() - expected).abs().max()) < 0.1 * float(expected.abs().max())


def test_loaded_int4_is_packed_for_the_kernel_and_tied(tmp_path):
    _quantised("int4-weight-only", tie=True).save_pretrained(tmp_path)
    loaded = seekdeep.AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded.lm_head, Int4WeightOnlyLinear) and loaded.lm_head.layout == "cpu"
    assert isinstance(loaded.model.embed_tokens, TiedEmbedding) and loaded.model.embed_tokens.source is loaded.lm_head


def test_resave_of_a_loaded_model_is_identical(tmp_path):
    _quantised("int4-weight-only").save_pretrained(tmp_path / "a")
    seekdeep.AutoModel.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_bad_quantization_config_in_config_json(tmp_path):
    _quantised("dynamic").save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    good = json.loads(json.dumps(config))
    config["quantization_config"]["modules"]["model.layers.0.self_attn.nope"] = {"kind": "int8_dynamic"}
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="self_attn.nope"):
        seekdeep.AutoModel.from_pretrained(tmp_path)
    config = json.loads(json.dumps(good))
    config["quantization_config"]["modules"]["lm_head"] = {"kind": "int3"}
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="kind"):
        seekdeep.AutoModel.from_pretrained(tmp_path)
    config = json.loads(json.dumps(good))
    config["quantization_config"]["quant_method"] = "gptq"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="quant_method"):
        seekdeep.AutoModel.from_pretrained(tmp_path)
