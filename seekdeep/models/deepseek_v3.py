"""The DeepSeek-V3 family (Hugging Face ``deepseek_v3``): Multi-head Latent Attention
(:mod:`seekdeep.models.mla`), a sigmoid-routed mixture of experts with shared experts
(:mod:`seekdeep.models.moe`) after ``first_k_dense_replace`` dense layers, RMSNorm and
decoupled RoPE (incl. DeepSeek's YaRN). Checkpoints keep Hugging Face's key names; the
multi-token-prediction layer some checkpoints carry is dropped on load."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterator

import torch
from torch import nn

from seekdeep.attention import available_backends
from seekdeep.errors import ConfigError, UnknownBackendError
from seekdeep.models.base import CausalLM, Decoder, StateDictAdapter
from seekdeep.models.common import ROPE_TYPES, RMSNorm, RotaryEmbedding, parse_rope, require_positive_int, rope_to_hf
from seekdeep.models.llama import SwiGLU
from seekdeep.models.mla import MultiHeadLatentAttention
from seekdeep.models.moe import DeepseekV3MoE

_PRESETS: dict[str, dict[str, Any]] = {
    # Small MoE models trained from scratch on the embedded corpus.
    "tiny": dict(
        hidden_size=128, intermediate_size=384, moe_intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=1.0,
        q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
    ),
    "small": dict(
        hidden_size=256, intermediate_size=768, moe_intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=8, n_routed_experts=16, n_shared_experts=1,
        num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=1.0,
        q_lora_rank=96, kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
    ),
    "base": dict(
        hidden_size=512, intermediate_size=1536, moe_intermediate_size=256, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=8, n_routed_experts=32, n_shared_experts=1,
        num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=1.5,
        q_lora_rank=192, kv_lora_rank=128, qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64,
    ),
}

# Hugging Face keys derived from others, or describing parts seekdeep does not build.
_HF_ONLY_KEYS = {"rope_theta", "rope_scaling", "rope_parameters", "head_dim", "qk_head_dim", "source"}


@dataclass
class DeepseekV3Config:
    """Defaults are DeepSeek-V3 (671B) as in transformers; use :meth:`from_name` for small models.

    ``q_lora_rank=None`` gives a plain ``q_proj``. ``num_key_value_heads`` is kept for
    round-trips only: MLA expands keys and values for every head, so it must equal
    ``num_attention_heads``.
    """

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = None
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    model_type: str = "deepseek_v3"
    attention_backend: str = "sdpa"
    attention_options: dict[str, Any] = field(default_factory=dict)
    source: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        src = self.source
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "n_routed_experts", "kv_lora_rank", "qk_rope_head_dim",
            "v_head_dim", "n_group", "topk_group", "num_experts_per_tok", "max_position_embeddings",
        ):
            require_positive_int(getattr(self, name), name, src)
        if self.q_lora_rank is not None:
            require_positive_int(self.q_lora_rank, "q_lora_rank", src)
        for name, upper in (
            ("qk_nope_head_dim", None), ("n_shared_experts", None), ("first_k_dense_replace", self.num_hidden_layers),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0 or (upper is not None and value > upper):
                accepted = "an integer >= 0" + (f" and <= {upper}" if upper is not None else "")
                raise ConfigError(name, f"got {value!r}; accepted: {accepted}", source=src)
        if self.num_key_value_heads != self.num_attention_heads:
            raise ConfigError(
                "num_key_value_heads",
                f"{self.num_key_value_heads} must equal num_attention_heads={self.num_attention_heads} "
                "(MLA expands keys and values for every head)",
                source=src,
            )
        if self.qk_rope_head_dim % 2:
            raise ConfigError("qk_rope_head_dim", f"must be even for RoPE, got {self.qk_rope_head_dim}", source=src)
        if self.n_routed_experts % self.n_group:
            raise ConfigError(
                "n_group", f"{self.n_group} must divide n_routed_experts={self.n_routed_experts}", source=src
            )
        if self.topk_group > self.n_group:
            raise ConfigError("topk_group", f"{self.topk_group} exceeds n_group={self.n_group}", source=src)
        eligible = self.topk_group * (self.n_routed_experts // self.n_group)
        if self.num_experts_per_tok > eligible:
            raise ConfigError(
                "num_experts_per_tok",
                f"{self.num_experts_per_tok} exceeds the {eligible} experts in the topk_group={self.topk_group} "
                f"eligible groups (n_routed_experts={self.n_routed_experts}, n_group={self.n_group})",
                source=src,
            )
        if isinstance(self.routed_scaling_factor, bool) or not isinstance(self.routed_scaling_factor, (int, float)) or self.routed_scaling_factor <= 0:
            raise ConfigError("routed_scaling_factor", f"must be a positive number, got {self.routed_scaling_factor!r}", source=src)
        if self.hidden_act != "silu":
            raise ConfigError("hidden_act", f"unsupported {self.hidden_act!r}; accepted: 'silu'", source=src)
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type") not in ROPE_TYPES:
            raise ConfigError(
                "rope_scaling.rope_type",
                f"unsupported {self.rope_scaling.get('rope_type')!r}; accepted: {', '.join(ROPE_TYPES)}",
                source=src,
            )
        if self.model_type != "deepseek_v3":
            raise ConfigError("model_type", f"{self.model_type!r}; accepted: 'deepseek_v3'", source=src)
        if self.attention_backend not in available_backends():
            raise UnknownBackendError(
                "attention_backend", f"unknown backend {self.attention_backend!r}; accepted: {', '.join(available_backends())}"
            )

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "DeepseekV3Config":
        if name not in _PRESETS:
            raise ConfigError("preset", f"unknown preset {name!r}; accepted: {', '.join(_PRESETS)}")
        return cls(**{**_PRESETS[name], **overrides})

    # -- Hugging Face config.json
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str | None = None) -> "DeepseekV3Config":
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads") if k not in d]
        if missing:
            raise ConfigError(missing[0], "required key is missing", source=source)
        quant = d.get("quantization_config")
        if quant:
            method = quant.get("quant_method") if isinstance(quant, dict) else quant
            raise ConfigError(
                "quantization_config",
                f"{method!r} checkpoints are not supported; dequantize to bf16/fp32 first",
                source=source,
            )
        scoring = d.get("scoring_func", "sigmoid")
        if scoring != "sigmoid":
            raise ConfigError("scoring_func", f"unsupported {scoring!r}; accepted: 'sigmoid'", source=source)
        theta, scaling = parse_rope(d, source)
        names = {f.name for f in fields(cls)} - _HF_ONLY_KEYS
        kwargs = {k: d[k] for k in names if k in d}
        # transformers accepts None for these and treats it as "off" / "one group".
        for key, when_none in (("n_group", 1), ("topk_group", 1), ("first_k_dense_replace", 0), ("q_lora_rank", None)):
            if key in kwargs and kwargs[key] is None:
                kwargs[key] = when_none
        for key in ("norm_topk_prob", "rope_interleave", "attention_bias", "tie_word_embeddings"):
            if key in kwargs:
                kwargs[key] = bool(kwargs[key])
        kwargs["attention_options"] = kwargs.get("attention_options") or {}
        return cls(**kwargs, rope_theta=theta, rope_scaling=scaling, source=source)

    def to_hf_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("rope_theta", "rope_scaling", "source"):
            d.pop(key)
        d.update(rope_to_hf(self.rope_theta, self.rope_scaling))
        d["qk_head_dim"] = self.qk_head_dim
        d["head_dim"] = self.qk_rope_head_dim
        d["num_nextn_predict_layers"] = 0  # no multi-token-prediction weights are saved
        d["architectures"] = ["DeepseekV3ForCausalLM"]
        return d


class DeepseekV3Block(nn.Module):
    def __init__(self, config: DeepseekV3Config, layer_idx: int):
        super().__init__()
        c = config
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = MultiHeadLatentAttention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = DeepseekV3MoE(c) if layer_idx >= c.first_k_dense_replace else SwiGLU(c.hidden_size, c.intermediate_size)

    def forward(self, x, cos, sin, mask, cache, layer_idx):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer_idx)
        return x + self.mlp(self.post_attention_layernorm(x))


class DeepseekV3StateDictAdapter(StateDictAdapter):
    """Hugging Face keys are this model's names. Besides the base adapter's drops (the
    multi-token-prediction layer), it also reads the fused in-memory expert layout
    (``mlp.experts.gate_up_proj`` (E, 2I, C), ``mlp.experts.down_proj`` (E, C, I)) that some
    tools write, splitting it into per-expert ``mlp.experts.{i}.*_proj.weight``; saving
    always writes the per-expert layout that transformers' ``save_pretrained`` writes."""

    fp32_fragments = ("e_score_correction_bias",)  # routing decisions hinge on it, as in transformers

    def from_hf(self, key: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        for name, value in super().from_hf(key, tensor):
            prefix, _, leaf = name.rpartition(".experts.")
            if not prefix or leaf not in ("gate_up_proj", "down_proj") or value.dim() != 3:
                yield name, value
                continue
            for i, expert_weight in enumerate(value.unbind(0)):
                if leaf == "down_proj":
                    yield f"{prefix}.experts.{i}.down_proj.weight", expert_weight
                else:
                    gate, up = expert_weight.chunk(2, dim=0)  # (I, C) each
                    yield f"{prefix}.experts.{i}.gate_proj.weight", gate
                    yield f"{prefix}.experts.{i}.up_proj.weight", up


class DeepseekV3ForCausalLM(CausalLM):
    config_class = DeepseekV3Config
    adapter_class = DeepseekV3StateDictAdapter

    def __init__(self, config: DeepseekV3Config):
        super().__init__(config)
        c = config
        rotary = RotaryEmbedding(c.qk_rope_head_dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings)
        self.model = Decoder(
            nn.Embedding(c.vocab_size, c.hidden_size),
            [DeepseekV3Block(c, i) for i in range(c.num_hidden_layers)],
            RMSNorm(c.hidden_size, c.rms_norm_eps),
            rotary,
        )
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.tie_weights()

    def expert_load(self) -> dict[int, torch.Tensor]:
        """Tokens routed to each expert in the last forward, per MoE layer: {layer: (E,)}."""
        return {
            i: layer.mlp.gate.tokens_per_expert
            for i, layer in enumerate(self.model.layers)
            if isinstance(layer.mlp, DeepseekV3MoE) and layer.mlp.gate.tokens_per_expert is not None
        }
