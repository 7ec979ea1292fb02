"""Embedded, generated, deterministic data for aligning text, image and audio encoders.

- **digits**: scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download) with
  captions such as "the digit seven" / "a handwritten seven" (several templates, so several
  captions per class and several images per caption: retrieval is multi-positive), and a
  synthesised *spoken* digit per image. espeak-ng is not required: each digit word is a fixed
  pattern of two vowel-like syllables (formant pairs on a harmonic source), an optional
  fricative onset and a pitch contour, rendered with per-sample voice variation (pitch,
  vocal-tract length, speed, onset, loudness) and room noise at -4 .. 10 dB SNR. It is a stand-in for speech with
  the right structure (class in the spectral envelope over time, nuisance in pitch and timing),
  not speech.
- **scenes**: two coloured shapes in a spatial relation, drawn with the VLM data's renderer,
  captioned from the scene graph ("a red circle left of a blue square"); layouts are jittered,
  so many images share each caption.

Everything is generated from ``(seed, split, index)``."""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch

from seekdeep.errors import ConfigError

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("the digit {}", "a handwritten {}", "a picture of the number {}", "{}")
PROMPT = "the digit {}"  # the zero-shot classification prompt
SPECIALS = ("<pad>", "<bos>", "<unk>", "<eos>")  # eos is not id 2: CLIP treats eos id 2 as the legacy argmax rule
SPLITS = ("train", "test")

# (F1, F2) of vowel-like sounds in Hz
_VOWELS = [(270, 2290), (530, 1840), (730, 1090), (570, 840), (300, 870), (660, 1720), (490, 1350)]
# per digit: two vowels, fricative onset (0/1), pitch slope (-1 falling, +1 rising)
_WORDS = [(0, 2, 1, -1), (4, 2, 0, -1), (3, 4, 0, 1), (1, 0, 1, -1), (2, 3, 1, 1),
          (6, 1, 1, -1), (5, 0, 1, 1), (1, 4, 1, -1), (5, 6, 0, 1), (2, 0, 0, -1)]


