"""Embedding cache: a bounded LRU from (model, token ids) to the pooled embedding.

The embedding itself is :meth:`seekdeep.serve.engine.Engine.embed`: the mean over tokens of
the model's final hidden state (after the final norm). Repeated inputs (a system prompt, a
popular query) are answered from the cache without a forward pass.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable

import torch

from seekdeep.errors import ConfigError


class EmbeddingCache:
    """Least-recently-used cache holding at most ``max_entries`` embeddings."""

    def __init__(self, max_entries: int = 1024):
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 0:
            raise ConfigError("max_entries", f"must be an integer >= 0 (0 disables the cache), got {max_entries!r}")
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(model: str, token_ids: list[int]) -> Hashable:
        return (model, tuple(token_ids))

    def get(self, key: Hashable) -> torch.Tensor | None:
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: Hashable, value: torch.Tensor) -> None:
        if self.max_entries == 0:
            return
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0
