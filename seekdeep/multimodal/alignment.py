"""Objectives that put encoders in one embedding space: symmetric InfoNCE with a learnable
temperature (clamped as open_clip clamps it), SigLIP's pairwise sigmoid loss, similarity and
attention distillation from a teacher, missing-modality prediction, corrupted-modality
detection, and binding through a hub modality (ImageBind: every modality aligned to images
only, so modalities never trained together become comparable through the hub)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seekdeep.errors import ConfigError

MAX_LOGIT_SCALE = math.log(100.0)  # open_clip: the scale never exceeds 100 (temperature >= 0.01)


class LearnableTemperature(nn.Module):
    """``logit_scale`` = log(1 / temperature), initial 1/0.07 (CLIP) or 10 with a bias of -10
    (SigLIP, ``bias_init``). Read through :meth:`scale`, clamped to [1, 100]."""

    def __init__(self, init_temperature: float = 0.07, bias_init: float | None = None):
        super().__init__()
        if not (isinstance(init_temperature, (int, float)) and 0.01 <= init_temperature <= 1.0):
            raise ConfigError("init_temperature", f"got {init_temperature!r}; accepted: a number in [0.01, 1]")
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.logit_bias = nn.Parameter(torch.tensor(float(bias_init))) if bias_init is not None else None

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(0.0, MAX_LOGIT_SCALE).exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        """After an optimizer step (as open_clip does), so the stored value stays in range too."""
        self.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)

    def temperature(self) -> float:
        return float(1.0 / self.scale())


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ConfigError("embeddings", f"need (N, E) and (M, E) with one E, got {tuple(a.shape)} and {tuple(b.shape)}")


def contrastive_logits(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    _check_pair(a, b)
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).t() * scale  # (N, M)


def info_nce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | float, positives: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of pairs (a[i], b[i]). ``positives`` (N, N) booleans marks
    other pairs that are also matches (a shared caption): the target then spreads evenly over
    them instead of calling them negatives. At init (unrelated embeddings) the loss is ~ln N."""
    logits = contrastive_logits(a, b, scale)
    if logits.shape[0] != logits.shape[1]:
        raise ConfigError("embeddings", f"info_nce needs paired batches, got {tuple(logits.shape)}")
    if positives is None:
        target = torch.arange(len(logits), device=logits.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    pos = positives.to(logits.device).bool() | torch.eye(len(logits), dtype=torch.bool, device=logits.device)
    t_row = pos.float() / pos.sum(1, keepdim=True)
    t_col = pos.t().float() / pos.t().sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, t_row) + F.cross_entropy(logits.t(), t_col))


def siglip_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | float, bias: torch.Tensor | float,
                positives: torch.Tensor | None = None) -> torch.Tensor:
    """SigLIP: every (a_i, b_j) is an independent binary match / non-match decision,
    -sum log sigmoid(z_ij * (scale * cos_ij + bias)) / N with z = +1 on matches, -1 elsewhere."""
    logits = contrastive_logits(a, b, scale) + bias
    pos = torch.eye(logits.shape[0], logits.shape[1], dtype=torch.bool, device=logits.device)
    if positives is not None:
        pos = pos | positives.to(logits.device).bool()
    z = pos.float() * 2 - 1
    return -F.logsigmoid(z * logits).sum() / logits.shape[0]


def similarity_distillation(student_a: torch.Tensor, student_b: torch.Tensor, teacher_a: torch.Tensor, teacher_b: torch.Tensor,
                            temperature: float = 0.1) -> torch.Tensor:
    """KL(teacher || student) of the row- and column-softmaxed cross-modal similarity matrices:
    the student learns the teacher's full ranking, not only the matching pairs."""
    s = contrastive_logits(student_a, student_b, 1.0 / temperature)
    with torch.no_grad():
        t = contrastive_logits(teacher_a, teacher_b, 1.0 / temperature)
    if s.shape != t.shape:
        raise ConfigError("teacher", f"similarity shapes differ: student {tuple(s.shape)}, teacher {tuple(t.shape)}")
    kl = lambda x, y: F.kl_div(F.log_softmax(x, -1), F.log_softmax(y, -1), log_target=True, reduction="batchmean")  # noqa: E731
    return 0.5 * (kl(s, t) + kl(s.t(), t.t()))


def attention_distillation(student_attn: torch.Tensor, teacher_attn: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KL(teacher || student) between cross-attention maps (..., queries, keys), rows summing to 1."""
    if student_attn.shape != teacher_attn.shape:
        raise ConfigError("teacher_attn", f"shape {tuple(teacher_attn.shape)} must equal the student's {tuple(student_attn.shape)}")
    t = teacher_attn.detach().clamp_min(eps)
    return (t * (t.log() - student_attn.clamp_min(eps).log())).sum(-1).mean()


class ModalityPredictor(nn.Module):
    """Predicts a missing modality's embedding from the present one (an MLP); trained with
    1 - cosine to the real embedding, used to fill in a modality absent at test time."""

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or 2 * dim
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, present: torch.Tensor) -> torch.Tensor:
        return self.net(present)

    def loss(self, present: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (1 - F.cosine_similarity(self(present), target.detach(), dim=-1)).mean()


class CorruptionDetector(nn.Module):
    """From the concatenated per-modality embeddings, one logit per modality: was it corrupted?"""

    def __init__(self, dim: int, num_modalities: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim * num_modalities, dim), nn.GELU(), nn.Linear(dim, num_modalities))

    def forward(self, embeds: list[torch.Tensor]) -> torch.Tensor:
        return self.net(torch.cat(embeds, dim=-1))  # (N, M)

    def loss(self, embeds: list[torch.Tensor], corrupted: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(self(embeds), corrupted.float())


def hub_binding_loss(embeds: dict[str, torch.Tensor], scale: torch.Tensor | float, hub: str = "image",
                     positives: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """InfoNCE of every modality against ``hub`` only (no other pair is ever trained):
    ``{"audio~image": loss, "text~image": loss}``."""
    if hub not in embeds:
        raise ConfigError("hub", f"{hub!r} is not among the modalities {sorted(embeds)}")
    return {f"{name}~{hub}": info_nce(x, embeds[hub], scale, positives) for name, x in embeds.items() if name != hub}
