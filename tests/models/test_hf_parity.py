"""Each family against Hugging Face transformers (the reference implementation): load a
checkpoint saved by transformers and compare logits and greedy generations, then the reverse."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import seekdeep  # noqa: E402

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

LLAMA_CASES = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, attention_bias=True, mlp_bias=True),
    "llama-rope-llama3-tied": lambda: transformers.LlamaConfig(
        **COMMON, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=7),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=24),
}


def _hf_model(make_config):
    torch.manual_seed(0)
    config = make_config()
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # non-trivial norms and biases so a missed weight shows up
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_hf_checkpoint_loads_with_same_logits_and_generation(case, tmp_path):
    hf = _hf_model(LLAMA_CASES[case])
    hf.save_pretrained(tmp_path)
    ours = seekdeep.AutoModel.from_pretrained(tmp_path)
    ids = torch.randint(0, 96, (2, 19))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids).logits
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-4
    prompt = ids[:1, :5]
    ref_gen = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    got_gen = ours.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert got_gen.tolist() == ref_gen.tolist()


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_seekdeep_checkpoint_loads_in_transformers(case, tmp_path):
    hf = _hf_model(LLAMA_CASES[case])
    hf.save_pretrained(tmp_path / "hf")
    ours = seekdeep.AutoModel.from_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours", max_shard_size="20KB")
    assert (tmp_path / "ours" / "model.safetensors.index.json").is_file()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    ids = torch.randint(0, 96, (1, 17))
    with torch.no_grad():
        assert (back(ids).logits - ours(ids).logits).abs().max().item() <= 1e-4
