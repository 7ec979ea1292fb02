"""Model families, looked up by the ``model_type`` of a Hugging Face config.json."""

from __future__ import annotations

import importlib

from seekdeep.errors import UnknownArchitectureError

# model_type -> (module, config class, model class)
MODEL_FAMILIES: dict[str, tuple[str, str, str]] = {
    "llama": ("seekdeep.models.llama", "LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("seekdeep.models.llama", "LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("seekdeep.models.llama", "LlamaConfig", "LlamaForCausalLM"),
    "qwen3": ("seekdeep.models.llama", "LlamaConfig", "LlamaForCausalLM"),
    "deepseek_v3": ("seekdeep.models.deepseek_v3", "DeepseekV3Config", "DeepseekV3ForCausalLM"),
}


def family(model_type: str, source: str | None = None):
    """(config class, model class) for a model_type."""
    if model_type not in MODEL_FAMILIES:
        raise UnknownArchitectureError(
            "model_type", f"unknown architecture {model_type!r}; accepted: {', '.join(sorted(MODEL_FAMILIES))}", source=source
        )
    module_name, config_name, model_name = MODEL_FAMILIES[model_type]
    module = importlib.import_module(module_name)
    return getattr(module, config_name), getattr(module, model_name)
