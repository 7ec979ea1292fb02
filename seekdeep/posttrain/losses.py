"""The objectives of post-training: per-token log-probabilities, GRPO's group-normalised
advantages and clipped objective with a KL penalty (DeepSeekMath, arXiv 2402.03300, eq. 3-4),
and DPO (Rafailov et al., arXiv 2305.18290, eq. 7)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """log p(token t | tokens < t) for t = 1..T-1: (B, T-1), float32."""
    logits = model(input_ids, attention_mask=attention_mask).logits[:, :-1].float()  # (B, T-1, V)
    return torch.gather(F.log_softmax(logits, -1), 2, input_ids[:, 1:, None]).squeeze(2)  # (B, T-1)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(r - mean of its group) / (std of its group + eps), (N * G,) -> (N * G,).

    Rewards come grouped (the G completions of a prompt next to each other). NaN marks a
    skipped sample: it is left out of its group's statistics and gets advantage 0. A group whose
    rewards are all equal (or with fewer than two valid samples) carries no signal: advantage 0.
    """
    groups = rewards.reshape(-1, group_size).double()  # (N, G)
    valid = ~torch.isnan(groups)
    count = valid.sum(1, keepdim=True)
    filled = torch.where(valid, groups, 0.0)
    mean = filled.sum(1, keepdim=True) / count.clamp(min=1)
    var = torch.where(valid, (groups - mean) ** 2, 0.0).sum(1, keepdim=True) / (count - 1).clamp(min=1)
    adv = (groups - mean) / (var.sqrt() + eps)
    adv = torch.where(valid & (count >= 2) & (var > 0), adv, 0.0)
    return adv.reshape(-1).to(rewards.dtype)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, clip_eps: float = 0.2, kl_beta: float = 0.04) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO's objective, to minimise. All (B, T) over completion tokens except ``advantages`` (B,).

    Per token: ``min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) - beta * KL`` with
    ``ratio = exp(logp - old_logp)`` and the unbiased, non-negative KL estimate
    ``exp(ref - logp) - (ref - logp) - 1``; averaged over each completion's tokens, then over
    completions, and negated. ``mask``: 1 on completion tokens (0 on prompt, padding, skipped).
    """
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None].to(logp.dtype)
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    log_ref_ratio = ref_logp - logp
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
    per_token = surrogate - kl_beta * kl
    lengths = mask.sum(1)
    rows = lengths > 0
    per_seq = (per_token * mask).sum(1)[rows] / lengths[rows]
    loss = -per_seq.mean() if bool(rows.any()) else logp.sum() * 0.0
    with torch.no_grad():
        denom = mask.sum().clamp(min=1)
        clipped = ((ratio - 1).abs() > clip_eps).to(logp.dtype)
        stats = {"kl": float((kl * mask).sum() / denom), "clip_fraction": float((clipped * mask).sum() / denom)}
    return loss, stats


def dpo_loss(chosen_logp: torch.Tensor, rejected_logp: torch.Tensor, ref_chosen_logp: torch.Tensor,
             ref_rejected_logp: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO's loss from sequence log-probabilities (B,) of the chosen / rejected completions
    under the policy and the reference: ``-log sigmoid(beta * (chosen margin - rejected margin))``."""
    chosen_reward = beta * (chosen_logp - ref_chosen_logp)
    rejected_reward = beta * (rejected_logp - ref_rejected_logp)
    logits = chosen_reward - rejected_reward
    loss = -F.logsigmoid(logits).mean()
    with torch.no_grad():
        stats = {"accuracy": float((logits > 0).float().mean()), "margin": float(logits.mean()),
                 "chosen_reward": float(chosen_reward.mean()), "rejected_reward": float(rejected_reward.mean())}
    return loss, stats
