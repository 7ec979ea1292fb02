"""Vision-language models: a ViT that loads CLIP / SigLIP vision checkpoints, an image
processor matching transformers', a LLaVA-format model on seekdeep's language models with an
optional Flamingo-style gated cross-attention path, and a synthetic spatial VQA default."""

from seekdeep.multimodal.config import CrossAttentionConfig, LlavaConfig, VisionConfig
from seekdeep.multimodal.image_processing import ImageError, ImageProcessor, ImageProcessorConfig, decode_image
from seekdeep.multimodal.vision import VisionTransformer

__all__ = [
    "CrossAttentionConfig",
    "ImageError",
    "ImageProcessor",
    "ImageProcessorConfig",
    "LlavaConfig",
    "VisionConfig",
    "VisionTransformer",
    "decode_image",
]
