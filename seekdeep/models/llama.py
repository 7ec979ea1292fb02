"""The Llama family: Hugging Face ``llama``, ``mistral``, ``qwen2`` (q/k/v bias) and ``qwen3``
(per-head q/k RMSNorm) checkpoints. RMSNorm, RoPE (incl. llama3 / linear / yarn scaling),
SwiGLU, grouped-query attention, tied or untied embeddings, optional sliding window."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seekdeep.attention import AttentionMask, AttentionSpec, available_backends, build_attention
from seekdeep.errors import ConfigError, UnknownBackendError
from seekdeep.models.base import CausalLM, Decoder, StateDictAdapter
from seekdeep.models.common import KVCache, RMSNorm, RotaryEmbedding, apply_rope, parse_rope, require_positive_int, rope_to_hf

LLAMA_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

_PRESETS: dict[str, dict[str, Any]] = {
    # Small code models trained from scratch on the embedded corpus.
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4),
    "base": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4),
    "125m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12),
}


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # llama: bias on q, k, v and o
    qkv_bias: bool = False  # qwen2: bias on q, k, v only
    qk_norm: bool = False  # qwen3
    mlp_bias: bool = False
    sliding_window: int | None = None
    layer_types: list[str] | None = None  # "full_attention" / "sliding_attention" per layer
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    model_type: str = "llama"
    attention_backend: str = "sdpa"
    attention_options: dict[str, Any] = field(default_factory=dict)
    source: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            require_positive_int(self.num_attention_heads, "num_attention_heads", self.source)
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings",
        ):
            require_positive_int(getattr(self, name), name, self.source)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                "num_key_value_heads",
                f"{self.num_key_value_heads} must divide num_attention_heads={self.num_attention_heads}",
                source=self.source,
            )
        if self.head_dim % 2:
            raise ConfigError("head_dim", f"must be even for RoPE, got {self.head_dim}", source=self.source)
        if self.model_type not in LLAMA_MODEL_TYPES:
            raise ConfigError("model_type", f"{self.model_type!r} is not a llama-family type; accepted: {sorted(LLAMA_MODEL_TYPES)}", source=self.source)
        if self.attention_backend not in available_backends():
            raise UnknownBackendError(
                "attention_backend", f"unknown backend {self.attention_backend!r}; accepted: {', '.join(available_backends())}"
            )
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError("layer_types", f"needs {self.num_hidden_layers} entries, got {len(self.layer_types)}", source=self.source)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "LlamaConfig":
        if name not in _PRESETS:
            raise ConfigError("preset", f"unknown preset {name!r}; accepted: {', '.join(_PRESETS)}")
        return cls(**{**_PRESETS[name], **overrides})

    # -- Hugging Face config.json
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str | None = None) -> "LlamaConfig":
        model_type = d.get("model_type", "llama")
        theta, scaling = parse_rope(d, source)
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads") if k not in d]
        if missing:
            raise ConfigError(missing[0], "required key is missing", source=source)
        layer_types = d.get("layer_types")
        sliding = d.get("sliding_window")
        if model_type in ("qwen2", "qwen3") and layer_types is None:
            if d.get("use_sliding_window") and sliding:
                first = d.get("max_window_layers", d["num_hidden_layers"])
                layer_types = ["full_attention" if i < first else "sliding_attention" for i in range(d["num_hidden_layers"])]
            else:
                sliding = None
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads"),
            head_dim=d.get("head_dim"),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            attention_bias=bool(d.get("attention_bias", False)) and model_type != "qwen2",
            qkv_bias=model_type == "qwen2" or bool(d.get("qkv_bias", False)),
            qk_norm=model_type == "qwen3",
            mlp_bias=bool(d.get("mlp_bias", False)),
            sliding_window=sliding,
            layer_types=layer_types,
            initializer_range=d.get("initializer_range", 0.02),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            model_type=model_type,
            attention_backend=d.get("attention_backend", "sdpa"),
            attention_options=d.get("attention_options") or {},
            source=source,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("rope_theta", "rope_scaling", "qkv_bias", "qk_norm", "source"):
            d.pop(key)
        if self.model_type in ("qwen2", "qwen3"):
            d["use_sliding_window"] = self.layer_types is not None and "sliding_attention" in self.layer_types
            d.pop("attention_bias" if self.model_type == "qwen2" else "mlp_bias")
        d.update(rope_to_hf(self.rope_theta, self.rope_scaling))
        d["architectures"] = [LLAMA_MODEL_TYPES[self.model_type]]
        return d


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        qkv_bias = c.attention_bias or c.qkv_bias
        self.q_proj = nn.Linear(c.hidden_size, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, c.hidden_size, bias=c.attention_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, c.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        spec = AttentionSpec(c.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim, dict(c.attention_options))
        self.inner = build_attention(c.attention_backend, spec)

    def forward(self, x, cos, sin, mask: AttentionMask, cache: KVCache | None, layer_idx: int):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # (B, H, T, D)
        k = apply_rope(k.transpose(1, 2), cos, sin)  # (B, Hkv, T, D)
        state = None
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)
            state = cache.layers[layer_idx].backend_state
        out = self.inner(q, k, v, mask=mask, scale=self.head_dim**-0.5, hidden_states=x, cache_state=state)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, config.mlp_bias)

    def forward(self, x, cos, sin, mask, cache, layer_idx):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer_idx)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(CausalLM):
    config_class = LlamaConfig

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        c = config
        rotary = RotaryEmbedding(c.head_dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings)
        self.model = Decoder(
            nn.Embedding(c.vocab_size, c.hidden_size),
            [LlamaBlock(c) for _ in range(c.num_hidden_layers)],
            RMSNorm(c.hidden_size, c.rms_norm_eps),
            rotary,
        )
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.tie_weights()

    def sliding_windows(self) -> list[int | None] | None:
        c = self.config
        if not c.sliding_window:
            return None
        if c.layer_types is None:
            return [c.sliding_window] * c.num_hidden_layers
        return [c.sliding_window if kind == "sliding_attention" else None for kind in c.layer_types]


LlamaStateDictAdapter = StateDictAdapter
