"""Embedding-only models behind ``/v1/embeddings``: CLIP-layout dual encoders (``model_type:
clip``, e.g. what ``seekdeep align`` saves) embed text and images into one space.

Such a model has no decoder, so it gets no engine or KV cache: the server lists it in
``/v1/models``, answers ``/v1/embeddings`` for it and refuses completions with a 400 naming it.
An embeddings input is a string, a list of strings, or a list whose items are strings, ``{"type":
"text", "text": ...}`` or ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``
(the chat API's content parts), so text and images can be embedded in one request and compared.
Embeddings are L2-normalised, as CLIP compares them.
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from seekdeep.serve.embeddings import EmbeddingCache
from seekdeep.serve.protocol import APIError, ImageURLPart, TextPart


def decode_data_url(url: str, where: str, param: str, max_pixels: int):
    """A ``data:image/<type>;base64,...`` URL -> PIL image, or an APIError 400 with a code. The
    server fetches nothing from the network, so any other URL is refused."""
    from seekdeep.multimodal.image_processing import ImageError, decode_image

    if not url.startswith("data:"):
        raise APIError(400, f"{where}: only inline data: URLs (data:image/png;base64,...) are accepted; this server "
                       f"has no network access to fetch {url[:60]!r}", param=param, code="remote_image_url")
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64") or not header[5:].startswith("image/"):
        raise APIError(400, f"{where}: expected data:image/<type>;base64,<bytes>, got {header[:60]!r}",
                       param=param, code="invalid_image")
    try:
        data = base64.b64decode(payload, validate=True)
    except (ValueError, TypeError) as exc:
        raise APIError(400, f"{where}: invalid base64 ({exc})", param=param, code="invalid_image") from None
    try:
        return decode_image(data, field=where, max_pixels=max_pixels)
    except ImageError as exc:
        raise APIError(400, str(exc), param=param, code="invalid_image") from None


def is_encoder_dir(path: str | Path) -> bool:
    """True for a directory whose config.json says ``model_type: clip``."""
    from seekdeep.auto import _multimodal_type

    return _multimodal_type(str(path)) == "clip"


class _Tokenize:
    """Text -> (input_ids, attention_mask), right-padded: the word vocabulary ``seekdeep align``
    writes (vocab.json), or a tokenizer.json through seekdeep.AutoTokenizer."""

    def __init__(self, path: Path):
        if (path / "tokenizer.json").is_file():
            from seekdeep.auto import AutoTokenizer

            self.tok, self.word = AutoTokenizer.from_pretrained(path), False
        elif (path / "vocab.json").is_file():
            from seekdeep.multimodal.align_data import WordTokenizer

            self.tok, self.word = WordTokenizer.from_pretrained(path), True
        else:
            raise FileNotFoundError(f"{path}: a CLIP model needs tokenizer.json or vocab.json beside config.json")

    def ids(self, text: str) -> list[int]:
        if self.word:
            row = self.tok([text], max_length=1 << 30)  # no silent truncation: the caller checks the length
            return row["input_ids"][0][row["attention_mask"][0].bool()].tolist()
        return self.tok.encode(text)

    def pad_id(self) -> int:
        pad = getattr(self.tok, "pad_token_id", None)
        return 0 if pad is None else int(pad)


@dataclass
class EncoderModel:
    """A served dual encoder; ``dimensions`` is its shared embedding size."""

    name: str
    path: str
    model: Any
    tokenize: _Tokenize
    image_processor: Any
    embedding_cache: EmbeddingCache
    max_pixels: int
    created: int = field(default_factory=lambda: int(time.time()))
    # requests run in worker threads: one forward and cache update at a time
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def dimensions(self) -> int:
        return int(self.model.config.projection_dim)

    def card(self) -> dict[str, Any]:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "seekdeep", "root": self.path,
                "kind": "embedding", "modalities": ["text", "image"], "dimensions": self.dimensions}

    def parse(self, inp: Any) -> list[tuple[str, Any]]:
        """Request input -> [("text", ids) | ("image", PIL image)], every item checked."""
        items = [inp] if isinstance(inp, str) else list(inp)
        if items and all(isinstance(x, int) for x in items):
            items = [items]  # one pre-tokenised input
        out: list[tuple[str, Any]] = []
        limit = self.model.config.text_config.max_position_embeddings
        vocab = self.model.config.text_config.vocab_size
        for i, item in enumerate(items):
            where = f"input[{i}]"
            if isinstance(item, TextPart):
                item = item.text
            if isinstance(item, ImageURLPart):
                out.append(("image", decode_data_url(item.image_url.url, where, "input", self.max_pixels)))
                continue
            if isinstance(item, str):
                ids = self.tokenize.ids(item)
            elif isinstance(item, list) and item and all(isinstance(t, int) for t in item):
                ids = list(item)
            else:
                raise APIError(400, f"{where}: accepted items are strings, token-id lists, text parts and image_url parts",
                               param="input")
            if not ids:
                raise APIError(400, f"{where}: encodes to no tokens", param="input")
            if len(ids) > limit:
                raise APIError(400, f"{where}: {len(ids)} tokens exceed this model's text context ({limit})",
                               param="input", code="context_length_exceeded")
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"{where}: token ids must be in [0, {vocab})", param="input")
            out.append(("text", ids))
        return out

    @staticmethod
    def cache_key(name: str, kind: str, value: Any):
        if kind == "text":
            return EmbeddingCache.key(name, value)
        digest = hashlib.blake2b(value.convert("RGB").tobytes(), digest_size=16)
        digest.update(repr(value.size).encode())
        return (name, "image", digest.hexdigest())

    def embed(self, items: list[tuple[str, Any]]) -> tuple[list[torch.Tensor], int]:
        """One forward per modality for the items not in the cache: (normalised vectors in order,
        how many came from the cache)."""
        with self.lock:
            hits = self.embedding_cache.hits
            vectors = self._embed(items)
            return vectors, self.embedding_cache.hits - hits

    @torch.no_grad()
    def _embed(self, items: list[tuple[str, Any]]) -> list[torch.Tensor]:
        vectors: list[torch.Tensor | None] = [None] * len(items)
        todo: dict[str, list[int]] = {"text": [], "image": []}
        keys = [self.cache_key(self.name, kind, value) for kind, value in items]
        for i, key in enumerate(keys):
            vectors[i] = self.embedding_cache.get(key)
            if vectors[i] is None:
                todo[items[i][0]].append(i)
        device = next(self.model.parameters()).device
        if todo["text"]:
            rows = [items[i][1] for i in todo["text"]]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), self.tokenize.pad_id(), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, r in enumerate(rows):
                ids[j, :len(r)], mask[j, :len(r)] = torch.tensor(r), 1
            emb = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).text_embeds
            for j, i in enumerate(todo["text"]):
                vectors[i] = emb[j].float().cpu()
        if todo["image"]:
            pixels = self.image_processor([items[i][1] for i in todo["image"]])["pixel_values"]
            emb = self.model(pixel_values=pixels.to(device, next(self.model.parameters()).dtype)).image_embeds
            for j, i in enumerate(todo["image"]):
                vectors[i] = emb[j].float().cpu()
        for i in (*todo["text"], *todo["image"]):
            self.embedding_cache.put(keys[i], vectors[i])
        return vectors  # type: ignore[return-value]


def load_encoder(path: str | Path, name: str, *, dtype: str | None, device: str | None, cache_size: int,
                 max_pixels: int) -> EncoderModel:
    from seekdeep.auto import AutoModel
    from seekdeep.multimodal.image_processing import PROCESSOR_NAME, ImageProcessor, ImageProcessorConfig

    path = Path(path)
    model = AutoModel.from_pretrained(str(path), dtype=dtype, device=device)
    if (path / PROCESSOR_NAME).is_file():
        processor = ImageProcessor.from_pretrained(path)
    else:
        processor = ImageProcessor(ImageProcessorConfig.clip(model.config.vision_config.image_size))
    tokenize = _Tokenize(path)
    return EncoderModel(name, str(path), model, tokenize, processor, EmbeddingCache(cache_size), max_pixels)
