"""The knowledge-distillation loss (Hinton et al., 2015) on next-token logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from seekdeep.distill.config import check_alpha, check_temperature


@dataclass
class DistillLoss:
    """``total`` is what to backpropagate; ``kl`` and ``ce`` are its parts, per predicted token:
    ``total = alpha * T**2 * kl + (1 - alpha) * ce``. ``tokens``: how many positions counted."""

    total: torch.Tensor
    kl: torch.Tensor
    ce: torch.Tensor
    tokens: int

    def to_dict(self) -> dict[str, float]:
        return {"total": float(self.total.detach()), "kl": float(self.kl.detach()), "ce": float(self.ce.detach()),
                "tokens": self.tokens}


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 2.0,
    alpha: float = 0.5,
    *,
    attention_mask: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> DistillLoss:
    """``alpha * T**2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE``.

    Shapes: logits (B, T, V), ``labels`` and ``attention_mask`` (B, T). As in
    ``CausalLM.forward``, labels are shifted inside: the logits at position t are scored
    against ``labels[:, t + 1]``, so the last position is not used. Both terms average over
    the same positions: those whose target is not ``ignore_index`` and, with an
    ``attention_mask``, whose own and target tokens are both attended. The T**2 factor keeps
    the gradient of the KL term on the scale of the CE term's as T changes. The teacher's
    logits are detached, so no gradient reaches the teacher. Computed in float32.
    """
    temperature = check_temperature(temperature)
    alpha = check_alpha(alpha)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"teacher_logits: shape {tuple(teacher_logits.shape)} differs from the student's "
                         f"{tuple(student_logits.shape)}; teacher and student must share the vocabulary")
    if student_logits.dim() != 3 or labels.shape != student_logits.shape[:2]:
        raise ValueError(f"labels: expected shape {tuple(student_logits.shape[:2])} (batch, seq) for logits of "
                         f"shape {tuple(student_logits.shape)}, got {tuple(labels.shape)}")
    targets = labels[:, 1:]  # (B, T-1)
    valid = targets != ignore_index  # (B, T-1)
    if attention_mask is not None:
        if attention_mask.shape != labels.shape:
            raise ValueError(f"attention_mask: expected shape {tuple(labels.shape)}, got {tuple(attention_mask.shape)}")
        attended = attention_mask.bool()
        valid = valid & attended[:, 1:] & attended[:, :-1]
    count = int(valid.sum())
    denominator = max(count, 1)  # a batch with nothing to score gives zeros, not NaN

    student = student_logits[:, :-1].float()  # (B, T-1, V)
    teacher = teacher_logits[:, :-1].detach().float()  # (B, T-1, V)
    ce_per_token = F.cross_entropy(
        student.flatten(0, 1), targets.masked_fill(~valid, ignore_index).flatten(), ignore_index=ignore_index,
        reduction="none",
    )  # (B*(T-1),)
    ce = ce_per_token.sum() / denominator
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
    kl_per_token = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(-1)  # (B, T-1)
    kl = (kl_per_token * valid).sum() / denominator
    total = alpha * temperature**2 * kl + (1 - alpha) * ce
    return DistillLoss(total=total, kl=kl, ce=ce, tokens=count)
