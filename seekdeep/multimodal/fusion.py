"""Fusing per-modality encoders for a downstream decision, robust to a missing or corrupted
modality.

- ``concat`` / ``sum``: of the per-modality hidden vectors h_m = tanh(W_m x_m);
- ``gmu``: the gated multimodal unit with one weight per sample and modality,
  alpha = softmax(W [h_1, ..., h_M]) (for two modalities alpha_1 = sigmoid(w . [h_1, h_2] + b),
  the seed's formula), h = sum_m alpha_m h_m;
- ``unified``: no separate towers: every modality's tokens (image patches, audio frames, text
  tokens) get a modality-type embedding and go through ONE shared transformer trunk together.

Every forward takes any subset of modalities, per sample: an absent modality (left out, or
``present[name][i]`` False) is replaced by a learned missing-modality embedding (a learned token
in the unified trunk), so a mixed batch gives each sample what it would get alone. Modality
dropout during training teaches the model to use that embedding."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seekdeep.errors import ConfigError
from seekdeep.validate import check_float, check_int

FUSIONS = ("concat", "sum", "gmu", "unified")


@dataclass
class FusionConfig:
    fusion: str = "gmu"
    modalities: tuple[str, ...] = ("image", "audio")
    hidden_size: int = 32
    num_classes: int = 10
    modality_dropout: float = 0.2
    # > 0: a classifier head per modality on its own h_m, trained with weight aux_weight next to the fused loss
    # (separate towers only): every tower keeps a gradient of its own when the GMU gate saturates on one modality
    aux_weight: float = 0.0
    # > 0: during training the modality ``witness`` (one that alone solves the task, e.g. a clean caption naming the
    # digit) is also removed from this share of samples, on top of modality_dropout: on those samples the others must
    # decide, so a gate saturated on the witness still sends them gradient (the fix aimed at the root, not a side loss)
    witness: str = ""
    witness_dropout: float = 0.0
    # unified trunk
    num_layers: int = 1
    num_heads: int = 4
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise ConfigError("fusion", f"unsupported {self.fusion!r}; accepted: {', '.join(FUSIONS)}")
        self.modalities = tuple(self.modalities)
        if len(self.modalities) < 1 or len(set(self.modalities)) != len(self.modalities):
            raise ConfigError("modalities", f"need one or more distinct names, got {self.modalities!r}")
        for name in ("hidden_size", "num_classes", "num_layers", "num_heads"):
            check_int(name, getattr(self, name), hi=1 << 16)
        check_float("modality_dropout", self.modality_dropout, 0.0, 1.0, hi_open=True)
        check_float("aux_weight", self.aux_weight, 0.0, 100.0)
        check_float("witness_dropout", self.witness_dropout, 0.0, 1.0, hi_open=True)
        if self.witness_dropout > 0 and (self.witness not in self.modalities or len(self.modalities) < 2):
            raise ConfigError("witness", f"witness_dropout needs witness = one of {self.modalities} (and two or more modalities), "
                                         f"got {self.witness!r}")
        if self.aux_weight > 0 and self.fusion == "unified":
            raise ConfigError("aux_weight", "per-modality heads need separate towers; 'unified' has one shared trunk")
        if self.hidden_size % self.num_heads:
            raise ConfigError("num_heads", f"{self.num_heads} must divide hidden_size={self.hidden_size}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["modalities"] = list(self.modalities)
        return d


@dataclass
class FusionOutput:
    logits: torch.Tensor  # (N, classes)
    fused: torch.Tensor  # (N, hidden)
    alpha: torch.Tensor | None  # (N, M) per-sample modality weights (gmu), else None
    aux_logits: dict[str, torch.Tensor] | None = None  # per-modality heads (aux_weight > 0): name -> (N, classes)
    present: dict[str, torch.Tensor] | None = None  # name -> (N,) bool: which samples had the modality
    aux_weight: float = 0.0


def _present_mask(inputs: dict[str, torch.Tensor | None], present: dict[str, torch.Tensor] | None, name: str, n: int,
                  device) -> torch.Tensor:
    if inputs.get(name) is None:
        return torch.zeros(n, dtype=torch.bool, device=device)
    if present is not None and name in present and present[name] is not None:
        mask = present[name].to(device=device, dtype=torch.bool)
        if mask.shape != (n,):
            raise ConfigError("present", f"present[{name!r}] must have shape ({n},), got {tuple(mask.shape)}")
        return mask
    return torch.ones(n, dtype=torch.bool, device=device)


def _batch_size(inputs: dict[str, torch.Tensor | None]) -> tuple[int, torch.device]:
    sizes = {k: v.shape[0] for k, v in inputs.items() if v is not None}
    if not sizes:
        raise ConfigError("inputs", "every modality is missing; give at least one")
    if len(set(sizes.values())) != 1:
        raise ConfigError("inputs", f"modalities disagree on the batch size: {sizes}")
    first = next(v for v in inputs.values() if v is not None)
    return next(iter(sizes.values())), first.device


class FusionClassifier(nn.Module):
    """Separate towers (``towers[name]``: raw input -> (N, D_name)) and a late-fusion head
    (concat / sum / gmu)."""

    def __init__(self, config: FusionConfig, towers: dict[str, nn.Module], dims: dict[str, int]):
        super().__init__()
        if config.fusion == "unified":
            raise ConfigError("fusion", "'unified' has no separate towers: use UnifiedClassifier")
        if set(towers) != set(config.modalities) or set(dims) != set(config.modalities):
            raise ConfigError("towers", f"need one tower and dim per modality {config.modalities}, got {sorted(towers)} / {sorted(dims)}")
        c = self.config = config
        self.towers = nn.ModuleDict(towers)
        self.proj = nn.ModuleDict({m: nn.Linear(dims[m], c.hidden_size) for m in c.modalities})
        self.missing = nn.ParameterDict({m: nn.Parameter(torch.zeros(c.hidden_size)) for m in c.modalities})
        m = len(c.modalities)
        self.gate = nn.Linear(c.hidden_size * m, m) if c.fusion == "gmu" else None
        self.classifier = nn.Linear(c.hidden_size * (m if c.fusion == "concat" else 1), c.num_classes)
        self.aux = nn.ModuleDict({k: nn.Linear(c.hidden_size, c.num_classes) for k in c.modalities}) if c.aux_weight > 0 else None

    def modality_hidden(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """h_m = tanh(W_m tower_m(x)) for modality ``name`` (every sample present). (N, H)"""
        return torch.tanh(self.proj[name](self.towers[name](x)))

    def gate_weights(self, hs: list[torch.Tensor]) -> torch.Tensor:
        """The GMU's per-sample modality weights from the modalities' h_m, in config order. (N, M)"""
        return torch.softmax(self.gate(torch.cat(hs, dim=-1)), dim=-1)

    def forward(self, inputs: dict[str, torch.Tensor | None], present: dict[str, torch.Tensor] | None = None) -> FusionOutput:
        unknown = sorted(set(inputs) - set(self.config.modalities))
        if unknown:
            raise ConfigError("inputs", f"unknown modality {unknown[0]!r}; accepted: {', '.join(self.config.modalities)}")
        n, device = _batch_size(inputs)
        hs, masks = [], {}
        for name in self.config.modalities:
            mask = masks[name] = _present_mask(inputs, present, name, n, device)
            missing = self.missing[name].expand(n, -1)
            if mask.any():
                h = self.modality_hidden(name, inputs[name])  # (N, H)
                h = torch.where(mask[:, None], h, missing)
            else:
                h = missing
            hs.append(h)
        alpha = None
        if self.config.fusion == "concat":
            fused = torch.cat(hs, dim=-1)  # (N, M * H)
        elif self.config.fusion == "sum":
            fused = torch.stack(hs, 0).sum(0)
        else:
            alpha = self.gate_weights(hs)  # (N, M)
            fused = (torch.stack(hs, 1) * alpha[..., None]).sum(1)  # (N, H)
        aux = None if self.aux is None else {k: self.aux[k](h) for k, h in zip(self.config.modalities, hs)}
        return FusionOutput(self.classifier(fused), fused, alpha, aux, masks, self.config.aux_weight)


class UnifiedClassifier(nn.Module):
    """One shared trunk over the concatenated token sequences of every modality.

    ``stems[name]``: raw input -> (N, T_name, hidden_size) tokens (a patch embedding, a conv
    over log-mel frames, a token embedding); ``positions[name]``: their length. A missing
    modality contributes one learned token instead of its tokens (masked out of attention)."""

    def __init__(self, config: FusionConfig, stems: dict[str, nn.Module], lengths: dict[str, int]):
        super().__init__()
        if set(stems) != set(config.modalities):
            raise ConfigError("stems", f"need one stem per modality {config.modalities}, got {sorted(stems)}")
        c = self.config = config
        self.stems = nn.ModuleDict(stems)
        self.lengths = dict(lengths)
        self.positions = nn.ParameterDict({m: nn.Parameter(torch.randn(lengths[m], c.hidden_size) * 0.02) for m in c.modalities})
        self.type_embedding = nn.Embedding(len(c.modalities), c.hidden_size)
        self.missing = nn.ParameterDict({m: nn.Parameter(torch.zeros(c.hidden_size)) for m in c.modalities})
        layer = nn.TransformerEncoderLayer(c.hidden_size, c.num_heads, 2 * c.hidden_size, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.trunk = nn.TransformerEncoder(layer, c.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(c.hidden_size)
        self.classifier = nn.Linear(c.hidden_size, c.num_classes)

    def forward(self, inputs: dict[str, torch.Tensor | None], present: dict[str, torch.Tensor] | None = None) -> FusionOutput:
        unknown = sorted(set(inputs) - set(self.config.modalities))
        if unknown:
            raise ConfigError("inputs", f"unknown modality {unknown[0]!r}; accepted: {', '.join(self.config.modalities)}")
        n, device = _batch_size(inputs)
        tokens, valid = [], []
        for i, name in enumerate(self.config.modalities):
            mask = _present_mask(inputs, present, name, n, device)
            t = self.lengths[name]
            token_valid = torch.ones(n, t, dtype=torch.bool, device=device)
            if mask.any():
                x = self.stems[name](inputs[name])  # (N, T, H), or ((N, T, H), (N, T) valid) for padded text
                if isinstance(x, tuple):
                    x, token_valid = x
                if x.shape[1:] != (t, self.config.hidden_size):
                    raise ConfigError("inputs", f"{name}: stem gave {tuple(x.shape[1:])}, expected ({t}, {self.config.hidden_size})")
            else:
                x = torch.zeros(n, t, self.config.hidden_size, device=device)
            type_emb = self.type_embedding.weight[i]
            tokens += [x + self.positions[name] + type_emb, (self.missing[name] + type_emb).expand(n, 1, -1)]
            valid += [mask[:, None] & token_valid, ~mask[:, None]]
        x = torch.cat(tokens, dim=1)  # (N, sum T + M, H)
        keep = torch.cat(valid, dim=1)  # (N, sum T + M)
        x = self.norm(self.trunk(x, src_key_padding_mask=~keep))
        w = keep[..., None].float()
        fused = (x * w).sum(1) / w.sum(1)
        return FusionOutput(self.classifier(fused), fused, None)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def modality_dropout(n: int, modalities: tuple[str, ...], p: float, generator: torch.Generator | None = None, witness: str = "",
                     witness_p: float = 0.0) -> dict[str, torch.Tensor]:
    """Per-sample ``present`` masks: with probability ``p`` a sample loses one modality chosen
    uniformly; then, with probability ``witness_p``, it also loses ``witness`` (kept where it is
    the only one left: never all of them)."""
    present = {m: torch.ones(n, dtype=torch.bool) for m in modalities}
    if len(modalities) < 2:
        return present
    if p > 0:
        drop = torch.rand(n, generator=generator) < p
        which = torch.randint(len(modalities), (n,), generator=generator)
        for i, m in enumerate(modalities):
            present[m] &= ~(drop & (which == i))
    if witness_p > 0:
        if witness not in modalities:
            raise ConfigError("witness", f"unknown modality {witness!r}; accepted: {', '.join(modalities)}")
        others = torch.stack([present[m] for m in modalities if m != witness]).any(0)
        present[witness] &= ~((torch.rand(n, generator=generator) < witness_p) & others)
    return present


# -- corruptions applied at test time (and as training augmentation)

def corrupt_image(pixels: torch.Tensor, kind: str, level: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``gaussian``: add N(0, level^2) in normalised pixel units; ``occlusion``: a square covering
    ``level`` of the area set to 0 (the data mean after normalisation); ``blank``: all 0."""
    if kind == "gaussian":
        return pixels + level * torch.randn(pixels.shape, generator=generator)
    if kind == "blank":
        return torch.zeros_like(pixels) if level > 0 else pixels
    if kind == "occlusion":
        n, _, h, w = pixels.shape
        side = int(round(math.sqrt(max(0.0, min(1.0, level))) * h))
        if side == 0:
            return pixels
        out = pixels.clone()
        top = torch.randint(0, h - side + 1, (n,), generator=generator)
        left = torch.randint(0, w - side + 1, (n,), generator=generator)
        for i in range(n):
            out[i, :, top[i] : top[i] + side, left[i] : left[i] + side] = 0
        return out
    raise ConfigError("kind", f"unsupported image corruption {kind!r}; accepted: gaussian, occlusion, blank")


