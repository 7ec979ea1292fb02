"""``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` / ``AutoTokenizer`` in the shape
of transformers' classes. seekdeep's models are all causal LMs, so ``AutoModel`` returns the
model with its LM head (``model(input_ids).logits``)."""

from __future__ import annotations

import os
from typing import Any

from seekdeep.models import family
from seekdeep.models.loading import load_config, load_pretrained


class AutoConfig:
    @staticmethod
    def from_pretrained(path_or_id: str | os.PathLike, **overrides: Any):
        if _multimodal_type(path_or_id) == "llava":
            from seekdeep.files import read_json
            from seekdeep.models.loading import resolve_model_dir
            from seekdeep.multimodal.config import LlavaConfig

            config_path = resolve_model_dir(path_or_id) / "config.json"
            return LlavaConfig.from_hf_dict({**read_json(config_path), **overrides}, source=str(config_path))
        if _multimodal_type(path_or_id) == "clip":
            from seekdeep.files import read_json
            from seekdeep.models.loading import resolve_model_dir
            from seekdeep.multimodal.clip import ClipConfig

            config_path = resolve_model_dir(path_or_id) / "config.json"
            return ClipConfig.from_dict({**read_json(config_path), **overrides}, source=str(config_path))
        return load_config(path_or_id, **overrides)

    @staticmethod
    def for_model(model_type: str, **kwargs: Any):
        config_cls, _ = family(model_type)
        return config_cls(model_type=model_type, **kwargs) if "model_type" in config_cls.__dataclass_fields__ else config_cls(**kwargs)


class AutoModelForCausalLM:
    @staticmethod
    def from_pretrained(path_or_id: str | os.PathLike, dtype=None, device=None, **overrides: Any):
        """Load a Hugging Face layout directory or hub id. ``dtype``: torch dtype, 'auto' or a
        name such as 'bfloat16' (default float32); ``overrides`` replace config.json keys, e.g.
        ``attention_backend="dsa"``."""
        return load_pretrained(path_or_id, dtype=dtype, device=device, **overrides)

    @staticmethod
    def from_config(config):
        _, model_cls = family(config.model_type)
        model = model_cls(config)
        model.init_weights()
        return model


class AutoModel(AutoModelForCausalLM):
    """As :class:`AutoModelForCausalLM`, and a ``model_type: llava`` config.json gives the
    vision-language model (:class:`seekdeep.multimodal.llava.LlavaForConditionalGeneration`),
    a ``model_type: clip`` one the dual encoder (:class:`seekdeep.multimodal.clip.ClipModel`)."""

    @staticmethod
    def from_pretrained(path_or_id: str | os.PathLike, dtype=None, device=None, **overrides: Any):
        if _multimodal_type(path_or_id) == "llava":
            from seekdeep.multimodal.llava import LlavaForConditionalGeneration

            return LlavaForConditionalGeneration.from_pretrained(path_or_id, dtype=dtype, device=device, **overrides)
        if _multimodal_type(path_or_id) == "clip":
            from seekdeep.multimodal.clip import ClipModel

            return ClipModel.from_pretrained(path_or_id, dtype=dtype, device=device, **overrides)
        return load_pretrained(path_or_id, dtype=dtype, device=device, **overrides)

    @staticmethod
    def from_config(config):
        if getattr(config, "model_type", None) == "llava":
            from seekdeep.multimodal.llava import LlavaForConditionalGeneration

            return LlavaForConditionalGeneration.from_config(config)
        if getattr(config, "model_type", None) == "clip":
            from seekdeep.multimodal.clip import ClipModel

            return ClipModel.from_config(config)
        return AutoModelForCausalLM.from_config(config)


def _multimodal_type(path_or_id: str | os.PathLike) -> str | None:
    """config.json's model_type when it names a multimodal model, else None."""
    from seekdeep.files import read_json
    from seekdeep.models.loading import resolve_model_dir

    model_type = read_json(resolve_model_dir(path_or_id) / "config.json").get("model_type")
    return model_type if model_type in ("llava", "clip") else None


class AutoModelForSequenceClassification:
    """A family's trunk + a ``score`` head read at each row's last real token
    (:mod:`seekdeep.models.classification`); a causal LM checkpoint gets a fresh head."""

    @staticmethod
    def from_pretrained(path_or_id: str | os.PathLike, dtype=None, device=None, num_labels: int | None = None,
                        id2label: dict[int, str] | None = None, **overrides: Any):
        from seekdeep.models.classification import ForSequenceClassification

        return ForSequenceClassification.from_pretrained(path_or_id, dtype=dtype, device=device, num_labels=num_labels,
                                                         id2label=id2label, **overrides)

    @staticmethod
    def from_config(config, num_labels: int = 2, id2label: dict[int, str] | None = None, problem_type: str | None = None):
        from seekdeep.models.classification import ClassificationHeadConfig, ForSequenceClassification

        model = ForSequenceClassification(config, ClassificationHeadConfig(num_labels, id2label or {}, problem_type))
        model.init_weights()
        return model


class AutoTokenizer:
    @staticmethod
    def from_pretrained(path_or_id: str | os.PathLike, **kwargs: Any):
        from seekdeep.tokenizer import Tokenizer

        return Tokenizer.from_pretrained(path_or_id, **kwargs)
