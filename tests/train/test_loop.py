"""The shared end of a training step (seekdeep.train.loop): order of evaluation, checkpoint and
budget stop, and the non-finite loss error, as every recipe relies on them."""

import math

import pytest
import torch

from seekdeep.train import StepEnd, optimizer_step
from seekdeep.train.precision import PrecisionPolicy


def test_eval_and_checkpoint_intervals():
    events = []
    end = StepEnd(steps=6, eval_interval=2, checkpoint_interval=4, max_time=None, say=events.append)
    for step in range(1, 7):
        assert not end(step, 1.0, evaluate=lambda s=step: events.append(("eval", s)),
                       checkpoint=lambda s=step: events.append(("ckpt", s)))
    # no periodic evaluation at the last step (the recipe's final one covers it); a checkpoint there
    assert events == [("eval", 2), ("eval", 4), ("ckpt", 4), ("ckpt", 6)]
    assert not end.stopped_early


def test_budget_stops_with_a_checkpoint_and_without_an_eval():
    events = []
    end = StepEnd(steps=100, eval_interval=1, checkpoint_interval=50, max_time=0.0, say=events.append)
    assert end(3, 1.0, evaluate=lambda: events.append("eval"), checkpoint=lambda: events.append("ckpt"))
    assert end.stopped_early
    assert events[0] == "ckpt" and "time budget" in events[1] and "eval" not in events


def test_agreement_across_ranks_decides():
    # one rank out of time: every rank must stop (the agreement says so) and checkpoint
    saved = []
    end = StepEnd(steps=10, checkpoint_interval=5, max_time=None, say=lambda _: None, agree=lambda local: True)
    assert end(1, 0.5, checkpoint=lambda: saved.append(1))
    assert saved == [1]


@pytest.mark.parametrize("loss", [math.nan, math.inf])
def test_non_finite_loss_names_the_step(loss):
    end = StepEnd(steps=10, checkpoint_interval=5, max_time=None, hint="lower --lr")
    with pytest.raises(FloatingPointError, match="at step 7; lower --lr"):
        end(7, loss, checkpoint=lambda: None)


def test_optimizer_step_clips_steps_and_advances_the_schedule():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    scaler = PrecisionPolicy("fp32", "cpu").make_scaler()
    before = layer.weight.detach().clone()
    (layer(torch.full((2, 4), 100.0)).sum()).backward()
    norm, applied = optimizer_step(opt, sched, scaler, layer.parameters(), grad_clip=1.0)
    assert applied and norm > 1.0  # the norm before clipping
    step = (layer.weight.detach() - before).norm()
    assert step <= 0.1 * 1.0 + 1e-6  # lr times the clipped norm bounds the update
    assert all(p.grad is None for p in layer.parameters())
    assert sched.get_last_lr()[0] == pytest.approx(0.05)
    optimizer_step(opt, None, scaler, layer.parameters(), grad_clip=1.0)  # caller owns the schedule
    assert sched.get_last_lr()[0] == pytest.approx(0.05)
