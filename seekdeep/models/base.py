"""What every seekdeep causal LM shares: the decoder loop, the loss, generation, saving and
loading. A family file (``llama.py``, ``deepseek_v3.py``) supplies its config, its blocks and
its state-dict adapter."""

from __future__ import annotations

import os
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from seekdeep.attention import AttentionMask
from seekdeep.models.common import CausalLMOutput, KVCache, RotaryEmbedding, positions_from_mask
from seekdeep.peft.model import AdapterMixin


class StateDictAdapter:
    """Maps between Hugging Face checkpoint keys and this model's parameter names.

    seekdeep keeps Hugging Face's module names, so the default adapter only drops keys
    that hold no parameters here (cached rotary tables, layers beyond ``num_hidden_layers``)
    and leaves out a tied ``lm_head``.
    """

    #: parameter-name fragments that a plain Hugging Face checkpoint cannot have (they belong
    #: to seekdeep's attention backends) and that are initialised fresh when absent.
    optional_fragments = (".self_attn.inner.",)
    #: tensors kept in fp32 whatever dtype the model is loaded in (numerically sensitive).
    fp32_fragments: tuple[str, ...] = ()

    def __init__(self, config):
        self.config = config

    def from_hf(self, key: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        if "rotary_emb.inv_freq" in key:
            return
        parts = key.split(".")
        if len(parts) > 2 and parts[1] == "layers" and int(parts[2]) >= self.config.num_hidden_layers:
            return  # e.g. DeepSeek's multi-token-prediction layer
        yield key, tensor

    def to_hf(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(state_dict)
        if self.config.tie_word_embeddings:
            out.pop("lm_head.weight", None)
        return out

    def keeps_fp32(self, key: str) -> bool:
        return any(frag in key for frag in self.fp32_fragments)

    def is_optional(self, key: str) -> bool:
        return any(frag in key for frag in self.optional_fragments)


class Decoder(nn.Module):
    """embed -> blocks -> final norm, with optional activation checkpointing per block."""

    def __init__(self, embed_tokens: nn.Embedding, layers: list[nn.Module], norm: nn.Module, rotary: RotaryEmbedding):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.rotary_emb = rotary
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: KVCache | None,
        inputs_embeds: torch.Tensor | None = None,
        sliding_windows: list[int | None] | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        batch, q_len = hidden.shape[:2]
        past_len = cache.seq_len if cache is not None else 0
        if attention_mask is not None and attention_mask.shape[-1] != past_len + q_len:
            raise ValueError(
                f"attention_mask: expected {past_len + q_len} columns (cached + new tokens), got {attention_mask.shape[-1]}"
            )
        if document_ids is not None:
            self._check_packed(document_ids, batch, q_len, cache)
            if position_ids is None:
                position_ids = positions_in_documents(document_ids)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, past_len, q_len, batch, hidden.device)
        cos, sin = self.rotary_emb(position_ids, hidden.dtype)
        key_valid = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
        for idx, layer in enumerate(self.layers):
            window = sliding_windows[idx] if sliding_windows else None
            mask = AttentionMask(q_len, past_len + q_len, key_valid, window, document_ids)
            if self.gradient_checkpointing and self.training and cache is None:
                hidden = checkpoint(layer, hidden, cos, sin, mask, None, idx, use_reentrant=False)
            else:
                hidden = layer(hidden, cos, sin, mask, cache, idx)
        return self.norm(hidden)

    def _check_packed(self, document_ids: torch.Tensor, batch: int, q_len: int, cache) -> None:
        from seekdeep.attention.dense import EagerAttention, SDPAAttention
        from seekdeep.attention.gated import GatedAttention
        from seekdeep.errors import ConfigError

        if tuple(document_ids.shape) != (batch, q_len):
            raise ValueError(f"document_ids: expected shape {(batch, q_len)} like input_ids, got {tuple(document_ids.shape)}")
        if cache is not None:
            raise ValueError("document_ids: packed rows are for training / scoring, not for a KV-cached forward")
        for name, module in self.named_modules():
            # only backends that attend through AttentionMask.to_bool see the block-diagonal mask
            if name.endswith(".inner") and not isinstance(module, (EagerAttention, SDPAAttention, GatedAttention)):
                raise ConfigError("attention_backend", f"packed sequences (document_ids) need a dense backend "
                                  f"(eager, sdpa, gated); {name} is {type(module).__name__}")


def positions_in_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids of packed rows -> (B, T) positions counted from each document's start."""
    slots = torch.arange(document_ids.shape[1], device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return torch.where(starts, slots, 0).cummax(1).values.neg().add(slots)  # slot - slot of the document's start


class CausalLM(AdapterMixin, nn.Module):
    """Base of the ``*ForCausalLM`` classes: ``model`` (a :class:`Decoder`) and ``lm_head``."""

    config_class: type
    adapter_class: type[StateDictAdapter] = StateDictAdapter
    model: Decoder
    lm_head: nn.Linear

    def __init__(self, config):
        super().__init__()
        self.config = config

    # -- training switches
    @property
    def gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        self.model.gradient_checkpointing = bool(enabled)

    def gradient_checkpointing_enable(self) -> None:
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def sliding_windows(self) -> list[int | None] | None:
        return None

    # -- weights
    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """Random initialisation for training from scratch: normal(0, initializer_range) for
        linears and embeddings, ones for norms; attention backends (``*.inner``) then apply
        their own initialisation (e.g. the attention gate starts at exactly 1)."""
        std = std if std is not None else getattr(self.config, "initializer_range", 0.02)
        backends = []
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif name.endswith(".inner") and hasattr(module, "reset_parameters"):
                backends.append(module)
            elif module is not self and hasattr(module, "reset_parameters") and not list(module.children()):
                module.reset_parameters()  # norms and other leaf modules
        for module in backends:
            module.reset_parameters()
        self.tie_weights()

    # -- forward
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        document_ids: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("input_ids / inputs_embeds: pass exactly one of them")
        if input_ids is not None and input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected shape (batch, seq), got {tuple(input_ids.shape)}")
        if use_cache and past_key_values is None:
            past_key_values = KVCache(len(self.model.layers))
        hidden = self.model(
            input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, self.sliding_windows(), document_ids
        )
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        aux = [m.indexer_loss for m in self.modules() if getattr(m, "indexer_loss", None) is not None]
        return CausalLMOutput(
            logits=logits,
            loss=loss,
            aux_loss=torch.stack(aux).sum() if aux else None,
            past_key_values=past_key_values,
            hidden_states=hidden,
        )

    # -- generation
    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Prompt + new token ids, like transformers' ``generate``; see :func:`seekdeep.generation.generate`."""
        from seekdeep.generation import generate

        return generate(self, input_ids, **kwargs)

    def stream_generate(self, input_ids: torch.Tensor, **kwargs: Any):
        from seekdeep.generation import stream_generate

        return stream_generate(self, input_ids, **kwargs)

    # -- persistence
    def save_pretrained(self, save_directory: str | os.PathLike, max_shard_size: int | str = "5GB") -> None:
        from seekdeep.models.loading import save_pretrained

        save_pretrained(self, save_directory, max_shard_size=max_shard_size)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, dtype=None, device=None, **overrides: Any):
        from seekdeep.models.loading import load_pretrained

        return load_pretrained(path_or_id, dtype=dtype, device=device, expected_class=cls, **overrides)
