"""A LLaVA-format vision-language model: vision tower -> 2-layer MLP projector -> any seekdeep
causal LM, loaded and saved in the layout of transformers' LlavaForConditionalGeneration
(``model_type: llava``, nested ``vision_config`` / ``text_config``).

Two ways for the image to reach the LM:

- prefix (LLaVA, the default): each image placeholder token in ``input_ids`` is replaced by
  one projected patch feature, so an image takes ``config.tokens_per_image`` placeholders
  (expanded by :class:`seekdeep.multimodal.processing.MultimodalProcessor`);
- gated cross-attention (Flamingo, ``config.cross_attention``): one marker token per image,
  and gated cross-attention blocks before every N-th decoder layer attend from the text to
  the image features (see :mod:`seekdeep.multimodal.cross_attention`).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from seekdeep.errors import CheckpointError, ConfigError
from seekdeep.models import family
from seekdeep.models.base import StateDictAdapter
from seekdeep.models.common import CausalLMOutput, KVCache
from seekdeep.multimodal.config import LlavaConfig
from seekdeep.multimodal.cross_attention import GatedCrossAttentionBlock, MediaContext, PerceiverResampler
from seekdeep.multimodal.vision import VisionTransformer, activation, vision_key_from_hf


class ImagePlaceholderError(ConfigError):
    """The image placeholders in ``input_ids`` do not match the images given."""


class LlavaMultiModalProjector(nn.Module):
    def __init__(self, config: LlavaConfig):
        super().__init__()
        in_dim = config.vision_config.hidden_size * len(config.feature_layers)
        out_dim = config.text_config.hidden_size
        self.linear_1 = nn.Linear(in_dim, out_dim, bias=config.multimodal_projector_bias)
        self.act = activation(config.projector_hidden_act)
        self.linear_2 = nn.Linear(out_dim, out_dim, bias=config.multimodal_projector_bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class LlavaStateDictAdapter(StateDictAdapter):
    """Names of a llava-hf checkpoint (transformers 4: ``language_model.model.*``,
    ``vision_tower.vision_model.*``; transformers 5: ``model.language_model.*``,
    ``model.vision_tower.*``) <-> this model's; the text model's own adapter maps the LM part."""

    def __init__(self, config: LlavaConfig):
        super().__init__(config)
        _, lm_cls = family(config.text_config.model_type)
        self.text = lm_cls.adapter_class(config.text_config)

    def from_hf(self, key: str, tensor: torch.Tensor):
        hf_key = key
        if key.startswith(("model.vision_tower.", "model.multi_modal_projector.", "model.language_model.")):
            key = key.removeprefix("model.")
        if key.startswith("vision_tower."):
            name = vision_key_from_hf(key)
            if name is not None:
                yield f"vision_tower.{name}", tensor
            return
        if key.startswith(("multi_modal_projector.", "resampler.", "cross_attention_layers.")):
            yield key, tensor
            return
        if key.startswith(("language_model.model.", "language_model.lm_head.")):
            lm_key = key.removeprefix("language_model.")
        elif key.startswith("language_model."):  # transformers 5 in memory: model.language_model.<decoder>
            lm_key = "model." + key.removeprefix("language_model.")
        elif key.startswith("lm_head."):
            lm_key = key
        else:
            raise CheckpointError(f"unexpected tensor {hf_key!r} in a llava checkpoint")
        for name, t in self.text.from_hf(lm_key, tensor):
            yield f"language_model.{name}", t

    def to_hf(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        lm = {k.removeprefix("language_model."): v for k, v in state_dict.items() if k.startswith("language_model.")}
        out = {f"language_model.{k}": v for k, v in self.text.to_hf(lm).items()}
        if self.config.tie_word_embeddings:
            out.pop("language_model.lm_head.weight", None)
        for key, value in state_dict.items():
            if key.startswith("vision_tower."):
                out["vision_tower.vision_model." + key.removeprefix("vision_tower.")] = value
            elif not key.startswith("language_model."):
                out[key] = value
        return out

    def keeps_fp32(self, key: str) -> bool:
        return key.startswith("language_model.") and self.text.keeps_fp32(key.removeprefix("language_model."))

    def is_optional(self, key: str) -> bool:
        return key.startswith("language_model.") and self.text.is_optional(key.removeprefix("language_model."))


class LlavaForConditionalGeneration(nn.Module):
    """``model(input_ids=..., pixel_values=...)`` and ``model.generate(input_ids=...,
    pixel_values=..., max_new_tokens=...)`` as transformers' class; ``pixel_values`` holds the
    batch's images in the order their placeholders appear (row by row)."""

    config_class = LlavaConfig
    adapter_class = LlavaStateDictAdapter
    tied_weight_keys = ("language_model.lm_head.weight",)  # left out of a checkpoint when tie_word_embeddings

    def __init__(self, config: LlavaConfig):
        super().__init__()
        self.config = config
        self.vision_tower = VisionTransformer(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        _, lm_cls = family(config.text_config.model_type)
        self.language_model = lm_cls(config.text_config)
        xa = config.cross_attention
        self.resampler = None
        self.cross_attention_layers = None
        if xa is not None:
            dim = config.text_config.hidden_size
            if xa.num_latents:
                self.resampler = PerceiverResampler(dim, xa.num_latents, xa.resampler_depth, xa.num_heads, xa.ff_mult)
            layers = self.language_model.model.layers
            self._xattn_at = list(range(0, len(layers), xa.every_n_layers))
            self.cross_attention_layers = nn.ModuleList(GatedCrossAttentionBlock(dim, xa.num_heads, xa.ff_mult) for _ in self._xattn_at)
            self._media: MediaContext | None = None
            for block, idx in zip(self.cross_attention_layers, self._xattn_at):
                layers[idx].register_forward_pre_hook(self._make_hook(block))
            if xa.freeze_language_model:
                self.language_model.requires_grad_(False)

    # -- the gated cross-attention path: a pre-hook on the LM's layers keeps the LM's module
    # names (and so its checkpoints) unchanged
    def _make_hook(self, block: GatedCrossAttentionBlock):
        def hook(module, args):
            if self._media is None:
                return None
            hidden, *rest = args
            return (block(hidden, self._media), *rest)

        return hook

    @property
    def model(self):
        """The language model's decoder, for code that reaches ``model.model.layers`` (the
        serving engine's KV-cache probe)."""
        return self.language_model.model

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.model.embed_tokens

    @torch.no_grad()
    def init_weights(self, std: float | None = None, position_init: str = "normal") -> None:
        """Random initialisation for training from scratch (the LM's own rules for the LM; the
        cross-attention gates stay at 0). ``position_init``: see VisionTransformer.init_weights."""
        std = std if std is not None else self.config.text_config.initializer_range
        self.language_model.init_weights(std)
        self.vision_tower.init_weights(std, position_init)
        for module in [self.multi_modal_projector, self.resampler, self.cross_attention_layers]:
            if module is None:
                continue
            for sub in module.modules():
                if isinstance(sub, nn.Linear):
                    nn.init.normal_(sub.weight, std=std)
                    if sub.bias is not None:
                        nn.init.zeros_(sub.bias)
                elif hasattr(sub, "reset_parameters") and not isinstance(sub, nn.Linear):
                    sub.reset_parameters()

    # -- images
    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(num_images, tokens_per_image, text hidden) projected features."""
        out = self.vision_tower(pixel_values.to(self.vision_tower.dtype), output_hidden_states=True)
        selected = [out.hidden_states[i] for i in self.config.feature_layers]
        if self.config.vision_feature_select_strategy == "default":
            selected = [h[:, 1:] for h in selected]  # drop the class token
        return self.multi_modal_projector(torch.cat(selected, dim=-1))

    def _check_placeholders(self, input_ids: torch.Tensor, image_features: torch.Tensor | None, past_len: int) -> torch.Tensor:
        """(B, T) placeholder mask; their count must match the images (not checked in decode steps)."""
        is_image = input_ids == self.config.image_token_index
        n_tokens = int(is_image.sum())
        n_images = 0 if image_features is None else image_features.shape[0]
        per_image = 1 if self.config.cross_attention is not None else self.config.tokens_per_image
        if past_len and image_features is None:
            return is_image  # a decode step: a generated placeholder id is plain text
        if n_tokens != n_images * per_image:
            what = "one marker token" if per_image == 1 else f"{per_image} placeholder tokens"
            raise ImagePlaceholderError(
                "input_ids",
                f"{n_tokens} image placeholder token(s) (id {self.config.image_token_index}) for {n_images} image(s); each image "
                f"needs {what} (MultimodalProcessor expands '<image>' to the right count)",
            )
        return is_image

    # -- forward
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        image_features: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """``image_features``: precomputed :meth:`get_image_features` (instead of pixel_values)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ConfigError("input_ids", "pass exactly one of input_ids / inputs_embeds")
        if inputs_embeds is not None:
            if pixel_values is not None:
                raise ConfigError("pixel_values", "with inputs_embeds, merge the image features into the embeddings yourself")
            return self.language_model(attention_mask=attention_mask, position_ids=position_ids, past_key_values=past_key_values,
                                       use_cache=use_cache, labels=labels, inputs_embeds=inputs_embeds, logits_to_keep=logits_to_keep)
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ConfigError("input_ids", f"expected shape (batch, seq), got {getattr(input_ids, 'shape', type(input_ids).__name__)}")
        past_len = past_key_values.seq_len if past_key_values is not None else 0
        if use_cache and past_key_values is None:
            past_key_values = KVCache(len(self.language_model.model.layers))
        if image_features is None and pixel_values is not None:
            image_features = self.get_image_features(pixel_values)
        is_image = self._check_placeholders(input_ids, image_features, past_len)
        embeds = self.get_input_embeddings()(input_ids)  # (B, T, C)
        lm_kwargs = dict(attention_mask=attention_mask, position_ids=position_ids, past_key_values=past_key_values,
                         use_cache=use_cache, labels=labels, logits_to_keep=logits_to_keep)
        if self.config.cross_attention is None:
            if image_features is not None:
                embeds = embeds.masked_scatter(is_image[..., None], image_features.to(embeds.dtype))
            return self.language_model(inputs_embeds=embeds, **lm_kwargs)
        if self.training and self.language_model.gradient_checkpointing and image_features is not None:
            # the blocks read the media from the model while it runs; a recompute in backward would not see it
            raise ConfigError("gradient_checkpointing", "is not supported with cross_attention fusion; turn it off or use prefix fusion")
        media = self._media_for(input_ids, is_image, image_features, past_key_values)
        self._media = media
        try:
            return self.language_model(inputs_embeds=embeds, **lm_kwargs)
        finally:
            self._media = None

    def _media_for(self, input_ids, is_image, image_features, cache) -> MediaContext | None:
        """Which images each new token may attend to; the state lives on the KV cache so a
        decode step continues where the prompt left off."""
        state = getattr(cache, "media_state", None) if cache is not None else None
        if image_features is not None:
            if self.resampler is not None:
                image_features = self.resampler(image_features)  # (N, L, C)
            state = MediaContext.build(image_features, is_image, self.config.cross_attention.media_attention)
        elif state is not None:
            state = state.advance(is_image)
        if cache is not None and state is not None:
            cache.media_state = state
        return state

    # -- generation
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        """Prompt + new ids; the images enter with the prompt (prefill) only."""
        from seekdeep.generation import generate

        inputs = {} if pixel_values is None else {"pixel_values": pixel_values}
        return generate(self, input_ids, attention_mask=attention_mask, model_inputs=inputs, **kwargs)

    def stream_generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, **kwargs: Any):
        from seekdeep.generation import stream_generate

        inputs = {} if pixel_values is None else {"pixel_values": pixel_values}
        return stream_generate(self, input_ids, model_inputs=inputs, **kwargs)

    # -- Hugging Face layout (names: LlavaStateDictAdapter; reading and writing: seekdeep.models.loading)
    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict under the names llava-hf checkpoints use (transformers 4 and 5 read them)."""
        return {k: v.detach().contiguous() for k, v in self.adapter_class(self.config).to_hf(self.state_dict()).items()}

    def save_pretrained(self, save_directory: str | os.PathLike, max_shard_size: int | str = "5GB") -> None:
        from seekdeep.models.loading import save_pretrained

        save_pretrained(self, save_directory, max_shard_size=max_shard_size)

    @classmethod
    def from_config(cls, config: LlavaConfig) -> "LlavaForConditionalGeneration":
        model = cls(config)
        model.init_weights()
        return model

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, dtype=None, device=None, **overrides: Any) -> "LlavaForConditionalGeneration":
        """A llava directory (transformers' layout); ``overrides`` replace top-level config keys,
        ``text_config`` keys go in ``text_overrides={...}`` (e.g. ``{"attention_backend": "dsa"}``)."""
        from seekdeep.files import read_json
        from seekdeep.models.loading import _materialise_fresh, parse_dtype, read_checkpoint_state, resolve_model_dir

        model_dir = resolve_model_dir(path_or_id)
        raw = read_json(model_dir / "config.json")
        text_overrides = overrides.pop("text_overrides", None) or {}
        raw.update(overrides)
        if text_overrides:
            raw["text_config"] = {**raw.get("text_config", {}), **text_overrides}
        if raw.get("model_type") != "llava":
            raise ConfigError("model_type", f"{raw.get('model_type')!r} is not a llava checkpoint", source=str(model_dir / "config.json"))
        config = LlavaConfig.from_hf_dict(raw, source=str(model_dir / "config.json"))
        torch_dtype = parse_dtype(dtype, raw)
        device = torch.device(device) if device is not None else torch.device("cpu")
        with torch.device("meta"):
            model = cls(config)
        state, fresh = read_checkpoint_state(model, model_dir, dtype=torch_dtype, device=device)
        model.load_state_dict(state, strict=False, assign=True)
        if fresh:  # attention-backend parameters (dsa indexer, gate) a plain checkpoint has none of
            _materialise_fresh(model, fresh, device, torch_dtype)
        model.language_model.tie_weights()
        return model.eval()
