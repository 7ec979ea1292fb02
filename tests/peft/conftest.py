"""Tiny llama bases shared by the PEFT tests: one saved by transformers (for the peft interop
tests) and seekdeep models loaded from it."""

from __future__ import annotations

import pytest
import torch

import seekdeep

VOCAB = 96
HF_CONFIG = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256)


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
    """A tiny transformers LlamaForCausalLM (untied head, non-trivial norms) saved to disk."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**HF_CONFIG), attn_implementation="eager")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    path = tmp_path_factory.mktemp("hf-base")
    model.save_pretrained(path)
    return path


@pytest.fixture
def model(base_dir):
    return seekdeep.AutoModel.from_pretrained(base_dir)


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))


def _randomize_adapter(model, adapter_name: str, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model._adapter_parameters(adapter_name):
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)


@pytest.fixture
def randomize_adapter():
    """``randomize_adapter(model, name, seed=0)``: give every tensor of an adapter random values,
    so a missed or mis-scaled one shows."""
    return _randomize_adapter