def corrupt_audio(waveform: torch.Tensor, snr_db: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """White noise at ``snr_db`` dB signal-to-noise ratio per clip (inf: unchanged)."""
    if math.isinf(snr_db):
        return waveform
    power = waveform.pow(2).mean(-1, keepdim=True).clamp_min(1e-12)
    noise = torch.randn(waveform.shape, generator=generator)
    return waveform + noise * torch.sqrt(power / 10 ** (snr_db / 10))


def corrupt_text(input_ids: torch.Tensor, attention_mask: torch.Tensor, p: float, unk_id: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Each real word token (not the first / end token) replaced by ``unk_id`` with probability p."""
    lengths = attention_mask.sum(-1, keepdim=True)
    pos = torch.arange(input_ids.shape[1])[None]
    word = (pos > 0) & (pos < lengths - 1)
    drop = word & (torch.rand(input_ids.shape, generator=generator) < p)
    return torch.where(drop, torch.full_like(input_ids, unk_id), input_ids)


def fusion_loss(output: FusionOutput, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the fused prediction, plus ``aux_weight`` x the mean over modalities of
    each per-modality head's cross-entropy on the samples that had that modality."""
    loss = F.cross_entropy(output.logits, labels)
    if output.aux_logits:
        terms = []
        for name, logits in output.aux_logits.items():
            mask = output.present[name]
            if mask.any():
                terms.append(F.cross_entropy(logits[mask], labels[mask]))
        if terms:
            loss = loss + output.aux_weight * torch.stack(terms).mean()
    return loss


# -- the image + audio (+ text) models used by `seekdeep align` and benchmarks/multimodal_alignment.py

class ImageTower(nn.Module):
    """The VLM's ViT, pooled (class token after the post-norm)."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vit(pixel_values).pooler_output


class AudioTower(nn.Module):
    """The audio encoder from log-mel features (precomputed once per data set)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode_features(mel)


class TextTower(nn.Module):
    """The aligned encoders' causal text transformer (:mod:`seekdeep.multimodal.clip`), pooled at
    the end token; its input is the padded ``input_ids`` alone (the mask is ``ids != pad``), so
    a text batch is one tensor like the other modalities."""

    def __init__(self, text: nn.Module, pad_token_id: int):
        super().__init__()
        self.text = text
        self.pad_token_id = pad_token_id

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text(input_ids, (input_ids != self.pad_token_id).long())[1]


class TokenStem(nn.Module):
    """Token embeddings for the unified trunk, right-padded to ``length``; pads are masked out."""

    def __init__(self, vocab_size: int, hidden: int, length: int, pad_token_id: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden)
        self.length, self.pad_token_id = length, pad_token_id

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if input_ids.shape[1] > self.length:
            raise ConfigError("inputs", f"text: {input_ids.shape[1]} tokens; accepted: at most {self.length}")
        ids = F.pad(input_ids, (0, self.length - input_ids.shape[1]), value=self.pad_token_id)  # (N, length)
        return self.embed(ids), ids != self.pad_token_id


class PatchStem(nn.Module):
    def __init__(self, channels: int, hidden: int, patch: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, hidden, patch, stride=patch)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.conv(pixel_values).flatten(2).transpose(1, 2)  # (N, P, H)


class MelStem(nn.Module):
    def __init__(self, n_mels: int, hidden: int, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())
        self.conv = nn.Sequential(nn.Conv1d(n_mels, hidden, 3, padding=1), nn.GELU(), nn.Conv1d(hidden, hidden, 3, stride=2, padding=1))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.conv((mel - self.mean[:, None]) / self.std[:, None]).transpose(1, 2)  # (N, T', H)


def build_image_audio_model(config: FusionConfig, image_size: int, mel_shape: tuple[int, int], mel_mean: torch.Tensor,
                            mel_std: torch.Tensor, patch_size: int = 4, tower_layers: int = 1, init_std: float = 0.3,
                            text_vocab_size: int | None = None, text_length: int = 16,
                            text_special_ids: tuple[int, int, int] = (0, 1, 3)) -> nn.Module:
    """Separate towers (a tiny ViT of :mod:`seekdeep.multimodal.vision`, the audio encoder and,
    when ``"text"`` is one of ``config.modalities``, the CLIP text transformer; ``tower_layers``
    blocks each) with a concat / sum / gmu head, or the unified trunk with the same width and
    ``config.num_layers`` blocks shared by every modality. Text needs ``text_vocab_size``;
    ``text_special_ids`` = (pad, bos, eos) of the tokenizer (WordTokenizer's by default)."""
    from seekdeep.multimodal.audio import AudioConfig, AudioEncoder
    from seekdeep.multimodal.config import VisionConfig
    from seekdeep.multimodal.vision import VisionTransformer

    unknown = sorted(set(config.modalities) - {"image", "audio", "text"})
    if unknown:
        raise ConfigError("modalities", f"unknown modality {unknown[0]!r}; accepted: image, audio, text")
    if "text" in config.modalities:
        check_int("text_vocab_size", text_vocab_size, lo=4, hi=1 << 24)
        check_int("text_length", text_length, lo=3, hi=4096)
    h = config.hidden_size
    n_mels, frames = mel_shape
    pad_id, bos_id, eos_id = text_special_ids
    if config.fusion == "unified":
        stems = {"image": lambda: PatchStem(3, h, patch_size), "audio": lambda: MelStem(n_mels, h, mel_mean, mel_std),
                 "text": lambda: TokenStem(text_vocab_size, h, text_length, pad_id)}
        lengths = {"image": (image_size // patch_size) ** 2, "audio": (frames + 1) // 2, "text": text_length}
        return UnifiedClassifier(config, {m: stems[m]() for m in config.modalities}, {m: lengths[m] for m in config.modalities})
    towers = {}
    if "text" in config.modalities:
        from seekdeep.multimodal.clip import ClipTextConfig, ClipTextTransformer

        text = ClipTextTransformer(ClipTextConfig(vocab_size=text_vocab_size, hidden_size=h, intermediate_size=2 * h,
                                                  num_hidden_layers=tower_layers, num_attention_heads=config.num_heads,
                                                  max_position_embeddings=text_length, pad_token_id=pad_id, bos_token_id=bos_id,
                                                  eos_token_id=eos_id))
        with torch.no_grad():  # the same init as the aligned encoders' text tower (ClipModel.init_weights)
            for mod in text.modules():
                if isinstance(mod, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(mod.weight, std=init_std)
                    if getattr(mod, "bias", None) is not None:
                        nn.init.zeros_(mod.bias)
        towers["text"] = TextTower(text, pad_id)
    vit = VisionTransformer(VisionConfig(hidden_size=h, intermediate_size=2 * h, num_hidden_layers=tower_layers, num_attention_heads=config.num_heads,
                                         image_size=image_size, patch_size=patch_size))
    vit.init_weights(std=init_std, position_init="sincos")  # at 0.02 a 32-wide ViT starts collapsed (pooled cos ~0.999)
    audio = AudioEncoder(AudioConfig(n_mels=n_mels, hidden_size=h, num_layers=tower_layers, num_heads=config.num_heads, intermediate_size=2 * h,
                                     projection_dim=h))
    with torch.no_grad():
        audio.feature_mean.copy_(mel_mean)
        audio.feature_std.copy_(mel_std)
    towers.update({"image": ImageTower(vit), "audio": AudioTower(audio)})
    return FusionClassifier(config, {m: towers[m] for m in config.modalities}, {m: h for m in config.modalities})
