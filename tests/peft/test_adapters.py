"""Bottleneck (Houlsby) adapters and prompt tuning on seekdeep models."""

from __future__ import annotations

import pytest
import torch

import seekdeep
from seekdeep.errors import ConfigError
from seekdeep.peft import BottleneckConfig, BottleneckLayer, LoRAConfig, PromptTuningConfig


def _train(model, ids, steps=8, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def test_bottleneck_starts_as_identity_trains_and_round_trips(model, ids, tmp_path):
    with torch.no_grad():
        base = model(ids).logits
    model.add_adapter("houlsby", BottleneckConfig(bottleneck_size=8, non_linearity="relu"))
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, BottleneckLayer) and isinstance(model.model.layers[0].self_attn.o_proj, BottleneckLayer)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
    report = model.trainable_parameters_report()
    assert report["trainable"] == 4 * (64 * 8 + 8 + 8 * 64 + 64)  # 2 layers x (attention, MLP)
    losses = _train(model, ids)
    assert losses[-1] < losses[0] - 0.05
    with torch.no_grad():
        adapted = model(ids).logits
    model.save_adapter(tmp_path)
    fresh = seekdeep.AutoModel.from_pretrained(model.config.source.rsplit("/", 1)[0])
    fresh.load_adapter(tmp_path, adapter_name="houlsby")
    with torch.no_grad():
        assert torch.allclose(fresh(ids).logits, adapted, atol=1e-6)
    with pytest.raises(ConfigError, match="cannot be merged"):
        fresh.merge_and_unload()


def test_bottleneck_and_lora_on_different_modules_together(model, ids, randomize_adapter):
    model.add_adapter("bn", BottleneckConfig(bottleneck_size=4))
    model.add_adapter("lora", LoRAConfig(r=2, target_modules=["q_proj"]))
    randomize_adapter(model, "bn")
    randomize_adapter(model, "lora", seed=3)
    model.set_adapter(["bn", "lora"])
    with torch.no_grad():
        both = model(ids).logits
        with model.use_adapter("bn"):
            only_bn = model(ids).logits
    assert not torch.allclose(both, only_bn)
    with pytest.raises(ConfigError, match="already carries a bottleneck"):
        model.add_adapter("clash", LoRAConfig(r=2, target_modules=["o_proj"]))


def test_prompt_tuning_trains_and_generates(model, ids):
    with torch.no_grad():
        base = model(ids, labels=ids)
    model.add_adapter("prompt", PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="SAMPLE_VOCAB"))
    assert model.trainable_parameters_report()["trainable"] == 4 * 64
    with torch.no_grad():
        out = model(ids, labels=ids, attention_mask=torch.ones_like(ids))
    assert out.logits.shape == base.logits.shape and out.hidden_states.shape == base.hidden_states.shape
    losses = _train(model, ids, lr=5e-2)
    assert losses[-1] < losses[0] - 0.05
    # generation through the KV cache equals recomputing the full sequence each step
    prompt = ids[:1, :5]
    generated = model.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None)
    seq = prompt
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert generated.tolist() == seq.tolist()
    with model.disable_adapters(), torch.no_grad():
        assert torch.equal(model(ids).logits, base.logits)
    import copy

    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.prompt_encoder["prompt"].embedding.weight.add_(1.0)  # the clone routes through its own prompt
        assert not torch.allclose(clone(ids).logits, model(ids).logits)


def test_prompt_tuning_with_padding_and_explicit_positions(model, ids):
    model.add_adapter("prompt", PromptTuningConfig(num_virtual_tokens=3))
    model.eval()
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding on row 1
    with torch.no_grad():
        plain = model(ids, attention_mask=mask).logits
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        explicit = model(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()  # pad positions are never attended to; their own outputs do not matter
    assert torch.allclose(plain[real], explicit[real], atol=1e-5)


def test_text_initialised_prompt(tmp_path, model):
    from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM
    from seekdeep.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(iter(["def add(a, b):\n    return a + b\n"] * 20), vocab_size=300)
    tokenizer.save_pretrained(tmp_path)
    config = PromptTuningConfig(num_virtual_tokens=6, prompt_tuning_init="TEXT", prompt_tuning_init_text="def add",
                                tokenizer_name_or_path=str(tmp_path))
    with pytest.raises(ConfigError, match="vocabulary size 96"):  # this tokenizer does not belong to that model
        model.add_adapter("text", config)
    assert model.list_adapters() == []
    small = LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2))
    small.add_adapter("text", config)
    ids = (tokenizer.encode("def add") * 6)[:6]
    assert torch.equal(small.prompt_encoder["text"].embedding.weight, small.model.embed_tokens.weight[torch.tensor(ids)])
