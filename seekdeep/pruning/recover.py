"""Recovery fine-tune: a short full fine-tune of a pruned model on language-modelling data.

Built from :mod:`seekdeep.train` (precision policy and loss scaler, AdamW parameter groups,
warm-up + cosine schedule) like the ``full`` method of ``seekdeep finetune``; the loop is
small enough to own here, and a recipe may run it between pruning and evaluation.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from seekdeep.errors import ConfigError
from seekdeep.train.evaluation import mean_loss
from seekdeep.quantization.convert import iter_token_batches


@dataclass
class RecoveryReport:
    steps: int
    lr: float
    train_losses: list[float] = field(default_factory=list)
    eval_loss_before: float | None = None
    eval_loss_after: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _batch_source(model: nn.Module, data: Any) -> Callable[[], torch.Tensor]:
    """``next_batch`` of a :class:`seekdeep.data.TokenWindows` (or anything with one), else the
    batches of an iterable of (batch, seq) input-id tensors, cycled."""
    if data is None:
        raise ConfigError("data", "recovery needs training data: a TokenWindows or a list of (batch, seq) "
                          "input-id tensors")
    if callable(getattr(data, "next_batch", None)):
        return data.next_batch
    batches = list(iter_token_batches(model, data, field="data", method="recover"))
    return itertools.cycle(batches).__next__


def _eval_batches(model: nn.Module, data: Any, max_batches: int) -> list[torch.Tensor]:
    if callable(getattr(data, "eval_batches", None)):
        return list(data.eval_batches(max_batches))
    return list(iter_token_batches(model, data, field="eval_data", method="recover"))[:max_batches]


def _frozen_backends(model: nn.Module) -> Iterator[nn.Parameter]:
    # Attention backends keep their pre-trained parameters (as in `seekdeep finetune`): the DSA
    # indexer learns from its own KL loss, which this loop does not run.
    for name, param in model.named_parameters():
        if ".inner." in name:
            yield param


def recover(model: nn.Module, data: Any, steps: int, lr: float = 1e-4, *, warmup_steps: int | None = None,
            min_lr_ratio: float = 0.1, weight_decay: float = 0.0, grad_clip: float = 1.0, precision: str = "fp32",
            eval_data: Any = None, eval_batches: int = 20, progress: bool = False) -> RecoveryReport:
    """Fine-tune every weight of ``model`` (in place) for ``steps`` AdamW steps.

    data: a :class:`seekdeep.data.TokenWindows` (its ``next_batch()``) or an iterable of
        (batch, seq) input-id tensors, cycled.
    warmup_steps: linear warm-up before the cosine decay to ``min_lr_ratio * lr`` (default:
        10% of ``steps``).
    precision: ``fp32`` | ``bf16`` | ``fp16`` autocast (a loss scaler for fp16 only).
    eval_data: held-out data (TokenWindows or tensors); the report then has the mean loss
        over its first ``eval_batches`` batches before and after.

    The attention backends' own parameters stay frozen; ``requires_grad`` flags and the
    train / eval mode are restored afterwards."""
    from seekdeep.train import PrecisionPolicy, make_scheduler, param_groups

    for name, value, minimum in (("steps", steps, 1), ("eval_batches", eval_batches, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(name, f"must be an integer >= {minimum}, got {value!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
        raise ConfigError("lr", f"must be a finite number > 0, got {lr!r}")
    if isinstance(grad_clip, bool) or not isinstance(grad_clip, (int, float)) or not grad_clip > 0:
        raise ConfigError("grad_clip", f"must be a number > 0, got {grad_clip!r}")
    warmup_steps = steps // 10 if warmup_steps is None else warmup_steps
    device = model.device
    policy = PrecisionPolicy(precision, device.type)
    next_batch = _batch_source(model, data)
    held_out = _eval_batches(model, eval_data, eval_batches) if eval_data is not None else None

    flags = {param: param.requires_grad for param in model.parameters()}
    was_training = model.training
    report = RecoveryReport(steps=steps, lr=float(lr))
    started = time.perf_counter()
    bar = None
    try:
        for param in model.parameters():
            param.requires_grad_(True)
        for param in _frozen_backends(model):
            param.requires_grad_(False)
        optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95), eps=1e-8)
        scheduler = make_scheduler(optimizer, warmup_steps, steps, min_lr_ratio)
        scaler = policy.make_scaler()
        params = [p for p in model.parameters() if p.requires_grad]
        if held_out is not None:
            report.eval_loss_before = mean_loss(model, held_out, policy)
        model.train()
        bar = tqdm(total=steps, desc="recover", disable=not progress, dynamic_ncols=True)
        for step in range(steps):
            batch = next_batch().to(device)
            with policy.autocast():
                loss = model(batch, labels=batch).loss
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"loss became {value} at step {step + 1}; lower lr or use precision='fp32'")
            report.train_losses.append(value)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}")
        if held_out is not None:
            report.eval_loss_after = mean_loss(model, held_out, policy)
    finally:
        if bar is not None:
            bar.close()
        for param, flag in flags.items():
            param.requires_grad_(flag)
        model.train(was_training)
    report.seconds = time.perf_counter() - started
    return report
