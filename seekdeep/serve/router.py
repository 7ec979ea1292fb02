"""Model routing by request complexity: one server, several models.

A request that names a served model goes to it. A request for the router's name (``auto``)
goes to the first (smallest) model when its complexity -- prompt tokens plus requested new
tokens -- is at most ``threshold`` and it fits that model's context, otherwise to the last
(largest) model.
"""

from __future__ import annotations

from dataclasses import dataclass

from seekdeep.errors import ConfigError

ROUTER_NAME = "auto"


@dataclass
class ComplexityRouter:
    """``models``: served model names, smallest first; ``context``: each one's max length."""

    models: list[str]
    context: dict[str, int]
    threshold: int = 256

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError("models", "the router needs at least one model")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int) or self.threshold < 1:
            raise ConfigError("route_threshold", f"must be a positive integer (tokens), got {self.threshold!r}")

    def route(self, prompt_tokens: int, max_new_tokens: int) -> str:
        small, large = self.models[0], self.models[-1]
        complexity = prompt_tokens + max_new_tokens
        if complexity <= self.threshold and complexity <= self.context[small]:
            return small
        return large
