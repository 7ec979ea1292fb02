"""Training and probing fusion models under a noisy or missing modality (image + audio digits):
the same corruption augmentation for every variant, accuracy-vs-noise curves with the GMU's
mean alpha per level, accuracy with a modality removed, and the normalised area under the
curve (mean accuracy over the levels / clean accuracy)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from seekdeep.multimodal.audio import AudioConfig, LogMel
from seekdeep.multimodal.fusion import corrupt_audio, corrupt_image, fusion_loss, modality_dropout

IMAGE_NOISE = (0.0, 0.5, 1.0, 2.0, 4.0)  # Gaussian std in normalised pixel units
AUDIO_SNR = (math.inf, 20.0, 10.0, 0.0, -10.0)  # dB
OCCLUSION = (0.0, 0.25, 0.5, 0.75, 1.0)  # fraction of the image area


@dataclass
class FusionData:
    pixel_values: torch.Tensor  # (N, 3, H, W)
    audio: torch.Tensor  # (N, samples) waveforms
    labels: torch.Tensor  # (N,)

    def __len__(self) -> int:
        return len(self.labels)


class Featurizer:
    """Log-mel of (possibly corrupted) waveforms; the towers consume features, not samples."""

    def __init__(self, config: AudioConfig | None = None):
        self.mel = LogMel(config or AudioConfig())

    @torch.no_grad()
    def __call__(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.mel(waveform)


def augment(pixels: torch.Tensor, audio: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """With probability ``p`` per sample, corrupt one modality (chosen evenly) at a random level
    drawn from the test ranges: image Gaussian std U(0, 4) or occlusion U(0, 1), audio SNR U(-10, 30) dB."""
    n = len(pixels)
    hit = torch.rand(n, generator=generator) < p
    image_side = torch.rand(n, generator=generator) < 0.5
    pixels, audio = pixels.clone(), audio.clone()
    idx = torch.nonzero(hit & image_side).flatten()
    if len(idx):
        std = torch.rand(len(idx), 1, 1, 1, generator=generator) * 4
        noisy = pixels[idx] + std * torch.randn(pixels[idx].shape, generator=generator)
        occl = corrupt_image(pixels[idx], "occlusion", float(torch.rand(1, generator=generator)), generator)
        use_occl = (torch.rand(len(idx), generator=generator) < 0.3)[:, None, None, None]
        pixels[idx] = torch.where(use_occl, occl, noisy)
    idx = torch.nonzero(hit & ~image_side).flatten()
    for i in idx.tolist():
        audio[i : i + 1] = corrupt_audio(audio[i : i + 1], float(torch.rand(1, generator=generator)) * 40 - 10, generator)
    return pixels, audio


def train_fusion(model: nn.Module, data: FusionData, featurize: Featurizer, steps: int = 200, batch_size: int = 64, lr: float = 3e-3,
                 seed: int = 0, augment_p: float = 0.5, progress=None) -> list[float]:
    """AdamW on cross-entropy with corruption augmentation and modality dropout; returns losses."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    modalities = model.config.modalities
    losses = []
    model.train()
    for step in range(steps):
        idx = torch.randint(len(data), (batch_size,), generator=g)
        pixels, audio = augment(data.pixel_values[idx], data.audio[idx], g, augment_p)
        inputs = {"image": pixels, "audio": featurize(audio)}
        present = modality_dropout(batch_size, modalities, model.config.modality_dropout, g)
        out = model({m: inputs[m] for m in modalities}, {m: present[m] for m in modalities})
        loss = fusion_loss(out, data.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step, losses[-1])
    model.eval()
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, data: FusionData, featurize: Featurizer, image_kind: str = "gaussian", image_level: float = 0.0,
             audio_snr: float = math.inf, drop: str | None = None, seed: int = 0, batch_size: int = 256) -> dict[str, float]:
    """Accuracy (and the GMU's mean per-modality alpha) with the image corrupted by
    ``image_kind`` at ``image_level``, the audio at ``audio_snr`` dB, or modality ``drop`` removed."""
    g = torch.Generator().manual_seed(10_000 + seed)
    model.eval()
    correct, alphas, preds = 0, [], []
    for start in range(0, len(data), batch_size):
        sl = slice(start, start + batch_size)
        pixels = data.pixel_values[sl]
        if image_level > 0:
            pixels = corrupt_image(pixels, image_kind, image_level, g)
        inputs = {"image": pixels, "audio": featurize(corrupt_audio(data.audio[sl], audio_snr, g))}
        inputs = {m: (None if m == drop else inputs[m]) for m in model.config.modalities}
        if all(v is None for v in inputs.values()):
            raise ValueError(f"dropping {drop!r} leaves no modality")
        out = model(inputs)
        pred = out.logits.argmax(-1)
        preds.append(pred)
        correct += int((pred == data.labels[sl]).sum())
        if out.alpha is not None:
            alphas.append(out.alpha)
    result = {"accuracy": correct / len(data)}
    if alphas:
        alpha = torch.cat(alphas).mean(0)
        result.update({f"alpha_{m}": float(a) for m, a in zip(model.config.modalities, alpha)})
    return result


def noise_curves(model: nn.Module, data: FusionData, featurize: Featurizer, seed: int = 0) -> dict[str, list[dict[str, float]]]:
    """Accuracy (+ alpha) per level for each corruption that applies to the model's modalities."""
    mods = model.config.modalities
    curves: dict[str, list[dict[str, float]]] = {}
    if "image" in mods:
        curves["image_gaussian"] = [{"level": lv, **evaluate(model, data, featurize, "gaussian", lv, seed=seed)} for lv in IMAGE_NOISE]
        curves["image_occlusion"] = [{"level": lv, **evaluate(model, data, featurize, "occlusion", lv, seed=seed)} for lv in OCCLUSION]
    if "audio" in mods:
        curves["audio_snr"] = [{"level": lv, **evaluate(model, data, featurize, audio_snr=lv, seed=seed)} for lv in AUDIO_SNR]
    return curves


def normalised_auc(curve: list[dict[str, float]]) -> float:
    """Trapezoidal area under accuracy over evenly spaced levels, divided by the clean accuracy
    (1.0: no loss at any level; a model that ignores the modality also scores 1.0 - read it next
    to the clean accuracy)."""
    acc = np.array([p["accuracy"] for p in curve])
    if acc[0] <= 0:
        return 0.0
    return float(np.trapezoid(acc, dx=1.0 / (len(acc) - 1)) / acc[0])


def removal_effects(model: nn.Module, data: FusionData, featurize: Featurizer) -> dict[str, float]:
    """Clean accuracy and the accuracy change when each modality is removed (missing embedding)."""
    clean = evaluate(model, data, featurize)["accuracy"]
    out = {"clean": clean}
    if len(model.config.modalities) > 1:
        for m in model.config.modalities:
            out[f"without_{m}"] = evaluate(model, data, featurize, drop=m)["accuracy"] - clean
    return out
