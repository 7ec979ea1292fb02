"""Training and probing fusion models under a noisy or missing modality (image + audio (+ text)
digits): the same corruption augmentation for every variant, accuracy-vs-noise curves with the
GMU's mean alpha per level, accuracy with a modality removed, and the normalised area under the
curve (mean accuracy over the levels / clean accuracy). Text is corrupted by token drop: each
caption word replaced by ``<unk>`` with probability p."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from seekdeep.errors import ConfigError
from seekdeep.multimodal.audio import AudioConfig, LogMel
from seekdeep.multimodal.fusion import corrupt_audio, corrupt_image, corrupt_text, fusion_loss, modality_dropout
from seekdeep.validate import check_float, check_int

IMAGE_NOISE = (0.0, 0.5, 1.0, 2.0, 4.0)  # Gaussian std in normalised pixel units
AUDIO_SNR = (math.inf, 20.0, 10.0, 0.0, -10.0)  # dB
OCCLUSION = (0.0, 0.25, 0.5, 0.75, 1.0)  # fraction of the image area
TEXT_DROP = (0.0, 0.25, 0.5, 0.75, 1.0)  # probability of each caption word becoming <unk>
# Beyond the training augmentation's range (``beyond=True`` in noise_curves), reported apart from the
# in-range area: audio alone still scores ~0.28 at -10 dB, and is at chance only by -30 dB.
IMAGE_NOISE_BEYOND = (8.0, 16.0)
AUDIO_SNR_BEYOND = (-20.0, -30.0)
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class AugmentRange:
    """The training corruption augmentation's severity range: image Gaussian std U(0,
    ``image_std``), occlusion of U(0, ``occlusion``) of the area, audio SNR U(``audio_snr_db``, 30)
    dB, caption word drop U(0, ``text_drop``). The defaults cover every in-range test level; a
    milder range leaves the severe test levels unseen in training (the usual robustness setting:
    the test-time noise is not known when training). Defaults keep the old random stream."""

    image_std: float = 4.0
    occlusion: float = 1.0
    audio_snr_db: float = -10.0
    text_drop: float = 1.0

    def __post_init__(self):
        check_float("image_std", self.image_std, lo=0.0, hi=100.0)
        check_float("occlusion", self.occlusion, lo=0.0, hi=1.0)
        check_float("audio_snr_db", self.audio_snr_db, lo=-60.0, hi=30.0)
        check_float("text_drop", self.text_drop, lo=0.0, hi=1.0)

    def unseen(self, curve: str, level: float) -> bool:
        """Whether a test level of ``curve`` (a noise_curves name) is more severe than any training draw."""
        if curve == "image_gaussian":
            return level > self.image_std
        if curve == "image_occlusion":
            return level > self.occlusion
        if curve == "audio_snr":
            return level < self.audio_snr_db
        if curve == "text_drop":
            return level > self.text_drop
        raise ConfigError("curve", f"unknown {curve!r}; accepted: image_gaussian, image_occlusion, audio_snr, text_drop")


FULL_RANGE = AugmentRange()


@dataclass
class FusionData:
    pixel_values: torch.Tensor  # (N, 3, H, W)
    audio: torch.Tensor  # (N, samples) waveforms
    labels: torch.Tensor  # (N,)
    input_ids: torch.Tensor | None = None  # (N, T) right-padded captions, for models with a text modality
    attention_mask: torch.Tensor | None = None  # (N, T)
    unk_token_id: int = 2

    def __len__(self) -> int:
        return len(self.labels)


class Featurizer:
    """Log-mel of (possibly corrupted) waveforms; the towers consume features, not samples."""

    def __init__(self, config: AudioConfig | None = None):
        self.mel = LogMel(config or AudioConfig())

    @torch.no_grad()
    def __call__(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.mel(waveform)


def _noise_images(pixels: torch.Tensor, generator: torch.Generator, ranges: AugmentRange = FULL_RANGE) -> torch.Tensor:
    """Gaussian std U(0, ranges.image_std), or (30%) an occlusion of U(0, ranges.occlusion) of the area."""
    std = torch.rand(len(pixels), 1, 1, 1, generator=generator) * ranges.image_std
    noisy = pixels + std * torch.randn(pixels.shape, generator=generator)
    occl = corrupt_image(pixels, "occlusion", float(torch.rand(1, generator=generator)) * ranges.occlusion, generator)
    use_occl = (torch.rand(len(pixels), generator=generator) < 0.3)[:, None, None, None]
    return torch.where(use_occl, occl, noisy)


def _noise_audio(audio: torch.Tensor, generator: torch.Generator, ranges: AugmentRange = FULL_RANGE) -> torch.Tensor:
    """White noise at U(ranges.audio_snr_db, 30) dB SNR per clip."""
    span = 30.0 - ranges.audio_snr_db
    return torch.cat([corrupt_audio(audio[i : i + 1], float(torch.rand(1, generator=generator)) * span + ranges.audio_snr_db, generator)
                      for i in range(len(audio))]) if len(audio) else audio


def augment(pixels: torch.Tensor, audio: torch.Tensor, generator: torch.Generator, p: float = 0.5,
            ranges: AugmentRange = FULL_RANGE) -> tuple[torch.Tensor, torch.Tensor]:
    """With probability ``p`` per sample, corrupt one modality (chosen evenly) at a random level
    drawn from ``ranges`` (default: the test ranges, image Gaussian std U(0, 4) or occlusion U(0, 1),
    audio SNR U(-10, 30) dB)."""
    n = len(pixels)
    hit = torch.rand(n, generator=generator) < p
    image_side = torch.rand(n, generator=generator) < 0.5
    pixels, audio = pixels.clone(), audio.clone()
    idx = torch.nonzero(hit & image_side).flatten()
    if len(idx):
        pixels[idx] = _noise_images(pixels[idx], generator, ranges)
    idx = torch.nonzero(hit & ~image_side).flatten()
    if len(idx):
        audio[idx] = _noise_audio(audio[idx], generator, ranges)
    return pixels, audio


def augment_with_text(pixels: torch.Tensor, audio: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, unk_id: int,
                      generator: torch.Generator, p: float = 0.5, modalities: tuple[str, ...] = ("image", "audio", "text"),
                      ranges: AugmentRange = FULL_RANGE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`augment` with text: with probability ``p`` per sample one of the model's
    ``modalities`` (evenly) is corrupted, text by token drop at a rate drawn from U(0, ranges.text_drop)."""
    kinds = [k for k in ("image", "audio", "text") if k in modalities]
    n = len(pixels)
    hit = torch.rand(n, generator=generator) < p
    which = torch.randint(len(kinds), (n,), generator=generator)  # index into kinds
    pixels, audio, input_ids = pixels.clone(), audio.clone(), input_ids.clone()

    def chosen(kind: str) -> torch.Tensor:
        return torch.nonzero(hit & (which == kinds.index(kind))).flatten() if kind in kinds else torch.zeros(0, dtype=torch.long)

    idx = chosen("image")
    if len(idx):
        pixels[idx] = _noise_images(pixels[idx], generator, ranges)
    idx = chosen("audio")
    if len(idx):
        audio[idx] = _noise_audio(audio[idx], generator, ranges)
    idx = chosen("text")
    for i in idx.tolist():  # a drop rate per caption
        rate = float(torch.rand(1, generator=generator)) * ranges.text_drop
        input_ids[i : i + 1] = corrupt_text(input_ids[i : i + 1], attention_mask[i : i + 1], rate, unk_id, generator)
    return pixels, audio, input_ids


