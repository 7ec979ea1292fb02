"""Text + images -> model inputs, and batches where any sample has zero, one or several images.

``MultimodalProcessor`` expands each ``<image>`` in a text to the number of placeholder tokens
the model needs per image (``config.tokens_per_image`` for the LLaVA prefix path, one marker
for gated cross-attention) and turns the images into ``pixel_values``; ``collate`` pads the
samples (left for generation, right for training) and concatenates their images in the
order their placeholders appear, as the model expects."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from seekdeep.errors import ConfigError
from seekdeep.multimodal.image_processing import ImageProcessor

IMAGE_TOKEN = "<image>"


def tokens_per_image(config) -> int:
    return 1 if config.cross_attention is not None else config.tokens_per_image


class MultimodalProcessor:
    def __init__(self, tokenizer, image_processor: ImageProcessor, image_token_id: int, tokens_per_image: int,
                 image_token: str = IMAGE_TOKEN, add_bos: bool = True):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token = image_token
        self.image_token_id = image_token_id
        self.tokens_per_image = tokens_per_image
        self.add_bos = add_bos

    @classmethod
    def for_model(cls, model, tokenizer, image_processor: ImageProcessor, **kwargs: Any) -> "MultimodalProcessor":
        return cls(tokenizer, image_processor, model.config.image_token_index, tokens_per_image(model.config), **kwargs)

    def encode(self, text: str, images: Sequence[Any] = ()) -> dict[str, Any]:
        """One sample: ``{"input_ids": [...], "pixel_values": (n, 3, H, W) or None}``."""
        if not isinstance(text, str):
            raise ConfigError("text", f"must be a string, got {type(text).__name__}")
        pieces = text.split(self.image_token)
        if len(pieces) - 1 != len(images):
            raise ConfigError("images", f"the text has {len(pieces) - 1} {self.image_token!r} placeholder(s) but {len(images)} image(s) were given")
        ids: list[int] = []
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if self.add_bos and bos is not None:
            ids.append(bos)
        for i, piece in enumerate(pieces):
            if piece.strip():
                ids.extend(self.tokenizer.encode(piece, add_special_tokens=False))
            if i < len(images):
                ids.extend([self.image_token_id] * self.tokens_per_image)
        pixels = self.image_processor(list(images))["pixel_values"] if images else None
        return {"input_ids": ids, "pixel_values": pixels}

    def __call__(self, text: str | list[str], images: Sequence[Any] | Sequence[Sequence[Any]] | None = None,
                 padding_side: str = "left") -> dict[str, Any]:
        texts = [text] if isinstance(text, str) else list(text)
        if images is None:
            per_text = [[] for _ in texts]
        elif isinstance(text, str):
            per_text = [list(images)]
        else:
            per_text = [list(x) for x in images]
        if len(per_text) != len(texts):
            raise ConfigError("images", f"give one list of images per text: {len(texts)} text(s), {len(per_text)} list(s)")
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return collate([self.encode(t, ims) for t, ims in zip(texts, per_text)], pad_token_id=pad or 0, padding_side=padding_side)


def collate(samples: Sequence[dict[str, Any]], pad_token_id: int = 0, padding_side: str = "right") -> dict[str, Any]:
    """Pad ``input_ids`` (and ``labels`` with -100 when present) to the longest sample; the
    images of all samples are concatenated in sample order (``pixel_values`` None if none)."""
    if padding_side not in ("left", "right"):
        raise ConfigError("padding_side", f"must be 'left' or 'right', got {padding_side!r}")
    if not samples:
        raise ConfigError("samples", "the batch is empty")
    longest = max(len(s["input_ids"]) for s in samples)
    ids, mask, labels, pixels = [], [], [], []
    has_labels = any("labels" in s for s in samples)
    for s in samples:
        n = len(s["input_ids"])
        pad = longest - n
        row = list(s["input_ids"])
        lab = list(s.get("labels", [-100] * n))
        if padding_side == "left":
            ids.append([pad_token_id] * pad + row)
            mask.append([0] * pad + [1] * n)
            labels.append([-100] * pad + lab)
        else:
            ids.append(row + [pad_token_id] * pad)
            mask.append([1] * n + [0] * pad)
            labels.append(lab + [-100] * pad)
        if s.get("pixel_values") is not None:
            pixels.append(s["pixel_values"])
    batch = {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "attention_mask": torch.tensor(mask, dtype=torch.long),
        "pixel_values": torch.cat(pixels) if pixels else None,
    }
    if has_labels:
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
    return batch
