import io
import math

import pytest
import torch

from seekdeep.errors import ConfigError
from seekdeep.optim import MixedPrecisionOptimizer
from seekdeep.train import make_scheduler, warmup_cosine


def test_warmup_cosine_key_points():
    kw = dict(warmup_steps=4, total_steps=14, max_lr=1.0, min_lr=0.1)
    assert warmup_cosine(0, **kw) == pytest.approx(0.25)  # the first step already learns
    assert warmup_cosine(3, **kw) == pytest.approx(1.0)
    assert warmup_cosine(4, **kw) == pytest.approx(1.0)
    assert warmup_cosine(9, **kw) == pytest.approx(0.55)  # half-way through the decay: (max + min) / 2
    assert warmup_cosine(14, **kw) == pytest.approx(0.1)
    assert warmup_cosine(1000, **kw) == pytest.approx(0.1)
    decay = [warmup_cosine(s, **kw) for s in range(4, 20)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    warm = [warmup_cosine(s, **kw) for s in range(4)]
    assert all(a < b for a, b in zip(warm, warm[1:]))


def test_warmup_cosine_matches_closed_form_and_no_warmup():
    for step in range(0, 11):
        expected = 0.0 + 0.5 * 3e-4 * (1 + math.cos(math.pi * step / 10))
        assert warmup_cosine(step, 0, 10, 3e-4, 0.0) == pytest.approx(expected)
    assert warmup_cosine(0, 5, 5, 2.0, 1.0) == pytest.approx(0.4)
    assert warmup_cosine(5, 5, 5, 2.0, 1.0) == pytest.approx(1.0)  # warmup == total: straight to the floor


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(step=-1), "step"),
        (dict(warmup_steps=20), "warmup_steps"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(total_steps=0), "total_steps"),
        (dict(total_steps=2.5), "total_steps"),
        (dict(max_lr=0.0), "max_lr"),
        (dict(min_lr=2.0), "min_lr"),
        (dict(min_lr=-0.1), "min_lr"),
    ],
)
def test_warmup_cosine_validation_names_the_field(kwargs, field):
    args = dict(step=0, warmup_steps=2, total_steps=10, max_lr=1.0, min_lr=0.0)
    args.update(kwargs)
    with pytest.raises(ConfigError) as err:
        warmup_cosine(**args)
    assert err.value.field == field


def _optimizer():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    return torch.optim.AdamW([{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 1e-2}])


def test_make_scheduler_follows_warmup_cosine_per_group():
    opt = _optimizer()
    sched = make_scheduler(opt, warmup=3, total=10, min_lr_ratio=0.1)
    for step in range(12):
        for group, base in zip(opt.param_groups, (1e-3, 1e-2)):
            assert group["lr"] == pytest.approx(warmup_cosine(step, 3, 10, base, 0.1 * base))
        opt.step()
        sched.step()


def test_make_scheduler_state_survives_weights_only_round_trip():
    opt = _optimizer()
    sched = make_scheduler(opt, warmup=2, total=8)
    for _ in range(3):
        opt.step()
        sched.step()
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    opt2 = _optimizer()
    opt2.load_state_dict(opt.state_dict())
    sched2 = make_scheduler(opt2, warmup=2, total=8)
    sched2.load_state_dict(state)
    for _ in range(4):
        opt.step(), sched.step(), opt2.step(), sched2.step()
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in opt2.param_groups]


def test_make_scheduler_drives_a_mixed_precision_optimizer():
    w = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = MixedPrecisionOptimizer([w], lr=1.0)
    sched = make_scheduler(opt, warmup=2, total=4, min_lr_ratio=0.0)
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.5)
    w.grad = torch.ones_like(w)
    assert opt.step()
    sched.step()
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(warmup=5, total=3), "warmup_steps"),
        (dict(warmup=0, total=0), "total_steps"),
        (dict(warmup=1, total=3, min_lr_ratio=1.5), "min_lr_ratio"),
    ],
)
def test_make_scheduler_validation(kwargs, field):
    with pytest.raises(ConfigError) as err:
        make_scheduler(_optimizer(), **kwargs)
    assert err.value.field == field
    with pytest.raises(ConfigError) as err:
        make_scheduler(object(), 1, 3)
    assert err.value.field == "optimizer"
