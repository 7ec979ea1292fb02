"""Adapters cross between seekdeep and peft: saved by one, loaded by the other on the same base
weights (a transformers model for peft), with the same logits."""

from __future__ import annotations

import json

import pytest
import torch

import seekdeep
from seekdeep.peft import LoRAConfig, PromptTuningConfig

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOL = 1e-4
CASES = {
    "lora": dict(target_modules=["q_proj", "v_proj"]),
    "rslora-dropout": dict(target_modules=["q_proj", "k_proj", "down_proj"], use_rslora=True, lora_dropout=0.1),
    "dora": dict(target_modules=["v_proj", "o_proj", "up_proj"], use_dora=True),
    "all-linear-modules-to-save": dict(target_modules="all-linear", modules_to_save=["lm_head"]),
    "regex": dict(target_modules=r".*\.layers\.1\.self_attn\.(q|v)_proj"),
    "patterns-lora-bias-head": dict(target_modules=["q_proj", "v_proj", "lm_head"], lora_bias=True,
                                    rank_pattern={"lm_head": 2, r"layers\.0\.self_attn\.v_proj": 1},
                                    alpha_pattern={"lm_head": 3}),
}


def _hf(base_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager").eval()


def _max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_into_seekdeep(case, base_dir, model, ids, tmp_path):
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(_hf(base_dir), peft.LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", **CASES[case]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad:  # every adapter tensor, incl. DoRA magnitudes and lm_head copies
                param.add_(torch.randn_like(param) * 0.1)
    peft_model.eval().save_pretrained(tmp_path)
    model.load_adapter(tmp_path, adapter_name="from_peft")
    with torch.no_grad():
        ref = peft_model(ids).logits
        got = model(ids).logits
        base = model.model.embed_tokens.weight.new_zeros(1)
        with model.disable_adapters():
            base = model(ids).logits
    assert _max_diff(ref, base) > 1e-2  # the adapter matters
    assert _max_diff(ref, got) <= TOL
    assert not any(p.requires_grad for p in model.parameters())  # loaded for inference


@pytest.mark.parametrize("case", sorted(CASES))
def test_seekdeep_adapter_loads_into_peft(case, base_dir, model, ids, tmp_path, randomize_adapter):
    model.add_adapter("mine", LoRAConfig(r=4, lora_alpha=8, **CASES[case]))
    randomize_adapter(model, "mine")
    model.eval()
    model.save_adapter(tmp_path, adapter_name="mine")
    peft_model = peft.PeftModel.from_pretrained(_hf(base_dir), tmp_path).eval()
    with torch.no_grad():
        assert _max_diff(peft_model(ids).logits, model(ids).logits) <= TOL


def test_saved_files_match_what_peft_writes(base_dir, model, tmp_path):
    options = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True, modules_to_save=["lm_head"])
    peft.get_peft_model(_hf(base_dir), peft.LoraConfig(task_type="CAUSAL_LM", **options)).save_pretrained(tmp_path / "peft")
    model.add_adapter("default", LoRAConfig(**options))
    model.save_adapter(tmp_path / "ours")
    from safetensors import safe_open

    def keys_and_shapes(path):
        with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    assert keys_and_shapes(tmp_path / "ours") == keys_and_shapes(tmp_path / "peft")
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for key in ("peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_rslora", "use_dora",
                "modules_to_save", "task_type", "fan_in_fan_out", "init_lora_weights"):
        assert ours[key] == theirs[key] or sorted(ours[key]) == sorted(theirs[key]), key
    assert ours["base_model_name_or_path"] == str(base_dir)
    assert set(ours) <= set(theirs)  # nothing peft does not know


def test_prompt_tuning_both_directions(base_dir, model, ids, tmp_path):
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(_hf(base_dir), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    peft_model.eval().save_pretrained(tmp_path / "peft")
    model.load_adapter(tmp_path / "peft", adapter_name="p")
    with torch.no_grad():
        ref = peft_model(ids, labels=ids)
        got = model(ids, labels=ids)
    assert ref.logits.shape[1] == ids.shape[1] + 5 and got.logits.shape[1] == ids.shape[1]  # virtual positions dropped
    assert _max_diff(ref.logits[:, 5:], got.logits) <= TOL
    assert abs(ref.loss.item() - got.loss.item()) <= TOL
    prompt = ids[:1, :4]
    ref_gen = peft_model.generate(input_ids=prompt, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None).tolist() == ref_gen.tolist()

    model.delete_adapter("p")
    model.add_adapter("mine", PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="SAMPLE_VOCAB"))
    model.eval()
    model.save_adapter(tmp_path / "ours", adapter_name="mine")
    back = peft.PeftModel.from_pretrained(_hf(base_dir), tmp_path / "ours").eval()
    with torch.no_grad():
        assert _max_diff(back(ids).logits[:, 3:], model(ids).logits) <= TOL


def test_transformers_integration_keys_without_prefix_load(base_dir, model, ids, tmp_path):
    hf = _hf(base_dir)
    hf.add_adapter(peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False))
    hf.save_pretrained(tmp_path)  # transformers writes the adapter only, keys without base_model.model.
    model.load_adapter(tmp_path)
    with torch.no_grad():
        assert _max_diff(hf(ids).logits, model(ids).logits) <= TOL


def test_seekdeep_model_checkpoint_and_adapter_round_trip(model, ids, tmp_path, randomize_adapter):
    model.add_adapter("a", LoRAConfig(r=2, target_modules="all-linear", use_dora=True))
    randomize_adapter(model, "a")
    model.eval()
    expected = model(ids).logits.detach()
    model.save_adapter(tmp_path / "a")
    fresh = seekdeep.AutoModel.from_pretrained(model.config.source.rsplit("/", 1)[0])
    fresh.load_adapter(tmp_path / "a", adapter_name="a", is_trainable=True)
    assert all(p.requires_grad == (".a." in n) for n, p in fresh.named_parameters())
    with torch.no_grad():
        assert _max_diff(fresh(ids).logits, expected) <= 1e-6
