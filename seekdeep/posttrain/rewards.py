"""Reward functions for RL: plain callables ``reward(prompt, completion) -> float`` (or None
when the reward does not apply to that prompt), combined by :class:`RewardSet`.

The embedded defaults are verifiable on the corpus: the completion parses as Python under its
function's header (``ast.parse``; ``prefix`` gives partial credit for the longest leading run
of lines that parses, so a body with one bad line late in it is not scored like noise),
stays within a length budget (a completion cut off at ``max_new_tokens`` never parses), and
— for functions whose docstring carries doctests — passes them in the sandbox
(``seekdeep.posttrain.sandbox``).
A reward that raises or returns a non-number is reported with the prompt and its sample is
skipped (counted in ``RewardSet.events``); the run goes on.
"""

from __future__ import annotations

import ast
import math
import sys
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from seekdeep.posttrain.instructions import FunctionTask
from seekdeep.posttrain.sandbox import run_doctests


@dataclass(frozen=True)
class RLPrompt:
    """A prompt for sampling: the user message, and the function task behind it (None for
    free-form prompts, which only the length reward and a plain ``ast.parse`` can score)."""

    text: str
    task: FunctionTask | None = None

    @property
    def name(self) -> str:
        return f"{self.task.module}.{self.task.qualname}" if self.task else self.text[:60]


def _source(prompt: RLPrompt, completion: str) -> str:
    return prompt.task.assemble(completion) if prompt.task else completion


def _parse(source: str) -> ast.Module:
    with warnings.catch_warnings():  # sampled code is full of "invalid escape sequence" and the like
        warnings.simplefilter("ignore", SyntaxWarning)
        return ast.parse(source)


def parse_reward(prompt: RLPrompt, completion: str) -> float:
    """1.0 when the completion is a non-empty body that parses under the header (or, for a
    free-form prompt, parses as a module), else 0.0."""
    if not completion.strip():
        return 0.0
    try:
        _parse(_source(prompt, completion))
    except (SyntaxError, ValueError):
        return 0.0
    return 1.0


def prefix_reward(prompt: RLPrompt, completion: str) -> float:
    """Share of the completion's lines that form the longest leading run that parses (under
    the header, or as a module): 1.0 when it all parses, 0.0 when not even its first line does.
    Graded, for a denser signal than :func:`parse_reward`; the metric reported stays the
    binary parse rate."""
    lines = completion.strip("\n").splitlines()
    if not completion.strip():
        return 0.0
    for keep in range(len(lines), 0, -1):
        if not lines[keep - 1].strip():
            continue  # a blank last line adds nothing: the shorter prefix is tried as itself
        try:
            _parse(_source(prompt, "\n".join(lines[:keep])))
        except (SyntaxError, ValueError):
            continue
        return keep / len(lines)
    return 0.0


class LengthReward:
    """1.0 up to ``budget`` tokens, falling linearly to 0 at twice the budget."""

    def __init__(self, tokenizer, budget: int):
        self.tokenizer, self.budget = tokenizer, budget

    def __call__(self, prompt: RLPrompt, completion: str) -> float:
        n = len(self.tokenizer.encode(completion, add_special_tokens=False))
        return max(0.0, min(1.0, 2.0 - n / self.budget))


class DoctestReward:
    """Share of the function's doctest examples that pass with the completion as its body;
    None (not applicable) for prompts without doctests. Timeouts score 0 and are counted."""

    def __init__(self, timeout: float = 2.0):
        self.timeout = timeout
        self.events: Counter = Counter()

    def __call__(self, prompt: RLPrompt, completion: str) -> float | None:
        task = prompt.task
        if task is None or not task.doctest:
            return None
        source = task.assemble(completion)
        try:
            tree = _parse(source)
        except (SyntaxError, ValueError):
            self.events["doctest_unparsable"] += 1
            return 0.0
        docstring = ast.get_docstring(tree.body[0], clean=False) or ""
        result = run_doctests(task.module, source, task.qualname, docstring, timeout=self.timeout)
        self.events[f"doctest_{result.status}"] += 1
        return result.pass_rate


class RewardSet:
    """Weighted sum of reward functions. ``score`` returns the total (None when a reward failed:
    the sample is skipped) and the per-reward values; failures are warned about once per prompt
    and counted in ``events``."""

    def __init__(self, rewards: dict[str, tuple[Callable, float]]):
        self.rewards = rewards
        self.events: Counter = Counter()

    def score(self, prompt: RLPrompt, completion: str) -> tuple[float | None, dict[str, float]]:
        values: dict[str, float] = {}
        total = 0.0
        for name, (fn, weight) in self.rewards.items():
            try:
                value = fn(prompt, completion)
            except Exception as exc:  # a user's reward function: report, skip the sample, go on
                self._fail(name, prompt, f"raised {type(exc).__name__}: {exc}")
                return None, values
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                self._fail(name, prompt, f"returned {value!r}, not a finite number")
                return None, values
            values[name] = float(value)
            total += weight * float(value)
        return total, values

    def _fail(self, name: str, prompt: RLPrompt, what: str) -> None:
        key = f"reward_{name}_failed"
        self.events[key] += 1
        if self.events[key] <= 3:
            warnings.warn(f"reward {name!r} {what} on prompt {prompt.name!r}; the sample is skipped", stacklevel=3)
        elif self.events[key] == 4:
            print(f"reward {name!r}: further failures are only counted", file=sys.stderr)

    def all_events(self) -> dict[str, int]:
        counts = Counter(self.events)
        for fn, _ in self.rewards.values():
            counts.update(getattr(fn, "events", {}))
        return dict(counts)


def default_rewards(names: list[str], tokenizer, length_budget: int, doctest_timeout: float) -> RewardSet:
    """The embedded rewards named in ``names`` (parse 1.0, prefix 0.5, length 0.5, doctest 1.0)."""
    table = {"parse": (parse_reward, 1.0), "prefix": (prefix_reward, 0.5),
             "length": (LengthReward(tokenizer, length_budget), 0.5),
             "doctest": (DoctestReward(doctest_timeout), 1.0)}
    return RewardSet({name: table[name] for name in names})
