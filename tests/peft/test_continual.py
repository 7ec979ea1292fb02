"""Continual learning: one adapter per task on a frozen base, routed by task name."""

from __future__ import annotations

import pytest
import torch

from seekdeep.errors import ConfigError
from seekdeep.peft import ContinualLearner, LoRAConfig


def _task_data(seed: int):
    g = torch.Generator().manual_seed(seed)
    # each task: a different fixed token pattern, so adapters learn different things
    pattern = torch.randint(0, 96, (8,), generator=g)
    return pattern.repeat(2, 3)  # (2, 24)


def test_tasks_in_sequence_keep_old_task_quality(model):
    learner = ContinualLearner(model, LoRAConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    data = {task: _task_data(i) for i, task in enumerate(("json", "email", "http"))}

    def loss_on(task):
        with torch.no_grad():
            return model(data[task], labels=data[task]).loss.item()

    base_first = loss_on("json")
    for task in data:
        params = learner.begin_task(task)
        assert params and all(f".{task}." in n for n, p in model.named_parameters() if p.requires_grad)
        opt = torch.optim.AdamW(params, lr=2e-2)
        model.train()
        for _ in range(6):
            loss = model(data[task], labels=data[task]).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        learner.end_task(loss_on)
    first_after_learning = learner.history[0]["scores"]["json"]
    assert first_after_learning < base_first - 0.1
    assert [row["after"] for row in learner.history] == ["json", "email", "http"]
    assert learner.history[-1]["scores"]["json"] == pytest.approx(first_after_learning, abs=1e-6)
    assert learner.retention("json") == pytest.approx(1.0, abs=1e-6)
    # routing: each task's own adapter is what serves it
    with learner.route("email"):
        routed = model(data["email"]).logits
    assert torch.equal(learner(data["email"], task="email").logits, routed)
    mixed_ids = torch.cat([data["json"][:1], data["http"][:1]])
    mixed = learner(mixed_ids, task=["json", "http"]).logits
    assert torch.allclose(mixed[0], learner(data["json"][:1], task="json").logits[0], atol=1e-5)
    assert torch.allclose(mixed[1], learner(data["http"][:1], task="http").logits[0], atol=1e-5)


def test_save_and_load_tasks(model, base_dir, tmp_path):
    import seekdeep

    learner = ContinualLearner(model, LoRAConfig(r=2, target_modules=["q_proj"]))
    for task in ("a", "b"):
        learner.begin_task(task)
        with torch.no_grad():
            for p in model._adapter_parameters(task):
                p.add_(0.1)
        learner.end_task()
    learner.save(tmp_path)
    ids = _task_data(0)
    fresh = seekdeep.AutoModel.from_pretrained(base_dir)
    loaded = ContinualLearner.load(fresh, tmp_path)
    assert loaded.tasks == ["a", "b"]
    for task in ("a", "b"):
        with torch.no_grad():
            assert torch.allclose(loaded(ids, task=task).logits, learner(ids, task=task).logits, atol=1e-6)


def test_bad_task_use(model):
    learner = ContinualLearner(model, LoRAConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="unknown task"):
        learner(torch.zeros(1, 3, dtype=torch.long), task="nope")
    learner.begin_task("a")
    with pytest.raises(ConfigError, match="still open"):
        learner.begin_task("b")
    learner.end_task()
    with pytest.raises(ConfigError, match="already learned"):
        learner.begin_task("a")
    with pytest.raises(ConfigError, match="no recorded scores"):
        learner.retention("a")
