"""Configs of the multimodal models: the vision tower (Hugging Face ``clip_vision_model`` /
``siglip_vision_model``), the Flamingo-style cross-attention option and the LLaVA-format
model that nests both with a seekdeep language model (``model_type: llava``).

This module holds configs only; it imports no model code beyond the text-model registry and
no recipe."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from seekdeep.errors import ConfigError
from seekdeep.models.common import require_positive_int

VISION_MODEL_TYPES = ("clip_vision_model", "siglip_vision_model")
VISION_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu", "silu")
PROJECTOR_ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "quick_gelu", "relu", "silu")
SELECT_STRATEGIES = ("default", "full")
MEDIA_ATTENTION = ("previous", "all_previous")

_VISION_DEFAULTS = {
    "clip_vision_model": dict(hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "siglip_vision_model": dict(hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
}


@dataclass
class VisionConfig:
    """A ViT in the layout of transformers' CLIPVisionModel / SiglipVisionModel.

    CLIP: class token, pre-norm before the encoder, no patch-embedding bias. SigLIP: no
    class token, patch-embedding bias, post-norm on the last hidden state and an optional
    attention-pooling head (``vision_use_head``)."""

    model_type: str = "clip_vision_model"
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str | None = None  # None: the family's default
    layer_norm_eps: float | None = None
    vision_use_head: bool = True  # siglip only
    extra: dict[str, Any] = field(default_factory=dict)  # other config.json keys, written back unchanged
    source: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.model_type not in VISION_MODEL_TYPES:
            raise ConfigError("vision_config.model_type", f"unsupported {self.model_type!r}; accepted: {', '.join(VISION_MODEL_TYPES)}", source=self.source)
        defaults = _VISION_DEFAULTS[self.model_type]
        if self.hidden_act is None:
            self.hidden_act = defaults["hidden_act"]
        if self.layer_norm_eps is None:
            self.layer_norm_eps = defaults["layer_norm_eps"]
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels", "image_size", "patch_size"):
            require_positive_int(getattr(self, name), f"vision_config.{name}", self.source)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("vision_config.num_attention_heads", f"{self.num_attention_heads} must divide hidden_size={self.hidden_size}", source=self.source)
        if self.image_size % self.patch_size:
            raise ConfigError("vision_config.patch_size", f"{self.patch_size} must divide image_size={self.image_size}", source=self.source)
        if self.hidden_act not in VISION_ACTIVATIONS:
            raise ConfigError("vision_config.hidden_act", f"unsupported {self.hidden_act!r}; accepted: {', '.join(VISION_ACTIVATIONS)}", source=self.source)

    @property
    def has_class_token(self) -> bool:
        return self.model_type == "clip_vision_model"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        return self.num_patches + int(self.has_class_token)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str | None = None) -> "VisionConfig":
        if not isinstance(d, dict):
            raise ConfigError("vision_config", f"must be an object, got {type(d).__name__}", source=source)
        d = dict(d)
        if d.get("model_type") in ("clip", "siglip") and "vision_config" in d:  # a full CLIP / SigLIP config: take its vision half
            d = {"model_type": f"{d['model_type']}_vision_model", **d["vision_config"]}
        known = {f.name for f in fields(cls)} - {"extra", "source"}
        kwargs = {k: d.pop(k) for k in list(d) if k in known}
        kwargs.setdefault("model_type", "clip_vision_model")
        for key in ("architectures", "transformers_version", "dtype", "torch_dtype"):
            d.pop(key, None)
        return cls(**kwargs, extra=d, source=source)

    def to_hf_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("extra", "source")}
        if self.model_type != "siglip_vision_model":
            d.pop("vision_use_head")
        return {**self.extra, **d}

    to_dict = to_hf_dict

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VisionConfig":
        return cls.from_hf_dict(d)


@dataclass
class CrossAttentionConfig:
    """Flamingo-style fusion: a gated cross-attention block before every ``every_n_layers``-th
    decoder layer (tanh gates start at 0, so the model starts equal to the text-only LM).

    ``media_attention``: 'previous' lets a text token see only the image whose marker came last
    before it; 'all_previous' every image before it. ``num_latents`` > 0 adds a Perceiver
    resampler that turns each image's features into that many latent vectors."""

    every_n_layers: int = 1
    num_heads: int = 4
    ff_mult: int = 2
    media_attention: str = "previous"
    num_latents: int = 0
    resampler_depth: int = 2
    freeze_language_model: bool = False

    def __post_init__(self) -> None:
        for name in ("every_n_layers", "num_heads", "ff_mult", "resampler_depth"):
            require_positive_int(getattr(self, name), f"cross_attention.{name}")
        if not isinstance(self.num_latents, int) or self.num_latents < 0:
            raise ConfigError("cross_attention.num_latents", f"must be an integer >= 0 (0: no resampler), got {self.num_latents!r}")
        if self.media_attention not in MEDIA_ATTENTION:
            raise ConfigError("cross_attention.media_attention", f"unsupported {self.media_attention!r}; accepted: {', '.join(MEDIA_ATTENTION)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CrossAttentionConfig":
        if not isinstance(d, dict):
            raise ConfigError("cross_attention", f"must be an object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"cross_attention.{unknown[0]}", f"unknown key; accepted: {', '.join(sorted(known))}")
        return cls(**d)


@dataclass
class LlavaConfig:
    """``model_type: llava``: vision tower + 2-layer MLP projector + a seekdeep causal LM.

    ``text_config`` is any seekdeep text config (llama family incl. the ``dsa`` / ``gated``
    attention backends). ``cross_attention`` (a seekdeep extension, absent in transformers'
    LLaVA) switches the image path from projected prefix tokens to gated cross-attention."""

    vision_config: VisionConfig
    text_config: Any
    image_token_index: int = 32000
    image_seq_length: int = 576
    projector_hidden_act: str = "gelu"
    vision_feature_select_strategy: str = "default"
    vision_feature_layer: int | list[int] = -2
    multimodal_projector_bias: bool = True
    tie_word_embeddings: bool = False
    cross_attention: CrossAttentionConfig | None = None
    model_type: str = "llava"
    source: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.vision_config, dict):
            self.vision_config = VisionConfig.from_hf_dict(self.vision_config, self.source)
        if isinstance(self.text_config, dict):
            self.text_config = text_config_from_dict(self.text_config, self.source)
        if isinstance(self.cross_attention, dict):
            self.cross_attention = CrossAttentionConfig.from_dict(self.cross_attention)
        vocab = self.text_config.vocab_size
        if not isinstance(self.image_token_index, int) or not 0 <= self.image_token_index < vocab:
            raise ConfigError("image_token_index", f"must be a token id in [0, {vocab}) (text_config.vocab_size), got {self.image_token_index!r}", source=self.source)
        if self.projector_hidden_act not in PROJECTOR_ACTIVATIONS:
            raise ConfigError("projector_hidden_act", f"unsupported {self.projector_hidden_act!r}; accepted: {', '.join(PROJECTOR_ACTIVATIONS)}", source=self.source)
        if self.vision_feature_select_strategy not in SELECT_STRATEGIES:
            raise ConfigError("vision_feature_select_strategy", f"unsupported {self.vision_feature_select_strategy!r}; accepted: {', '.join(SELECT_STRATEGIES)}", source=self.source)
        if self.vision_feature_select_strategy == "default" and not self.vision_config.has_class_token:
            raise ConfigError("vision_feature_select_strategy", f"'default' drops a class token, which {self.vision_config.model_type} has none of; use 'full'", source=self.source)
        layers = [self.vision_feature_layer] if isinstance(self.vision_feature_layer, int) else self.vision_feature_layer
        n = self.vision_config.num_hidden_layers
        if not isinstance(layers, list) or not layers or not all(isinstance(i, int) and -(n + 1) <= i <= n for i in layers):
            raise ConfigError("vision_feature_layer", f"must be an int or a list of ints in [-{n + 1}, {n}] (hidden-state indices), got {self.vision_feature_layer!r}", source=self.source)
        if self.text_config.tie_word_embeddings:
            self.tie_word_embeddings = True

    # the text model's fields that generation and validation read from ``model.config``
    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def max_position_embeddings(self) -> int:
        return self.text_config.max_position_embeddings

    @property
    def eos_token_id(self):
        return self.text_config.eos_token_id

    @property
    def bos_token_id(self):
        return self.text_config.bos_token_id

    @property
    def pad_token_id(self):
        return self.text_config.pad_token_id

    @property
    def image_token_id(self) -> int:
        return self.image_token_index

    @property
    def feature_layers(self) -> list[int]:
        return [self.vision_feature_layer] if isinstance(self.vision_feature_layer, int) else list(self.vision_feature_layer)

    @property
    def tokens_per_image(self) -> int:
        """How many placeholder tokens one image expands to (prefix mode)."""
        v = self.vision_config
        return v.num_patches + int(v.has_class_token and self.vision_feature_select_strategy == "full")

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str | None = None) -> "LlavaConfig":
        for key in ("vision_config", "text_config"):
            if not isinstance(d.get(key), dict):
                raise ConfigError(key, "required object is missing", source=source)
        image_token = d.get("image_token_index", d.get("image_token_id", 32000))
        return cls(
            vision_config=VisionConfig.from_hf_dict(d["vision_config"], source),
            text_config=text_config_from_dict(d["text_config"], source),
            image_token_index=image_token,
            image_seq_length=d.get("image_seq_length", 576),
            projector_hidden_act=d.get("projector_hidden_act", "gelu"),
            vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
            vision_feature_layer=d.get("vision_feature_layer", -2),
            multimodal_projector_bias=d.get("multimodal_projector_bias", True),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            cross_attention=CrossAttentionConfig.from_dict(d["cross_attention"]) if d.get("cross_attention") else None,
            source=source,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        d = {
            "model_type": "llava",
            "architectures": ["LlavaForConditionalGeneration"],
            "vision_config": self.vision_config.to_hf_dict(),
            "text_config": self.text_config.to_hf_dict(),
            "image_token_index": self.image_token_index,
            "image_seq_length": self.image_seq_length,
            "projector_hidden_act": self.projector_hidden_act,
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
            "vision_feature_layer": self.vision_feature_layer,
            "multimodal_projector_bias": self.multimodal_projector_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
        }
        d["text_config"].pop("architectures", None)
        if self.cross_attention is not None:
            d["cross_attention"] = self.cross_attention.to_dict()
        return d

    to_dict = to_hf_dict

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlavaConfig":
        return cls.from_hf_dict(d)


def text_config_from_dict(d: dict[str, Any], source: str | None = None):
    """A seekdeep text config from a nested ``text_config`` object (default model_type llama)."""
    from seekdeep.models import family

    if not isinstance(d, dict):
        raise ConfigError("text_config", f"must be an object, got {type(d).__name__}", source=source)
    d = {"model_type": "llama", **d}
    config_cls, _ = family(d["model_type"], source)
    return config_cls.from_hf_dict(d, source=source)
