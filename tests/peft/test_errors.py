"""Bad input fails with a specific, typed error naming the field and what is accepted."""

from __future__ import annotations

import json

import pytest
import torch

import seekdeep
from seekdeep.errors import CheckpointError, ConfigError
from seekdeep.peft import AdapterConfig, BottleneckConfig, LoRAConfig, PromptTuningConfig, parse_lora_spec


@pytest.mark.parametrize("r", [0, -4, 2.5, True])
def test_rank_must_be_positive_int(r):
    with pytest.raises(ConfigError, match="rank") as info:
        LoRAConfig(r=r)
    assert info.value.field == "r"


@pytest.mark.parametrize("kwargs, field", [
    (dict(lora_alpha=0), "lora_alpha"), (dict(lora_dropout=1.0), "lora_dropout"), (dict(bias="all"), "bias"),
    (dict(target_modules=[]), "target_modules"), (dict(target_modules="q_proj[("), "target_modules"),
    (dict(init_lora_weights="pissa"), "init_lora_weights"), (dict(modules_to_save="lm_head"), "modules_to_save"),
])
def test_bad_lora_fields(kwargs, field):
    with pytest.raises(ConfigError) as info:
        LoRAConfig(**kwargs)
    assert info.value.field == field


def test_bad_other_configs():
    with pytest.raises(ConfigError, match="non_linearity"):
        BottleneckConfig(non_linearity="swish")
    with pytest.raises(ConfigError, match="bottleneck_size"):
        BottleneckConfig(bottleneck_size=0)
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        PromptTuningConfig(num_virtual_tokens=0)
    with pytest.raises(ConfigError, match="prompt_tuning_init_text"):
        PromptTuningConfig(prompt_tuning_init="TEXT")


def test_unknown_target_modules_name_what_exists(model):
    with pytest.raises(ConfigError, match=r"'query' matches no module.*q_proj, k_proj|'query' matches no module") as info:
        model.add_adapter("a", LoRAConfig(target_modules=["q_proj", "query"]))
    assert info.value.field == "target_modules" and "q_proj" in str(info.value)
    assert model.list_adapters() == [] and not any("lora" in n for n, _ in model.named_modules())
    with pytest.raises(ConfigError, match="regular expression"):
        model.add_adapter("a", LoRAConfig(target_modules=r"layers\.9\..*"))
    with pytest.raises(ConfigError, match="not a linear layer"):
        model.add_adapter("a", LoRAConfig(target_modules=["input_layernorm"]))
    with pytest.raises(ConfigError, match="modules_to_save"):
        model.add_adapter("a", LoRAConfig(target_modules=["q_proj"], modules_to_save=["q_proj"]))
    with pytest.raises(ConfigError, match="matches no module"):
        model.add_adapter("a", LoRAConfig(target_modules=["q_proj"], exclude_modules=["nothing"]))


def test_adapter_name_clashes_and_bad_names(model):
    model.add_adapter("task", LoRAConfig(r=2))
    with pytest.raises(ConfigError, match="already exists") as info:
        model.add_adapter("task", LoRAConfig(r=4))
    assert info.value.field == "adapter_name"
    for bad in ("", "a.b", 3, "base_layer"):
        with pytest.raises(ConfigError, match="adapter_name"):
            model.add_adapter(bad, LoRAConfig(r=2))
    with pytest.raises(ConfigError, match="no adapter named 'other'"):
        model.set_adapter("other")
    with pytest.raises(ConfigError, match="no adapter named"):
        model.delete_adapter("other")
    with pytest.raises(ConfigError, match="expected a LoRAConfig"):
        model.add_adapter("x", {"r": 2})


def test_tied_modules_to_save_is_refused():
    from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM

    tied = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, tie_word_embeddings=True))
    with pytest.raises(ConfigError, match="tied"):
        tied.add_adapter("a", LoRAConfig(r=2, modules_to_save=["lm_head"]))