def _needs_text(model: nn.Module, data: FusionData) -> bool:
    if "text" not in model.config.modalities:
        return False
    if data.input_ids is None or data.attention_mask is None:
        raise ConfigError("data", "the model has a text modality: FusionData needs input_ids and attention_mask")
    return True


def train_fusion(model: nn.Module, data: FusionData, featurize: Featurizer, steps: int = 200, batch_size: int = 64, lr: float = 3e-3,
                 seed: int = 0, augment_p: float = 0.5, progress=None, schedule: str = "constant", warmup: int = 0,
                 augment_range: AugmentRange = FULL_RANGE) -> list[float]:
    """AdamW on cross-entropy with corruption augmentation (severities from ``augment_range``)
    and modality dropout; returns losses.
    ``schedule="cosine"``: linear warmup over ``warmup`` steps, then cosine decay to 0.1 x ``lr``
    (a constant rate leaves the last iterate noisy: the seed spread then measures where training
    stopped as much as the fusion)."""
    if schedule not in SCHEDULES:
        raise ConfigError("schedule", f"unsupported {schedule!r}; accepted: {', '.join(SCHEDULES)}")
    if not isinstance(augment_range, AugmentRange):
        raise ConfigError("augment_range", f"needs an AugmentRange, got {type(augment_range).__name__}")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = None
    if schedule == "cosine":
        from seekdeep.train import make_scheduler

        scheduler = make_scheduler(opt, warmup, steps)
    modalities = model.config.modalities
    text = _needs_text(model, data)
    losses = []
    model.train()
    for step in range(steps):
        idx = torch.randint(len(data), (batch_size,), generator=g)
        if text:
            pixels, audio, ids = augment_with_text(data.pixel_values[idx], data.audio[idx], data.input_ids[idx], data.attention_mask[idx],
                                                   data.unk_token_id, g, augment_p, modalities, augment_range)
        else:  # two modalities: the augmentation (and its random stream) of the image + audio models
            (pixels, audio), ids = augment(data.pixel_values[idx], data.audio[idx], g, augment_p, augment_range), None
        inputs = {"image": pixels, "audio": featurize(audio), "text": ids}
        present = modality_dropout(batch_size, modalities, model.config.modality_dropout, g, model.config.witness,
                                   model.config.witness_dropout)
        out = model({m: inputs[m] for m in modalities}, {m: present[m] for m in modalities})
        loss = fusion_loss(out, data.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step, losses[-1])
    model.eval()
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, data: FusionData, featurize: Featurizer, image_kind: str = "gaussian", image_level: float = 0.0,
             audio_snr: float = math.inf, drop: str | None = None, seed: int = 0, batch_size: int = 256,
             text_drop: float = 0.0, repeats: int = 1, per_sample: bool = False) -> dict:
    """Accuracy (and the GMU's mean per-modality alpha) with the image corrupted by
    ``image_kind`` at ``image_level``, the audio at ``audio_snr`` dB, caption words dropped to
    ``<unk>`` with probability ``text_drop``, or modality ``drop`` removed; averaged over
    ``repeats`` corruption draws (the first is the ``repeats=1`` draw). ``per_sample``: also
    ``"correct"``, each sample's share of correct draws ((N,) tensor, for a bootstrap over samples)."""
    check_int("repeats", repeats, hi=1000)
    g = torch.Generator().manual_seed(10_000 + seed)
    text = _needs_text(model, data)
    model.eval()
    correct, alphas, hits = 0, [], []
    for start in (s for _ in range(repeats) for s in range(0, len(data), batch_size)):
        sl = slice(start, start + batch_size)
        pixels = data.pixel_values[sl]
        if image_level > 0:
            pixels = corrupt_image(pixels, image_kind, image_level, g)
        inputs = {"image": pixels, "audio": featurize(corrupt_audio(data.audio[sl], audio_snr, g)), "text": None}
        if text:
            ids = data.input_ids[sl]
            inputs["text"] = corrupt_text(ids, data.attention_mask[sl], text_drop, data.unk_token_id, g) if text_drop > 0 else ids
        inputs = {m: (None if m == drop else inputs[m]) for m in model.config.modalities}
        if all(v is None for v in inputs.values()):
            raise ValueError(f"dropping {drop!r} leaves no modality")
        out = model(inputs)
        hit = out.logits.argmax(-1) == data.labels[sl]
        hits.append(hit)
        correct += int(hit.sum())
        if out.alpha is not None:
            alphas.append(out.alpha)
    result = {"accuracy": correct / (len(data) * repeats)}
    if per_sample:
        result["correct"] = torch.cat(hits).view(repeats, len(data)).float().mean(0)  # (N,)
    if alphas:
        alpha = torch.cat(alphas).mean(0)
        result.update({f"alpha_{m}": float(a) for m, a in zip(model.config.modalities, alpha)})
    return result


