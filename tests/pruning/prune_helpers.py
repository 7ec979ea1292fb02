"""Tiny llama-family models for the pruning tests: random (not default) norms, biases and
attention-gate weights, so a weight sliced from the wrong place changes the logits."""

from __future__ import annotations

import torch

from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM

VOCAB = 64

#: name -> LlamaConfig overrides; all have 2 layers and hidden size 32.
VARIANTS = {
    "llama-gqa-bias": dict(num_attention_heads=8, num_key_value_heads=4, head_dim=8, attention_bias=True,
                           mlp_bias=True),
    "qwen2-qkv-bias": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2, qkv_bias=True),
    "qwen3-qk-norm": dict(model_type="qwen3", num_attention_heads=4, num_key_value_heads=2, qk_norm=True, head_dim=12),
    "mha-tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "gated": dict(num_attention_heads=4, num_key_value_heads=2, attention_backend="gated"),
    "dsa": dict(num_attention_heads=4, num_key_value_heads=2, attention_backend="dsa",
                attention_options={"topk": 4, "index_heads": 2, "index_head_dim": 8}),
}


def tiny_model(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    settings = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    settings.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    model.init_weights(std=0.1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "inner.gate_out" in name:
                param.add_(torch.randn_like(param) * 0.2)
    return model.eval()


def token_batches(count: int = 2, batch: int = 2, seq: int = 12, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seq), generator=g) for _ in range(count)]


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits
