"""Tiny models and tolerances shared by the quantisation tests."""

from __future__ import annotations

import torch

from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM

VOCAB = 96


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """2 layers, hidden 128, intermediate 384: every linear takes group sizes 32 / 64 / 128."""
    torch.manual_seed(seed)
    config = LlamaConfig.from_name("tiny", vocab_size=VOCAB, max_position_embeddings=64, **overrides)
    model = LlamaForCausalLM(config)
    model.init_weights(std=0.05)
    return model.eval()


def token_batches(count: int = 3, batch: int = 2, seq: int = 16, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seq), generator=g) for _ in range(count)]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().float(), expected.detach().float()
    return float((actual - expected).norm() / expected.norm())


def patterned_batches(count: int = 4, batch: int = 4, seq: int = 32, seed: int = 0) -> list[torch.Tensor]:
    """Arithmetic sequences mod VOCAB with a per-row step of 1..3: learnable in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        start = torch.randint(0, VOCAB, (batch, 1), generator=g)
        step = torch.randint(1, 4, (batch, 1), generator=g)
        out.append((start + step * torch.arange(seq)) % VOCAB)
    return out