def noise_curves(model: nn.Module, data: FusionData, featurize: Featurizer, seed: int = 0, repeats: int = 1, beyond: bool = False,
                 per_sample: bool = False) -> dict[str, list[dict]]:
    """Accuracy (+ alpha) per level for each corruption that applies to the model's modalities.
    ``beyond``: the image-noise and audio-SNR curves go on past the training range
    (IMAGE_NOISE_BEYOND, AUDIO_SNR_BEYOND); those points carry ``"beyond": True`` and
    :func:`normalised_auc` leaves them out (see :func:`beyond_area`)."""
    mods = model.config.modalities
    curves: dict[str, list[dict]] = {}
    kw = {"seed": seed, "repeats": repeats, "per_sample": per_sample}
    more_noise, more_snr = (IMAGE_NOISE_BEYOND, AUDIO_SNR_BEYOND) if beyond else ((), ())
    if "image" in mods:
        curves["image_gaussian"] = [{"level": lv, "beyond": lv in more_noise, **evaluate(model, data, featurize, "gaussian", lv, **kw)}
                                    for lv in IMAGE_NOISE + more_noise]
        curves["image_occlusion"] = [{"level": lv, **evaluate(model, data, featurize, "occlusion", lv, **kw)} for lv in OCCLUSION]
    if "audio" in mods:
        curves["audio_snr"] = [{"level": lv, "beyond": lv in more_snr, **evaluate(model, data, featurize, audio_snr=lv, **kw)}
                               for lv in AUDIO_SNR + more_snr]
    if "text" in mods:
        curves["text_drop"] = [{"level": lv, **evaluate(model, data, featurize, text_drop=lv, **kw)} for lv in TEXT_DROP]
    return curves


def normalised_auc(curve: list[dict[str, float]]) -> float:
    """Trapezoidal area under accuracy over evenly spaced levels, divided by the clean accuracy
    (1.0: no loss at any level; a model that ignores the modality also scores 1.0 - read it next
    to the clean accuracy). Points marked ``"beyond"`` (past the training range) are left out."""
    acc = np.array([p["accuracy"] for p in curve if not p.get("beyond")])
    if acc[0] <= 0:
        return 0.0
    return float(np.trapezoid(acc, dx=1.0 / (len(acc) - 1)) / acc[0])


def beyond_area(curve: list[dict[str, float]]) -> float | None:
    """Mean accuracy over the points past the training range, divided by the clean accuracy
    (None when the curve has none): how a model extrapolates to a modality with no information left."""
    beyond = [p["accuracy"] for p in curve if p.get("beyond")]
    if not beyond or curve[0]["accuracy"] <= 0:
        return None
    return float(np.mean(beyond) / curve[0]["accuracy"])


def removal_effects(model: nn.Module, data: FusionData, featurize: Featurizer) -> dict[str, float]:
    """Clean accuracy and the accuracy change when each modality is removed (missing embedding)."""
    clean = evaluate(model, data, featurize)["accuracy"]
    out = {"clean": clean}
    if len(model.config.modalities) > 1:
        for m in model.config.modalities:
            out[f"without_{m}"] = evaluate(model, data, featurize, drop=m)["accuracy"] - clean
    return out


@torch.no_grad()
def logit_contributions(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each modality's additive part of a late-fusion head's logits (every modality present):
    concat ``W_m h_m`` (W's block for modality m), sum ``W h_m``, gmu ``alpha_m W h_m``; they sum
    with the bias to the logits. name -> (N, classes)."""
    from seekdeep.multimodal.fusion import FusionClassifier

    if not isinstance(model, FusionClassifier):
        raise ConfigError("model", f"needs separate towers and a concat / sum / gmu head, got {type(model).__name__}")
    mods = model.config.modalities
    if set(inputs) != set(mods) or any(v is None for v in inputs.values()):
        raise ConfigError("inputs", f"give every modality {mods}, got {sorted(k for k, v in inputs.items() if v is not None)}")
    hs = [model.modality_hidden(m, inputs[m]) for m in mods]  # M x (N, H)
    weight, hidden = model.classifier.weight, model.config.hidden_size  # (C, M*H or H)
    if model.config.fusion == "concat":
        return {m: h @ weight[:, i * hidden : (i + 1) * hidden].T for i, (m, h) in enumerate(zip(mods, hs))}
    if model.config.fusion == "sum":
        return {m: h @ weight.T for m, h in zip(mods, hs)}
    alpha = model.gate_weights(hs)  # (N, M)
    return {m: alpha[:, i : i + 1] * (h @ weight.T) for i, (m, h) in enumerate(zip(mods, hs))}


def logit_shares(contributions: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean over samples of each modality's share of the class-discriminative logit mass: the
    norm of its contribution with the per-sample mean over classes removed (softmax ignores a
    constant), over the sum of those norms. The implicit counterpart of the GMU's alpha, for any
    late-fusion head."""
    norms = torch.stack([(c - c.mean(-1, keepdim=True)).norm(dim=-1) for c in contributions.values()], 1)  # (N, M)
    shares = norms / norms.sum(1, keepdim=True).clamp_min(1e-12)
    return {m: float(s) for m, s in zip(contributions, shares.mean(0))}
