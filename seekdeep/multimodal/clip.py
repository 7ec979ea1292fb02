"""A CLIP dual encoder (``model_type: clip``): a causal text transformer and the ViT of
:mod:`seekdeep.multimodal.vision`, each with a bias-free projection into one embedding space
and a learnable logit scale, in transformers' CLIPModel layout.

Module names are transformers' (``text_model.encoder.layers.{i}.self_attn.q_proj``,
``vision_model.*``, ``text_projection``, ``visual_projection``, ``logit_scale``), so a CLIP
checkpoint loads by name, with nothing renamed."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seekdeep.errors import CheckpointError, ConfigError
from seekdeep.multimodal.config import VISION_ACTIVATIONS, VisionConfig
from seekdeep.multimodal.vision import VisionAttention, VisionMLP, VisionTransformer
from seekdeep.validate import check_float, check_int


@dataclass
class ClipTextConfig:
    """transformers' CLIPTextConfig fields that shape the model."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"):
            check_int(f"text_config.{name}", getattr(self, name))
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            check_int(f"text_config.{name}", getattr(self, name), lo=0, hi=self.vocab_size - 1)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("text_config.num_attention_heads", f"{self.num_attention_heads} must divide hidden_size={self.hidden_size}")
        if self.hidden_act not in VISION_ACTIVATIONS:
            raise ConfigError("text_config.hidden_act", f"unsupported {self.hidden_act!r}; accepted: {', '.join(VISION_ACTIVATIONS)}")
        check_float("text_config.layer_norm_eps", self.layer_norm_eps, 0.0, 1.0, lo_open=True)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "extra"}
        return {**self.extra, **d, "model_type": "clip_text_model"}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClipTextConfig":
        if not isinstance(d, dict):
            raise ConfigError("text_config", f"must be an object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in known and v is not None}
        extra = {k: v for k, v in d.items() if k not in known and k not in ("model_type", "architectures", "dtype", "torch_dtype", "transformers_version")}
        return cls(**kwargs, extra=extra)


@dataclass
class ClipConfig:
    """``model_type: clip``: text and vision towers and the shared embedding size."""

    text_config: ClipTextConfig = field(default_factory=ClipTextConfig)
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592  # ln(1 / 0.07), CLIP's initial temperature
    model_type: str = "clip"

    def __post_init__(self) -> None:
        if self.model_type != "clip":
            raise ConfigError("model_type", f"got {self.model_type!r}; accepted: clip")
        if self.vision_config.model_type != "clip_vision_model":
            raise ConfigError("vision_config.model_type", f"got {self.vision_config.model_type!r}; accepted: clip_vision_model")
        check_int("projection_dim", self.projection_dim)
        check_float("logit_scale_init_value", self.logit_scale_init_value, -10.0, math.log(100.0))

    def to_dict(self) -> dict[str, Any]:
        vision = {**self.vision_config.to_hf_dict(), "model_type": "clip_vision_model"}
        return {"model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": self.projection_dim,
                "logit_scale_init_value": self.logit_scale_init_value, "text_config": self.text_config.to_dict(), "vision_config": vision}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | None = None) -> "ClipConfig":
        if not isinstance(d, dict):
            raise ConfigError("config", f"must be an object, got {type(d).__name__}", source=source)
        vision = dict(d.get("vision_config") or {})
        vision["model_type"] = "clip_vision_model"
        return cls(text_config=ClipTextConfig.from_dict(dict(d.get("text_config") or {})),
                   vision_config=VisionConfig.from_hf_dict(vision, source=source),
                   projection_dim=d.get("projection_dim", 512), logit_scale_init_value=d.get("logit_scale_init_value", 2.6592),
                   model_type=d.get("model_type", "clip"))


@dataclass
class ClipOutput:
    text_embeds: torch.Tensor | None  # (B, E), unit norm
    image_embeds: torch.Tensor | None  # (N, E), unit norm
    logits_per_image: torch.Tensor | None  # (N, B)
    logits_per_text: torch.Tensor | None  # (B, N)
    text_pooled: torch.Tensor | None = None  # (B, C) before the projection
    image_pooled: torch.Tensor | None = None  # (N, C) before the projection


