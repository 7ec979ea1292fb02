"""Saving and loading in the Hugging Face layout, and every way a checkpoint can be bad."""

from __future__ import annotations

import json

import pytest
import torch

import seekdeep
from seekdeep.errors import CheckpointError, ConfigError, ModelNotFoundError, UnknownArchitectureError, UnknownBackendError
from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM


def _tiny(**overrides):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.from_name("tiny", vocab_size=80, max_position_embeddings=64, **overrides))
    model.init_weights()
    return model.eval()


@pytest.fixture
def saved(tmp_path):
    model = _tiny()
    model.save_pretrained(tmp_path)
    return model, tmp_path


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("shard", ["5GB", "40KB"])
def test_round_trip_single_and_sharded(tmp_path, shard):
    model = _tiny(tie_word_embeddings=True)
    model.save_pretrained(tmp_path, max_shard_size=shard)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "config.json" in files and "generation_config.json" in files
    if shard == "40KB":
        assert "model.safetensors.index.json" in files and "model.safetensors" not in files
        assert sum(name.startswith("model-0") for name in files) > 1
    else:
        assert "model.safetensors" in files
    loaded = seekdeep.AutoModel.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.randint(0, 80, (2, 9))
    assert torch.equal(_logits(model, ids), _logits(loaded, ids))
    assert seekdeep.AutoConfig.from_pretrained(tmp_path) == model.config


def test_resave_removes_stale_shards(tmp_path):
    model = _tiny()
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    model.save_pretrained(tmp_path)
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert not list(tmp_path.glob("model-0*.safetensors"))


def test_loads_on_meta_then_assigns_with_requested_dtype(saved):
    _, path = saved
    model = seekdeep.AutoModel.from_pretrained(path, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())


def test_backend_override_initialises_missing_backend_weights(saved):
    model, path = saved
    gated = seekdeep.AutoModel.from_pretrained(path, attention_backend="gated")
    assert not any(p.is_meta for p in gated.parameters())
    ids = torch.randint(0, 80, (1, 12))
    # the gate starts at exactly 1, so the output equals the dense model's
    assert torch.allclose(_logits(gated, ids), _logits(model, ids), atol=1e-5)
    dsa = seekdeep.AutoModel.from_pretrained(path, attention_backend="dsa", attention_options={"topk": 64})
    assert torch.allclose(_logits(dsa, ids), _logits(model, ids), atol=1e-5)  # k >= seq: dense


def test_missing_directory():
    with pytest.raises(ModelNotFoundError, match="no-such-dir"):
        seekdeep.AutoModel.from_pretrained("./no-such-dir")


def test_hub_id_without_network_or_cache_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFoundError, match="someorg/not-a-model"):
        seekdeep.AutoModel.from_pretrained("someorg/not-a-model")


def test_missing_config(saved):
    _, path = saved
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        seekdeep.AutoModel.from_pretrained(path)


def test_malformed_config(saved):
    _, path = saved
    (path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        seekdeep.AutoModel.from_pretrained(path)


@pytest.mark.parametrize(
    "edit, error, field",
    [
        (lambda d: d.pop("hidden_size"), ConfigError, "hidden_size"),
        (lambda d: d.pop("model_type"), ConfigError, "model_type"),
        (lambda d: d.update(model_type="gpt9"), UnknownArchitectureError, "model_type"),
        (lambda d: d.update(num_key_value_heads=3), ConfigError, "num_key_value_heads"),
        (lambda d: d.update(vocab_size=-5), ConfigError, "vocab_size"),
        (lambda d: d.update(attention_backend="flashy"), UnknownBackendError, "attention_backend"),
        (lambda d: d.update(rope_parameters={"rope_type": "weird", "rope_theta": 1e4}), ConfigError, "rope_parameters.rope_type"),
    ],
)
def test_incomplete_or_invalid_config_names_the_key(saved, edit, error, field):
    _, path = saved
    d = json.loads((path / "config.json").read_text())
    edit(d)
    (path / "config.json").write_text(json.dumps(d))
    with pytest.raises(error) as err:
        seekdeep.AutoModel.from_pretrained(path)
    assert err.value.field == field
    assert field in str(err.value)


def test_missing_shard(tmp_path):
    _tiny().save_pretrained(tmp_path, max_shard_size="40KB")
    victim = sorted(tmp_path.glob("model-0*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        seekdeep.AutoModel.from_pretrained(tmp_path)


def test_shape_mismatch_names_the_tensor(saved):
    _, path = saved
    d = json.loads((path / "config.json").read_text())
    d["intermediate_size"] = 100
    (path / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight'"):
        seekdeep.AutoModel.from_pretrained(path)


def test_truncated_weights_file(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        seekdeep.AutoModel.from_pretrained(path)


def test_missing_tensor(saved):
    from safetensors.torch import load_file, save_file

    _, path = saved
    state = load_file(path / "model.safetensors")
    state.pop("model.norm.weight")
    save_file(state, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        seekdeep.AutoModel.from_pretrained(path)


def test_bad_shard_size_and_dtype(tmp_path, saved):
    model, path = saved
    with pytest.raises(ConfigError, match="max_shard_size"):
        model.save_pretrained(tmp_path / "x", max_shard_size="lots")
    with pytest.raises(ConfigError, match="dtype"):
        seekdeep.AutoModel.from_pretrained(path, dtype="float7")


def test_gradient_checkpointing_gives_same_gradients(saved):
    model, _ = saved
    ids = torch.randint(0, 80, (2, 16))
    model.train()
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model.gradient_checkpointing = False
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name
