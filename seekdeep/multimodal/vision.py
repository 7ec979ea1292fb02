"""A ViT image encoder that loads Hugging Face ``clip_vision_model`` and
``siglip_vision_model`` checkpoints.

Module names follow transformers' (``embeddings.patch_embedding``, ``encoder.layers.{i}.
self_attn.q_proj``, ``post_layernorm``, SigLIP's ``head``), so a checkpoint maps onto this
model by dropping prefixes only (:func:`vision_key_from_hf`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seekdeep.errors import CheckpointError, ConfigError
from seekdeep.multimodal.config import VisionConfig

# prefixes a vision tensor may carry in the checkpoints transformers writes or reads
_VISION_PREFIXES = ("model.vision_tower.", "vision_tower.", "vision_model.")


def activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name in ("gelu_pytorch_tanh", "gelu_new"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    if name == "relu":
        return F.relu
    if name == "silu":
        return F.silu
    raise ConfigError("hidden_act", f"unsupported activation {name!r}")


@dataclass
class VisionOutput:
    last_hidden_state: torch.Tensor  # (N, P, C): CLIP before post_layernorm, SigLIP after (as transformers)
    pooler_output: torch.Tensor | None  # (N, C)
    hidden_states: tuple[torch.Tensor, ...] | None  # embeddings, then each layer's output


class VisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        c = config
        self.has_class_token = c.has_class_token
        if self.has_class_token:
            self.class_embedding = nn.Parameter(torch.zeros(c.hidden_size))
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size, bias=not c.has_class_token)
        self.position_embedding = nn.Embedding(c.num_positions, c.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (N, C, H/p, W/p)
        x = patches.flatten(2).transpose(1, 2)  # (N, P, C)
        if self.has_class_token:
            cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)  # (N, 1 + P, C)
        return x + self.position_embedding.weight[None, : x.shape[1]]


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        c = config
        self.num_heads, self.head_dim = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        self.q_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.k_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.v_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.out_proj = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = (proj(x).view(n, t, self.num_heads, self.head_dim).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))  # (N, H, T, D)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)  # (N, H, T, D)
        return self.out_proj(out.transpose(1, 2).reshape(n, t, c))


class VisionMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionBlock(config) for _ in range(config.num_hidden_layers))


class AttentionPoolingHead(nn.Module):
    """SigLIP's pooling: one learned probe attends over the patch states."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.attention = nn.MultiheadAttention(config.hidden_size, config.num_attention_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probe = self.probe.expand(x.shape[0], -1, -1)  # (N, 1, C)
        h = self.attention(probe, x, x, need_weights=False)[0]
        h = h + self.mlp(self.layernorm(h))
        return h[:, 0]