def test_adapter_onto_a_base_with_other_shapes(model, tmp_path):
    from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM

    model.add_adapter("a", LoRAConfig(r=2, target_modules=["q_proj"]))
    model.save_adapter(tmp_path)
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(CheckpointError, match=r"shape \(2, 64\) but this model needs \(2, 96\)"):
        wider.load_adapter(tmp_path, adapter_name="a")
    assert wider.list_adapters() == [] and not any("lora" in n for n, _ in wider.named_modules())
    shallower = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(CheckpointError, match="has no place"):
        shallower.load_adapter(tmp_path)
    no_q = tmp_path / "renamed"
    no_q.mkdir()
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (no_q / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["query_key_value"]}))
    (no_q / "adapter_model.safetensors").write_bytes((tmp_path / "adapter_model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="does not fit"):
        model.load_adapter(no_q, adapter_name="b")


def test_bad_adapter_directories(model, tmp_path):
    with pytest.raises(CheckpointError, match="no such directory|not a local directory"):
        model.load_adapter(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        model.load_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]}))
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        model.load_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable"):
        model.load_adapter(tmp_path)


@pytest.mark.parametrize("data, field", [
    ({"peft_type": "IA3"}, "peft_type"),
    ({"peft_type": "LORA", "layers_to_transform": [0]}, "layers_to_transform"),
    ({"peft_type": "LORA", "rank_pattern": {"q_proj": 0}}, "rank_pattern"),
    ({"peft_type": "LORA", "rank_pattern": {"q_proj": 2.5}}, "rank_pattern"),
    ({"peft_type": "LORA", "alpha_pattern": {"(": 2}}, "alpha_pattern"),
    ({"peft_type": "LORA", "alpha_pattern": ["q_proj"]}, "alpha_pattern"),
    ({"peft_type": "LORA", "lora_bias": True, "use_dora": True}, "lora_bias"),
    ({"peft_type": "LORA", "lora_bias": "yes"}, "lora_bias"),
    ({"peft_type": "LORA", "fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"peft_type": "LORA", "task_type": "SEQ_CLS"}, "task_type"),
    ({"peft_type": "LORA", "r": 0}, "r"),
])
def test_peft_configs_seekdeep_cannot_honour_are_refused(data, field):
    with pytest.raises(ConfigError) as info:
        AdapterConfig.from_dict(data, source="adapter_config.json")
    assert info.value.field == field and "adapter_config.json" in str(info.value)


def test_merge_errors(model):
    model.add_adapter("bn", BottleneckConfig(bottleneck_size=2))
    with pytest.raises(ConfigError, match="cannot be merged"):
        model.merge_adapter()
    model.add_adapter("p", PromptTuningConfig(num_virtual_tokens=2))
    model.add_adapter("p2", PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ConfigError, match="one prompt-tuning adapter"):
        model.set_adapter(["p", "p2"])
    with pytest.raises(ConfigError, match="name the one to save"):
        model.set_adapter(["bn", "p"])
        model.save_adapter("unused")


@pytest.mark.parametrize("spec, field", [
    ("r=0", "r"), ("r=x", "lora.r"), ("rank=4", "lora"), ("q_proj", "lora"), ("", "lora"), ("dropout=2", "lora_dropout"),
])
def test_lora_spec_errors(spec, field):
    with pytest.raises(ConfigError) as info:
        parse_lora_spec(spec)
    assert info.value.field == field


def test_lora_spec_parsing():
    cfg = parse_lora_spec("r=16,alpha=32,targets=q_proj,v_proj,dropout=0.05,rslora,dora")
    assert (cfg.r, cfg.lora_alpha, cfg.target_modules, cfg.lora_dropout, cfg.use_rslora, cfg.use_dora) == \
        (16, 32, ["q_proj", "v_proj"], 0.05, True, True)
    assert parse_lora_spec("r=4,targets=all-linear").target_modules == "all-linear"
    assert parse_lora_spec(r"targets=re:.*\.mlp\..*,save=lm_head").target_modules == r".*\.mlp\..*"
    assert parse_lora_spec("targets=q_proj,save=lm_head,embed_tokens").modules_to_save == ["lm_head", "embed_tokens"]


def test_dora_needs_a_visible_weight(model):
    class Opaque(torch.nn.Module):
        in_features, out_features = 64, 64

        def forward(self, x):
            return x

    model.model.layers[0].self_attn.q_proj = Opaque()
    with pytest.raises(ConfigError, match="dequantizable weight"):
        model.add_adapter("d", LoRAConfig(target_modules=["q_proj"], use_dora=True))
    model.add_adapter("plain", LoRAConfig(target_modules=["q_proj"]))  # plain LoRA only needs a forward
    assert isinstance(model.model.layers[0].self_attn.q_proj, seekdeep.peft.LoRALinear)
