"""Quantisation-aware training: fake-quantise, fine-tune, convert.

:func:`prepare_qat` swaps every planned ``nn.Linear`` / ``nn.Embedding`` for a subclass whose
forward sees the weight exactly as the converted model will hold it (quantised then
dequantised with the functions the converter uses) and, for the int8 target, activations
fake-quantised per token. Gradients pass the rounding unchanged (straight-through
estimator), so the float weights learn to sit well on the grid. The modules share the
original parameters, so any training loop and optimizer work unchanged; :func:`convert_qat`
then runs the ordinary converter on those weights.

Targets: bits=4 -> int4 group-wise weight-only; bits=8 -> int8 weights with dynamic int8
activations.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seekdeep.errors import ConfigError
from seekdeep.quantization import kernels as K
from seekdeep.quantization.config import LayerScheme, QuantConfig, resolve_plan
from seekdeep.quantization.convert import _model_device, _set_submodule, convert, iter_cycle, iter_token_batches


def straight_through(x: torch.Tensor, x_quantized: torch.Tensor) -> torch.Tensor:
    """``x_quantized`` in the forward pass (exactly: ``x - x.detach()`` is zero), identity
    gradient to ``x`` in the backward pass."""
    return x_quantized.detach() + (x - x.detach())


def fake_quantize_weight(weight: torch.Tensor, scheme: LayerScheme) -> torch.Tensor:
    """The weight as the converted layer will hold it, with a straight-through gradient."""
    with torch.no_grad():
        if scheme.bits == 4:
            q, scales_and_zeros = K.quantize_int4(weight, scheme.group_size, scheme.symmetric)
            target = K.dequantize_int4(q, scales_and_zeros, scheme.group_size)
        elif scheme.bits == 8:
            target = K.dequantize_int8(*K.quantize_int8(weight, scheme.per_channel))
        else:
            target = weight.to(torch.bfloat16).float()
    return straight_through(weight, target.to(weight.dtype))


def fake_quantize_per_token(x: torch.Tensor) -> torch.Tensor:
    """Dynamic int8 per-token fake quantisation of activations (straight-through)."""
    with torch.no_grad():
        x_q, scale = K.quantize_activations_per_token(x.reshape(-1, x.shape[-1]))
        target = (x_q.float() * scale).view(x.shape).to(x.dtype)
    return straight_through(x, target)


class FakeQuantLinear(nn.Linear):
    """``nn.Linear`` that computes with fake-quantised weights (and activations for int8)."""

    scheme: LayerScheme

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: LayerScheme) -> "FakeQuantLinear":
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        new.weight = linear.weight  # shared: optimizers and tied embeddings keep working
        new.bias = linear.bias
        new.scheme = scheme
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scheme.kind == "int8_dynamic":
            x = fake_quantize_per_token(x)
        return F.linear(x, fake_quantize_weight(self.weight, self.scheme), self.bias)


class FakeQuantEmbedding(nn.Embedding):
    scheme: LayerScheme

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, scheme: LayerScheme) -> "FakeQuantEmbedding":
        with torch.device("meta"):
            new = cls(embedding.num_embeddings, embedding.embedding_dim, padding_idx=embedding.padding_idx)
        new.weight = embedding.weight
        new.scheme = scheme
        return new

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, fake_quantize_weight(self.weight, self.scheme), self.padding_idx)


def _row_scheme(scheme: LayerScheme, plan: dict[str, LayerScheme]) -> LayerScheme:
    """How an embedding's rows are quantised: its own scheme, or lm_head's when tied."""
    return plan["lm_head"] if scheme.kind == "tied" else scheme


def prepare_qat(model: nn.Module, cfg: QuantConfig) -> nn.Module:
    """Swap the modules ``cfg`` plans for fake-quantised ones (in place); returns ``model``."""
    if cfg.method != "qat":
        raise ConfigError("method", f"prepare_qat needs method='qat', got {cfg.method!r}")
    if getattr(model, "qat_plan", None) is not None:
        raise ConfigError("model", "is already prepared for QAT")
    plan = resolve_plan(model, cfg)
    if not plan:
        raise ConfigError("skip", "leaves no module to quantise")
    for name, scheme in plan.items():
        module = model.get_submodule(name)
        if isinstance(module, nn.Embedding):
            _set_submodule(model, name, FakeQuantEmbedding.from_embedding(module, _row_scheme(scheme, plan)))
        else:
            _set_submodule(model, name, FakeQuantLinear.from_linear(module, scheme))
    model.qat_plan = (cfg, plan)
    return model


def convert_qat(model: nn.Module) -> nn.Module:
    """Quantise a model prepared by :func:`prepare_qat` (in place); returns ``model``."""
    prepared = getattr(model, "qat_plan", None)
    if prepared is None:
        raise ConfigError("model", "was not prepared with prepare_qat")
    cfg, plan = prepared
    del model.qat_plan
    return convert(model, cfg, plan)


def quantization_aware_finetune(model: nn.Module, cfg: QuantConfig, data: Any) -> nn.Module:
    """``QuantConfig(method="qat").apply``: prepare, fine-tune ``cfg.qat_steps`` steps of
    AdamW (lr ``cfg.qat_lr``, cosine decay, clip 1.0) on ``data`` (cycled), convert."""
    batches = list(iter_token_batches(model, data, field="calibration_data", method="qat"))
    prepare_qat(model, cfg)
    device = _model_device(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.qat_lr, weight_decay=0.0, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.qat_steps)))
    was_training = model.training
    model.train()
    try:
        for batch in iter_cycle(batches, cfg.qat_steps):
            batch = batch.to(device)
            loss = model(batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        model.train(was_training)
    return convert_qat(model)
