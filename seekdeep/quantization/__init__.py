"""Quantisation: ``QuantConfig(method=..., bits=...).apply(model, calibration_data)``.

- ``static``: int8 weights + int8 activations with calibrated scales (``torch._int_mm``);
- ``dynamic``: int8 weights + per-token int8 activations (``torch._int_mm``);
- ``weight_only``: int8 per channel (``torch._weight_int8pack_mm``) or int4 group-wise
  (``torch._weight_int4pack_mm*``), bf16 activations; per-layer 4 / 8 / 16 bits through
  :func:`mixed_precision_config`;
- ``qat``: fake-quantised fine-tuning (straight-through estimator), then conversion.

Quantised models save with ``save_pretrained`` (config.json gains ``quantization_config``)
and load back with ``AutoModel.from_pretrained``.
"""

from seekdeep.quantization.config import LayerScheme, QuantConfig, resolve_plan
from seekdeep.quantization.convert import (calibrate, convert, model_size_bytes, prepare_for_load, quantize,
                                           quantized_state_dict, swap_modules)
from seekdeep.quantization.mixed import assign_bits, layer_bytes, layer_sensitivity, mean_loss, mixed_precision_config
from seekdeep.quantization.modules import (Bf16Embedding, Bf16Linear, Int4Embedding, Int4WeightOnlyLinear, Int8DynamicLinear,
                                           Int8Embedding, Int8StaticLinear, Int8WeightOnlyLinear, TiedEmbedding)
from seekdeep.quantization.qat import FakeQuantEmbedding, FakeQuantLinear, convert_qat, prepare_qat

__all__ = [
    "Bf16Embedding", "Bf16Linear", "FakeQuantEmbedding", "FakeQuantLinear", "Int4Embedding", "Int4WeightOnlyLinear",
    "Int8DynamicLinear", "Int8Embedding", "Int8StaticLinear", "Int8WeightOnlyLinear", "LayerScheme", "QuantConfig",
    "TiedEmbedding", "assign_bits", "calibrate", "convert", "convert_qat", "layer_bytes", "layer_sensitivity",
    "mean_loss", "mixed_precision_config", "model_size_bytes", "prepare_for_load", "prepare_qat", "quantize",
    "quantized_state_dict", "resolve_plan", "swap_modules",
]
