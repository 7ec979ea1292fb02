"""The parts of a training step every recipe shares: the optimizer step with loss scaling and
clipping, and the end of a step (loss check, time budget, periodic evaluation and checkpoint).

Recipes keep their own forward / loss code, which is what differs between them, and call these
two pieces so that a budget, a non-finite loss or a checkpoint interval behaves the same in
``seekdeep train``, ``finetune``, ``distill``, ``sft`` and ``rl``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch


def optimizer_step(optimizer: torch.optim.Optimizer, scheduler: Any | None, scaler: Any, params: Iterable[torch.nn.Parameter],
                   grad_clip: float, clip: Callable[[float], Any] | None = None) -> tuple[float, bool]:
    """Unscale, clip, step, update the loss scale, zero the gradients and advance the schedule
    (``scheduler=None``: the caller advances it, e.g. once after several policy epochs).

    ``clip`` replaces the local ``clip_grad_norm_`` (a sharded model clips across ranks). Returns
    the gradient norm before clipping and whether the step was applied (a dynamic loss scaler
    skips the step on an overflow)."""
    scaler.unscale_(optimizer)
    if clip is not None:
        grad_norm = clip(grad_clip)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], grad_clip)
    applied = scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return float(grad_norm), applied is not False


class StepEnd:
    """What happens after step ``step`` of ``steps``, in one order for every recipe.

    1. a non-finite loss stops the run with a ``FloatingPointError`` naming the step;
    2. the time budget (``max_time`` seconds from construction) is checked; ``agree`` (under
       torchrun) turns each rank's answer into one answer so every rank stops at the same step;
    3. every ``eval_interval`` steps, unless it is the last step or time is up, ``evaluate()`` runs
       (the final evaluation is the recipe's own);
    4. every ``checkpoint_interval`` steps, at the last step and when time is up,
       ``checkpoint()`` runs, so a budget-stopped run can be resumed;
    5. returns True when the loop must stop early; ``stopped_early`` records it.
    """

    def __init__(self, *, steps: int, checkpoint_interval: int, max_time: float | None,
                 eval_interval: int | None = None, say: Callable[[str], Any] = print,
                 agree: Callable[[bool], bool] | None = None, hint: str = "lower --lr or use --precision fp32"):
        self.steps, self.checkpoint_interval, self.eval_interval = steps, checkpoint_interval, eval_interval
        self.max_time, self.say, self.agree, self.hint = max_time, say, agree, hint
        self.started = time.perf_counter()
        self.stopped_early = False

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def __call__(self, step: int, loss: float, *, checkpoint: Callable[[], Any],
                 evaluate: Callable[[], Any] | None = None) -> bool:
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {step}; {self.hint}")
        out_of_time = self.max_time is not None and self.elapsed() > self.max_time
        if (evaluate is not None and self.eval_interval and step % self.eval_interval == 0 and step < self.steps
                and not out_of_time):
            evaluate()
        if self.agree is not None:
            out_of_time = self.agree(out_of_time)
        if step % self.checkpoint_interval == 0 or step == self.steps or out_of_time:
            checkpoint()
        if out_of_time:
            self.stopped_early = True
            budget = f" of {self.max_time:.0f}s" if self.max_time is not None else " (of another rank)"
            self.say(f"time budget{budget} reached at step {step}")
        return out_of_time
