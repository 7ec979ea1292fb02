"""Continual learning with one adapter per task on a frozen base, routed by task name.

Each task gets its own adapter; learning a task trains only that adapter, so the base and
every earlier adapter keep their values bit for bit and an earlier task's quality can only
move through what the tasks share (nothing, unless a config lists ``modules_to_save`` that
overlap). After each task the learner measures every task learned so far, which is what the
retention numbers are made of.

    learner = ContinualLearner(model, LoRAConfig(r=8, lora_alpha=16))
    for task in ("json", "email", "http"):
        learner.begin_task(task)          # adds adapter `task`, trainable; all else frozen
        ...train on the task's data...
        learner.end_task(evaluate)        # evaluate(task_name) -> loss, for every task so far
    learner.retention("json")             # first-task loss now / right after it was learned
    logits = learner(input_ids, task="json").logits
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from seekdeep.errors import CheckpointError, ConfigError
from seekdeep.files import read_json, write_json_atomic

TASKS_NAME = "tasks.json"


class ContinualLearner:
    """Tasks learned in sequence, one adapter each (see the module docstring).

    ``config``: the adapter config used for every task (any seekdeep adapter config);
    ``begin_task`` accepts a per-task override."""

    def __init__(self, model, config=None):
        from seekdeep.peft.config import AdapterConfig

        if config is not None and not isinstance(config, AdapterConfig):
            raise ConfigError("config", f"expected an adapter config (e.g. LoRAConfig), got {type(config).__name__}")
        self.model = model
        self.config = config
        self.tasks: list[str] = []
        #: one row per ``end_task``: {"after": task just learned, "scores": {task: value}}
        self.history: list[dict[str, Any]] = []
        self._current: str | None = None

    # -- learning
    def begin_task(self, task: str, config=None) -> list[torch.nn.Parameter]:
        """Add the adapter for ``task`` and make it the only trainable one; returns its
        parameters (hand them to the optimizer)."""
        if self._current is not None:
            raise ConfigError("task", f"task {self._current!r} is still open; call end_task() first")
        if task in self.tasks:
            raise ConfigError("task", f"{task!r} was already learned (tasks: {', '.join(self.tasks)})")
        config = config or self.config
        if config is None:
            raise ConfigError("config", "no adapter config: pass one to ContinualLearner or begin_task")
        self.model.add_adapter(task, config)
        self._current = task
        return [p for p in self.model.parameters() if p.requires_grad]

    def end_task(self, evaluate: Callable[[str], float] | None = None) -> dict[str, float]:
        """Close the open task: freeze its adapter, then (with ``evaluate``) score every task so
        far, each routed through its own adapter; returns and records those scores."""
        if self._current is None:
            raise ConfigError("task", "no open task; call begin_task(name) first")
        task, self._current = self._current, None
        self.tasks.append(task)
        for param in self.model._adapter_parameters(task):
            param.requires_grad_(False)
        scores = self.evaluate(evaluate) if evaluate is not None else {}
        self.history.append({"after": task, "scores": scores})
        return scores

    def evaluate(self, evaluate: Callable[[str], float]) -> dict[str, float]:
        scores = {}
        for task in self.tasks:
            with self.route(task):
                scores[task] = float(evaluate(task))
        return scores

    def retention(self, task: str) -> float:
        """Score of ``task`` after the last task / its score right after it was learned (for a
        loss or perplexity: 1.0 is perfect retention, above 1 is forgetting)."""
        rows = [row["scores"][task] for row in self.history if task in row["scores"]]
        if not rows:
            raise ConfigError("task", f"{task!r} has no recorded scores; tasks: {', '.join(self.tasks) or 'none'}")
        return rows[-1] / rows[0]

    # -- routing
    def route(self, task: str):
        """Context manager: calls inside run through ``task``'s adapter."""
        self._require(task)
        return self.model.use_adapter(task)

    def __call__(self, input_ids: torch.Tensor, task: str | Sequence[str], **kwargs):
        """Forward through ``task``'s adapter; with one task name per row, rows are grouped by
        task and run per group (logits and loss-free outputs are put back in row order)."""
        if isinstance(task, str):
            with self.route(task):
                return self.model(input_ids, **kwargs)
        tasks = list(task)
        if len(tasks) != input_ids.shape[0]:
            raise ConfigError("task", f"{len(tasks)} task names for a batch of {input_ids.shape[0]} rows")
        if "labels" in kwargs:
            raise ConfigError("labels", "a mixed-task batch returns logits only; compute losses per task")
        logits = None
        for name in dict.fromkeys(tasks):
            rows = torch.tensor([i for i, t in enumerate(tasks) if t == name], device=input_ids.device)
            sub = {k: (v[rows] if isinstance(v, torch.Tensor) and v.shape[:1] == input_ids.shape[:1] else v)
                   for k, v in kwargs.items()}
            with self.route(name):
                out = self.model(input_ids[rows], **sub)
            if logits is None:
                logits = out.logits.new_empty((input_ids.shape[0], *out.logits.shape[1:]))
            logits[rows] = out.logits
        from seekdeep.models.common import CausalLMOutput

        return CausalLMOutput(logits=logits)

    def generate(self, input_ids: torch.Tensor, task: str, **kwargs) -> torch.Tensor:
        with self.route(task):
            return self.model.generate(input_ids, **kwargs)

    def _require(self, task: str) -> None:
        if task not in self.tasks and task != self._current:
            raise ConfigError("task", f"unknown task {task!r}; learned tasks: {', '.join(self.tasks) or 'none'}")

    # -- persistence
    def save(self, directory: str | os.PathLike) -> None:
        """One peft-layout adapter per task in ``directory/<task>/`` plus ``tasks.json`` (order
        and history)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        for task in self.tasks:
            self.model.save_adapter(out / task, adapter_name=task)
        write_json_atomic(out / TASKS_NAME, {"tasks": self.tasks, "history": self.history})

    @classmethod
    def load(cls, model, directory: str | os.PathLike) -> "ContinualLearner":
        directory = Path(directory)
        data = read_json(directory / TASKS_NAME)
        tasks = data.get("tasks")
        if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
            raise CheckpointError(f"{directory / TASKS_NAME}: 'tasks' must be a list of task names")
        learner = cls(model)
        for task in tasks:
            model.load_adapter(directory / task, adapter_name=task)
        learner.tasks = list(tasks)
        learner.history = list(data.get("history") or [])
        return learner