class VisionTransformer(nn.Module):
    """``model(pixel_values)`` -> :class:`VisionOutput`, as CLIPVisionModel / SiglipVisionModel."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        c = config
        self.embeddings = VisionEmbeddings(c)
        if c.has_class_token:
            self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)  # transformers' spelling, kept for checkpoints
        self.encoder = VisionEncoder(c)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.head = AttentionPoolingHead(c) if c.model_type == "siglip_vision_model" and c.vision_use_head else None

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.patch_embedding.weight.dtype

    def check_pixels(self, pixel_values: Any) -> None:
        c = self.config
        expected = (c.num_channels, c.image_size, c.image_size)
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ConfigError("pixel_values", f"expected a float tensor of shape (num_images, {', '.join(map(str, expected))}), got {got}")
        if not pixel_values.is_floating_point():
            raise ConfigError("pixel_values", f"must be a float tensor (use the image processor), got {pixel_values.dtype}")

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> VisionOutput:
        self.check_pixels(pixel_values)
        x = self.embeddings(pixel_values)  # (N, P, C)
        if self.config.has_class_token:
            x = self.pre_layrnorm(x)
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            states.append(x)
        if self.config.has_class_token:
            last, pooled = x, self.post_layernorm(x[:, 0])
        else:
            last = self.post_layernorm(x)
            pooled = self.head(last) if self.head is not None else None
        return VisionOutput(last, pooled, tuple(states) if output_hidden_states else None)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, position_init: str = "normal") -> None:
        """Random initialisation for training from scratch. ``position_init='sincos'`` starts the
        patch position embeddings as fixed 2-D sine-cosine codes of (row, column) (as MAE does),
        so where a patch lies is linearly readable from the first step."""
        if position_init not in ("normal", "sincos"):
            raise ConfigError("position_init", f"unsupported {position_init!r}; accepted: normal, sincos")
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
            elif isinstance(module, nn.MultiheadAttention):
                module._reset_parameters()
        if self.config.has_class_token:
            nn.init.normal_(self.embeddings.class_embedding, std=std)
        if self.head is not None:
            nn.init.normal_(self.head.probe, std=std)
        if position_init == "sincos":
            grid = self.config.image_size // self.config.patch_size
            table = sincos_2d(grid, self.config.hidden_size)  # (P, C)
            weight = self.embeddings.position_embedding.weight
            weight[int(self.config.has_class_token) :] = table.to(weight.dtype)
            if self.config.has_class_token:
                weight[0].zero_()

    # -- Hugging Face layout
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None) -> "VisionTransformer":
        """A standalone CLIPVisionModel / SiglipVisionModel directory (or a full CLIP / SigLIP one)."""
        from seekdeep.files import read_json
        from seekdeep.models.loading import resolve_model_dir

        model_dir = resolve_model_dir(path)
        config = VisionConfig.from_hf_dict(read_json(model_dir / "config.json"), source=str(model_dir / "config.json"))
        with torch.device("meta"):
            model = cls(config)
        state = read_vision_state(model, model_dir, dtype)
        model.load_state_dict(state, assign=True)
        return model.eval()

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        from seekdeep.files import atomic_write, write_json_atomic

        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {f"vision_model.{k}": v.detach().contiguous() for k, v in self.state_dict().items()}
        atomic_write(out / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        arch = "CLIPVisionModel" if self.config.model_type == "clip_vision_model" else "SiglipVisionModel"
        write_json_atomic(out / "config.json", {**self.config.to_hf_dict(), "architectures": [arch], "dtype": str(self.dtype).removeprefix("torch.")})


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid * grid, dim) fixed codes: half the channels encode the row, half the column, each
    as sines and cosines at geometrically spaced frequencies (raster order, as the patches)."""
    quarter = dim // 4
    freqs = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / max(quarter, 1)))  # (dim/4,)
    coords = torch.arange(grid, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (grid, grid)
    parts = []
    for axis in (rows, cols):
        angle = axis.reshape(-1, 1) * freqs  # (P, dim/4)
        parts += [angle.sin(), angle.cos()]
    table = torch.cat(parts, dim=1)  # (P, 4 * quarter)
    return torch.nn.functional.pad(table, (0, dim - table.shape[1]))


def vision_key_from_hf(key: str) -> str | None:
    """This model's name for a checkpoint key of a vision model, or None for keys that are
    not the vision model's (a full CLIP checkpoint's text half) or hold no parameter."""
    for prefix in _VISION_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
    if key.startswith(("text_model.", "text_projection", "visual_projection", "logit_scale", "logit_bias")) or key.endswith("position_ids"):
        return None
    return key


def read_vision_state(model: VisionTransformer, model_dir: Path, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    from seekdeep.models.loading import weight_files

    expected = {k: v.shape for k, v in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(model_dir):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for hf_key in f.keys():
                key = vision_key_from_hf(hf_key)
                if key is None:
                    continue
                if key not in expected:
                    raise CheckpointError(f"{file}: unexpected tensor {hf_key!r} (no such parameter in the vision model)")
                tensor = f.get_tensor(hf_key)
                if tuple(tensor.shape) != tuple(expected[key]):
                    raise CheckpointError(f"{file}: shape mismatch for {hf_key!r}: checkpoint {tuple(tensor.shape)}, config.json implies {tuple(expected[key])}")
                state[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{model_dir}: checkpoint lacks {len(missing)} vision tensor(s), e.g. {missing[:3]}")
    return state
