"""Held-out loss: the one evaluation loop recipes, pruning recovery and quantisation
sensitivity share."""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """The device of the first parameter or buffer (quantised models may keep every weight in
    buffers); cpu for a model with neither. A model (or wrapper such as the parallel recipe's)
    that states its ``device`` is taken at its word."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Iterable[torch.Tensor], policy=None) -> float:
    """Token-weighted mean next-token cross-entropy (nats) of ``model`` over (B, T) input-id
    ``batches``, in eval mode (the previous mode is restored). ``policy``: a
    :class:`~seekdeep.train.PrecisionPolicy` whose autocast wraps each forward (None: none)."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    total, count = 0.0, 0
    try:
        for batch in batches:
            batch = batch.to(device)
            with policy.autocast() if policy is not None else contextlib.nullcontext():
                loss = model(batch, labels=batch).loss
            n = batch.shape[0] * (batch.shape[1] - 1)
            total += float(loss) * n
            count += n
    finally:
        model.train(was_training)
    return total / max(count, 1)
