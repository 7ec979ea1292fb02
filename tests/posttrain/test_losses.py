"""GRPO and DPO objectives against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from seekdeep.posttrain.losses import dpo_loss, group_advantages, grpo_loss, token_logprobs

L = math.log


def test_grpo_clipped_objective_matches_a_hand_computed_case():
    logp = torch.tensor([[L(.5), L(.25)], [L(.2), L(.9)]], requires_grad=True)
    old = torch.tensor([[L(.4), L(.25)], [L(.4), L(.9)]])
    ref = torch.tensor([[L(.5), L(.5)], [L(.1), L(.3)]])
    mask = torch.tensor([[1, 1], [1, 0]])  # the second row's last token is padding
    loss, stats = grpo_loss(logp, old, ref, torch.tensor([1.0, -2.0]), mask, clip_eps=0.2, kl_beta=0.1)
    # row 0: ratio 1.25 -> clipped to 1.2 (A > 0), KL 0; ratio 1, KL 2 - ln 2 - 1
    row0 = (1.2 + (1 - 0.1 * (1 - L(2)))) / 2
    # row 1: ratio 0.5 with A = -2: min(-1.0, 0.8 * -2) = -1.6; KL 0.5 + ln 2 - 1
    row1 = -1.6 - 0.1 * (0.5 + L(2) - 1)
    assert float(loss.detach()) == pytest.approx(-(row0 + row1) / 2, abs=1e-6)
    assert stats["clip_fraction"] == pytest.approx(2 / 3)
    assert stats["kl"] == pytest.approx(((1 - L(2)) + (0.5 + L(2) - 1)) / 3, abs=1e-6)
    loss.backward()
    grad = logp.grad
    # clipped tokens pass no policy gradient (their KL gradient is 0 at row 0: ref == logp)
    assert float(grad[0, 0]) == pytest.approx(0.0, abs=1e-7)
    assert float(grad[1, 1]) == 0.0  # masked
    # unclipped token of row 0: d/dlogp of -(ratio * A - beta * KL) / 2 / 2 rows
    assert float(grad[0, 1]) == pytest.approx(-(1 - 0.1 * (1 - 2)) / 4, abs=1e-6)


def test_grpo_with_ratio_one_is_the_advantage_weighted_likelihood():
    torch.manual_seed(0)
    logp = torch.randn(4, 5).clamp(max=-0.1).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, 0.5, 0.0])
    loss, _ = grpo_loss(logp, logp.detach(), logp.detach(), adv, torch.ones(4, 5), kl_beta=0.0)
    loss.backward()
    assert torch.allclose(logp.grad, -adv[:, None].expand(4, 5) / 5 / 4)


def test_group_advantages_normalise_within_each_group():
    nan = float("nan")
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0, nan, 1.0, 3.0, nan, 4.0, nan])
    adv = group_advantages(rewards, 3, eps=0.0)
    assert adv[:3].tolist() == pytest.approx([-1.0, 0.0, 1.0])  # mean 2, std 1
    assert adv[3:6].tolist() == [0.0, 0.0, 0.0]  # equal rewards: no signal
    assert adv[6:9].tolist() == pytest.approx([0.0, -1 / math.sqrt(2), 1 / math.sqrt(2)])  # the skipped sample left out
    assert adv[9:].tolist() == [0.0, 0.0, 0.0]  # one valid sample: nothing to compare with
    # invariant to shifting and scaling one group's rewards; groups do not mix
    moved = rewards.clone()
    moved[:3] = moved[:3] * 10 + 7
    assert torch.allclose(group_advantages(moved, 3, eps=0.0), adv)


def test_dpo_loss_hand_computed():
    loss, stats = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5)
    assert float(loss) == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-6)
    assert stats["accuracy"] == 1.0 and stats["margin"] == pytest.approx(1.0)
    # equal policy and reference: loss ln 2 whatever the sequences
    same = torch.tensor([-4.0, -1.0])
    assert float(dpo_loss(same, same.flip(0), same, same.flip(0))[0]) == pytest.approx(math.log(2))


def test_token_logprobs_are_the_models_next_token_probabilities():
    from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    model.init_weights()
    ids = torch.randint(0, 50, (2, 7))
    lp = token_logprobs(model, ids)
    expected = -torch.nn.functional.cross_entropy(model(ids).logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1),
                                                  reduction="none").reshape(2, 6)
    assert torch.allclose(lp, expected, atol=1e-5)
