"""Parameter-efficient fine-tuning: LoRA (rsLoRA, DoRA, on float or quantized bases),
Houlsby bottleneck adapters and prompt tuning, as named adapters on the model itself
(``model.add_adapter("task", LoRAConfig(r=16, lora_alpha=32, target_modules=[...]))``), saved
and loaded in peft's file layout, plus continual learning with one adapter per task."""

from seekdeep.peft.adapters import BottleneckLayer
from seekdeep.peft.config import (ALL_LINEAR, AdapterConfig, BottleneckConfig, LoraConfig, LoRAConfig,
                                  PromptTuningConfig, parse_lora_spec)
from seekdeep.peft.continual import ContinualLearner
from seekdeep.peft.io import load_adapter, read_adapter_config, save_adapter
from seekdeep.peft.layers import ModulesToSaveWrapper, TunerLayer
from seekdeep.peft.lora import LoRALinear
from seekdeep.peft.model import AdapterMixin
from seekdeep.peft.prompt import PromptEmbedding

__all__ = [
    "ALL_LINEAR", "AdapterConfig", "AdapterMixin", "BottleneckConfig", "BottleneckLayer", "ContinualLearner",
    "LoRAConfig", "LoRALinear", "LoraConfig", "ModulesToSaveWrapper", "PromptEmbedding", "PromptTuningConfig",
    "TunerLayer", "load_adapter", "parse_lora_spec", "read_adapter_config", "save_adapter",
]
