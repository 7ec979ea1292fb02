"""Recovery fine-tune of a pruned model: the held-out loss goes down, the backend stays
frozen, flags and mode come back, and TokenWindows-like sources work."""

from __future__ import annotations

import torch
from prune_helpers import VOCAB, logits, tiny_model

from seekdeep.pruning import PruneConfig, prune, recover


def patterned(count: int, seed: int, batch: int = 4, seq: int = 24) -> list[torch.Tensor]:
    """Arithmetic sequences mod VOCAB with a per-row step of 1..3: learnable in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        start = torch.randint(0, VOCAB, (batch, 1), generator=g)
        step = torch.randint(1, 4, (batch, 1), generator=g)
        out.append((start + step * torch.arange(seq)) % VOCAB)
    return out


class _Windows:
    """Duck-typed TokenWindows: ``next_batch()`` for training, ``eval_batches(n)`` for held-out."""

    def __init__(self, batches):
        self.batches, self.calls = batches, 0

    def next_batch(self):
        self.calls += 1
        return self.batches[(self.calls - 1) % len(self.batches)]

    def eval_batches(self, max_batches):
        return iter(self.batches[:max_batches])


def test_recovery_lowers_held_out_loss_and_leaves_the_rest_as_it_was():
    model = tiny_model(attention_backend="gated")
    pruned, _ = prune(model, PruneConfig(ratio=0.4))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    gate = pruned.model.layers[0].self_attn.inner.gate_out.weight.detach().clone()
    pruned.lm_head.weight.requires_grad_(False)  # a caller's flag, restored afterwards
    report = recover(pruned, patterned(8, seed=0), steps=20, lr=3e-3, eval_data=patterned(2, seed=1),
                     eval_batches=2)
    assert len(report.train_losses) == 20
    assert report.eval_loss_after < report.eval_loss_before - 0.5
    assert report.to_dict()["eval_loss_after"] == report.eval_loss_after
    assert torch.equal(pruned.model.layers[0].self_attn.inner.gate_out.weight, gate)  # backend frozen
    assert not pruned.lm_head.weight.requires_grad
    assert pruned.model.embed_tokens.weight.requires_grad
    assert not pruned.training
    for key, value in model.state_dict().items():  # the unpruned model shares nothing with it
        assert torch.equal(value, original[key]), key


def test_recovery_reads_token_windows():
    model = tiny_model()
    pruned, _ = prune(model, PruneConfig(mlp_ratio=0.5))
    before = logits(pruned, patterned(1, seed=3)[0])
    windows = _Windows(patterned(3, seed=2))
    report = recover(pruned, windows, steps=4, lr=1e-3, warmup_steps=0, eval_data=windows, eval_batches=1)
    assert windows.calls == 4
    assert report.eval_loss_before is not None and report.eval_loss_after is not None
    assert not torch.equal(logits(pruned, patterned(1, seed=3)[0]), before)
