"""seekdeep: efficient LLMs with dynamic sparse attention on PyTorch."""

from seekdeep.auto import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from seekdeep.errors import (
    CheckpointError,
    ConfigError,
    GenerationError,
    ModelNotFoundError,
    SeekdeepError,
    UnknownArchitectureError,
    UnknownBackendError,
)

__version__ = "0.1.0"

__all__ = [
    "AutoConfig",
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForSequenceClassification",
    "AutoTokenizer",
    "CheckpointError",
    "ConfigError",
    "GenerationError",
    "ModelNotFoundError",
    "SeekdeepError",
    "UnknownArchitectureError",
    "UnknownBackendError",
]