class MaskedSelfAttention(VisionAttention):
    """The ViT's attention with a boolean mask (True = may attend), for the causal text tower."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = (proj(x).view(n, t, self.num_heads, self.head_dim).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))  # (N, H, T, D)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim**-0.5)  # (N, H, T, D)
        return self.out_proj(out.transpose(1, 2).reshape(n, t, c))


class TextBlock(nn.Module):
    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = MaskedSelfAttention(config)  # reads hidden_size / num_attention_heads only
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class TextEmbeddings(nn.Module):
    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(input_ids) + self.position_embedding.weight[None, : input_ids.shape[1]]


class TextEncoder(nn.Module):
    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(TextBlock(config) for _ in range(config.num_hidden_layers))


class ClipTextTransformer(nn.Module):
    """Causal text encoder pooled at the end-of-text token (as CLIPTextModel)."""

    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = TextEmbeddings(config)
        self.encoder = TextEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def check_ids(self, input_ids: Any, attention_mask: Any) -> None:
        c = self.config
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ConfigError("input_ids", f"expected an integer tensor of shape (batch, length), got {got}")
        if not 0 < input_ids.shape[1] <= c.max_position_embeddings:
            raise ConfigError("input_ids", f"length {input_ids.shape[1]}; accepted: 1 .. max_position_embeddings={c.max_position_embeddings}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= c.vocab_size):
            raise ConfigError("input_ids", f"ids must lie in [0, {c.vocab_size}), got [{int(input_ids.min())}, {int(input_ids.max())}]")
        if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape):
            raise ConfigError("attention_mask", f"must be a tensor of input_ids' shape {tuple(input_ids.shape)}")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (last_hidden_state (B, T, C) after the final norm, pooled (B, C))."""
        self.check_ids(input_ids, attention_mask)
        b, t = input_ids.shape
        x = self.embeddings(input_ids)  # (B, T, C)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()[None, None]  # (1, 1, T, T)
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]  # (B, 1, T, T)
            # a query row with every key masked (left padding) would give NaN; it is never pooled
            mask = mask | ~mask.any(-1, keepdim=True)
        for layer in self.encoder.layers:
            x = layer(x, mask)
        x = self.final_layer_norm(x)
        if self.config.eos_token_id == 2:  # old CLIP configs: the end token is the largest id (as transformers)
            position = input_ids.argmax(dim=-1)
        else:
            position = (input_ids == self.config.eos_token_id).int().argmax(dim=-1)
        return x, x[torch.arange(b, device=x.device), position]


class ClipModel(nn.Module):
    """``model(input_ids=..., pixel_values=...)`` -> :class:`ClipOutput`; either input may be
    left out (that side's fields are None)."""

    def __init__(self, config: ClipConfig):
        super().__init__()
        self.config = config
        self.text_model = ClipTextTransformer(config.text_config)
        self.vision_model = VisionTransformer(config.vision_config)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, E) projected, not normalised (as transformers)."""
        return self.text_projection(self.text_model(input_ids, attention_mask)[1])

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.vision_model(pixel_values).pooler_output)

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> ClipOutput:
        if input_ids is None and pixel_values is None:
            raise ConfigError("input_ids", "give input_ids, pixel_values or both")
        text = image = text_pooled = image_pooled = None
        if input_ids is not None:
            text_pooled = self.text_model(input_ids, attention_mask)[1]
            text = F.normalize(self.text_projection(text_pooled), dim=-1)
        if pixel_values is not None:
            image_pooled = self.vision_model(pixel_values).pooler_output
            image = F.normalize(self.visual_projection(image_pooled), dim=-1)
        per_text = per_image = None
        if text is not None and image is not None:
            per_text = text @ image.t() * self.logit_scale.exp()  # (B, N)
            per_image = per_text.t()
        return ClipOutput(text, image, per_image, per_text, text_pooled, image_pooled)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        self.vision_model.init_weights(std=std)
        for module in [self.text_model, self.text_projection, self.visual_projection]:
            for m in module.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=std)
                    if getattr(m, "bias", None) is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    m.reset_parameters()
        self.logit_scale.fill_(self.config.logit_scale_init_value)

    @classmethod
    def from_config(cls, config: ClipConfig) -> "ClipModel":
        model = cls(config)
        model.init_weights()
        return model

    # -- Hugging Face layout
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        from seekdeep.files import atomic_write, write_json_atomic

        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        atomic_write(out / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        write_json_atomic(out / "config.json", {**self.config.to_dict(), "dtype": str(self.logit_scale.dtype).removeprefix("torch.")})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None, device=None, **overrides: Any) -> "ClipModel":
        from safetensors import safe_open

        from seekdeep.files import read_json
        from seekdeep.models.loading import parse_dtype, resolve_model_dir, weight_files

        model_dir = resolve_model_dir(path)
        config_path = model_dir / "config.json"
        raw = read_json(config_path)
        dtype = None if dtype is None else parse_dtype(dtype, raw)  # a name ('bfloat16', 'auto') or a torch.dtype
        config = ClipConfig.from_dict({**raw, **overrides}, source=str(config_path))
        with torch.device("meta"):
            model = cls(config)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        state: dict[str, torch.Tensor] = {}
        for file in weight_files(model_dir):
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key.endswith("position_ids"):  # transformers' index buffers, not parameters
                        continue
                    if key not in expected:
                        raise CheckpointError(f"{file}: unexpected tensor {key!r} (no such parameter in CLIPModel)")
                    tensor = f.get_tensor(key)
                    if tuple(tensor.shape) != expected[key]:
                        raise CheckpointError(f"{file}: shape mismatch for {key!r}: checkpoint {tuple(tensor.shape)}, config.json implies {expected[key]}")
                    state[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        missing = sorted(set(expected) - set(state))
        if missing:
            raise CheckpointError(f"{model_dir}: checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
        model.load_state_dict(state, assign=True)
        if device is not None:
            model = model.to(device)
        return model.eval()