class WordTokenizer:
    """Whitespace word-level tokenizer over a fixed vocabulary (the generated captions use a
    few dozen words): ``<bos> words <eos>`` right-padded with ``<pad>``."""

    def __init__(self, words: Sequence[str]):
        self.vocab = list(SPECIALS) + sorted(set(words) - set(SPECIALS))
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.pad_token_id, self.bos_token_id, self.unk_token_id, self.eos_token_id = range(4)

    def __len__(self) -> int:
        return len(self.vocab)

    def __call__(self, texts: Sequence[str], max_length: int = 16) -> dict[str, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        rows = []
        for text in texts:
            ids = [self.ids.get(w, self.unk_token_id) for w in text.lower().split()][: max_length - 2]
            rows.append([self.bos_token_id, *ids, self.eos_token_id])
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def save_pretrained(self, path) -> None:
        from pathlib import Path

        from seekdeep.files import write_json_atomic

        write_json_atomic(Path(path) / "vocab.json", {"vocab": self.vocab})

    @classmethod
    def from_pretrained(cls, path) -> "WordTokenizer":
        from pathlib import Path

        from seekdeep.files import read_json

        return cls(read_json(Path(path) / "vocab.json")["vocab"])


def caption_words() -> list[str]:
    words = {w for t in TEMPLATES for w in t.replace("{}", "").split()} | set(DIGIT_WORDS)
    words |= {"a", "left", "of", "above"} | set(_SCENE_COLOURS) | set(_SCENE_SHAPES)
    return sorted(words)


def synth_spoken_digit(label: int, rng: np.random.Generator, sample_rate: int = 8000, duration: float = 0.5) -> np.ndarray:
    """One deterministic voice-like rendition of ``label``'s word: (samples,) float32 in [-1, 1]."""
    v1, v2, fricative, slope = _WORDS[label]
    n = int(sample_rate * duration)
    t = np.arange(n) / sample_rate
    f0_base = rng.uniform(90, 230)  # speaker pitch
    tract = rng.uniform(0.88, 1.12)  # vocal-tract length scales every formant
    speed = rng.uniform(0.85, 1.15)
    onset = rng.uniform(0.0, 0.08)
    u = np.clip((t - onset) * speed / (duration * 0.8), 0, 1)  # 0 -> 1 across the word
    f0 = f0_base * (1 + 0.15 * slope * (u - 0.5)) * (1 + 0.01 * rng.standard_normal(n).cumsum() / np.sqrt(n))
    # formants glide from the first vowel to the second around the word's middle
    glide = 1 / (1 + np.exp(-(u - 0.5) * 14))
    f1 = tract * ((1 - glide) * _VOWELS[v1][0] + glide * _VOWELS[v2][0])
    f2 = tract * ((1 - glide) * _VOWELS[v1][1] + glide * _VOWELS[v2][1])
    phase = (2 * np.pi * np.cumsum(f0) / sample_rate).astype(np.float32)
    # harmonics up to 3 kHz (past F2's range the envelope is ~0): (K, n)
    k = np.arange(1, int(min(3000, sample_rate / 2) / (f0_base * 1.1)) + 1, dtype=np.float32)[:, None]
    freq = k * f0[None].astype(np.float32)
    envelope = 1 / (1 + ((freq - f1.astype(np.float32)) / 90) ** 2) + 0.6 / (1 + ((freq - f2.astype(np.float32)) / 120) ** 2)
    voiced = (envelope * np.sin(k * phase[None])).sum(0)
    amp = np.sin(np.pi * u) ** 0.6 * (u > 0) * (u < 1)
    signal = voiced * amp
    if fricative:  # a hiss before the vowel: high-passed noise
        hiss = np.diff(rng.standard_normal(n + 1)) * np.exp(-((t - onset) / 0.04) ** 2) * 0.6
        signal = signal / (np.abs(signal).max() + 1e-9) + hiss
    # room noise at a per-clip SNR of -4 .. 10 dB: the clip alone is an unreliable witness of
    # its digit, so fusing it with the image pays (a clean synthetic word is trivially separable)
    snr = rng.uniform(-4.0, 10.0)
    signal += rng.standard_normal(n) * np.sqrt(np.mean(signal**2) / 10 ** (snr / 10))
    signal = signal / (np.abs(signal).max() + 1e-9) * rng.uniform(0.4, 0.9)
    return np.clip(signal, -1, 1).astype(np.float32)


@dataclass
class AlignedBatch:
    """One modality per field, all over the same N samples (the same order)."""

    pixel_values: torch.Tensor  # (N, 3, H, W)
    input_ids: torch.Tensor  # (N, T)
    attention_mask: torch.Tensor  # (N, T)
    audio: torch.Tensor  # (N, samples)
    labels: torch.Tensor  # (N,)
    captions: list[str]
    caption_ids: torch.Tensor  # (N,) index of the caption string (for multi-positive ground truth)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index) -> "AlignedBatch":
        index = torch.as_tensor(index)
        return AlignedBatch(self.pixel_values[index], self.input_ids[index], self.attention_mask[index], self.audio[index],
                            self.labels[index], [self.captions[i] for i in index.tolist()], self.caption_ids[index])


@lru_cache(maxsize=4)
def _digits_raw():
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def digits_split(split: str, seed: int = 0, test_fraction: float = 0.2) -> np.ndarray:
    if split not in SPLITS:
        raise ConfigError("split", f"unknown split {split!r}; accepted: {', '.join(SPLITS)}")
    _, labels = _digits_raw()
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(len(labels) * test_fraction)
    return np.sort(order[:n_test] if split == "test" else order[n_test:])


def image_processor(image_size: int):
    from seekdeep.multimodal.image_processing import ImageProcessor, ImageProcessorConfig

    return ImageProcessor(ImageProcessorConfig(size={"height": image_size, "width": image_size}, crop_size=None, do_center_crop=False))


def load_digits_aligned(split: str = "train", seed: int = 0, image_size: int = 16, sample_rate: int = 8000, duration: float = 0.5,
                        tokenizer: WordTokenizer | None = None, limit: int | None = None) -> AlignedBatch:
    """The digits split as one :class:`AlignedBatch` (images through the VLM's image processor)."""
    from PIL import Image

    images, labels = _digits_raw()
    index = digits_split(split, seed)[:limit]
    tokenizer = tokenizer or WordTokenizer(caption_words())
    processor = image_processor(image_size)
    pil = [Image.fromarray((images[i] * (255 / 16)).astype(np.uint8)).convert("RGB") for i in index]
    pixels = processor(pil)["pixel_values"]
    captions, audio = [], []
    for i in index:
        rng = np.random.default_rng([seed, int(i)])
        captions.append(TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(DIGIT_WORDS[labels[i]]))
        audio.append(synth_spoken_digit(int(labels[i]), rng, sample_rate, duration))
    tok = tokenizer(captions)
    vocab = sorted(set(captions))
    return AlignedBatch(pixels, tok["input_ids"], tok["attention_mask"], torch.from_numpy(np.stack(audio)),
                        torch.from_numpy(labels[index]), captions, torch.tensor([vocab.index(c) for c in captions]))


_SCENE_COLOURS = ("red", "green", "blue", "yellow")
_SCENE_SHAPES = ("circle", "square", "triangle")


def scene_captions(n: int, split: str = "train", seed: int = 0, image_size: int = 32):
    """``n`` two-object scenes -> (PIL images, captions from the scene graph). Captions repeat
    across scenes (4 colours x 3 shapes x 2 relations), so retrieval has several positives."""
    from seekdeep.multimodal.data import SceneObject, SpatialVQA

    if split not in SPLITS:
        raise ConfigError("split", f"unknown split {split!r}; accepted: {', '.join(SPLITS)}")
    renderer = SpatialVQA(image_size=image_size)
    images, captions = [], []
    for i in range(n):
        rng = random.Random(f"scene:{seed}:{split}:{i}")
        (c1, c2), s1, s2 = rng.sample(_SCENE_COLOURS, 2), rng.choice(_SCENE_SHAPES), rng.choice(_SCENE_SHAPES)
        relation = rng.choice(("left of", "above"))
        a, b = rng.sample(range(4), 2)
        a, b = min(a, b), max(a, b)
        other = rng.randrange(4)
        # first object strictly left of (or above) the second along the relation's axis
        pos1, pos2 = ((a, other), (b, other)) if relation == "left of" else ((other, a), (other, b))
        objects = (SceneObject(c1, s1, *pos1), SceneObject(c2, s2, *pos2))
        images.append(renderer.render(objects, rng))
        captions.append(f"a {c1} {s1} {relation} a {c2} {s2}")
    return images, captions
