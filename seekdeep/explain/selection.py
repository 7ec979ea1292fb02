"""The sparse-selection view: for each ``dsa`` layer, which keys (or key blocks) the indexer
kept for each query, where dense attention over the same queries and keys put its mass, and
the fraction of that dense mass the kept keys cover — 1.0 means the sparse layer lost nothing
dense attention would have looked at; a low value shows what it dropped."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seekdeep.errors import ConfigError
from seekdeep.explain.attention import AttentionMaps, capture_attention
from seekdeep.explain.units import split_units


@dataclass
class SelectionView:
    """``tokens``: the input's tokens; ``maps``: per-layer dense probs / selections (batch of 1);
    ``coverage``: per layer, mean dense mass on the kept keys (None: a dense layer);
    ``coverage_by_query``: per layer (T,) tensor or None."""

    tokens: list[str]
    maps: AttentionMaps
    coverage: list[float | None]
    coverage_by_query: list[torch.Tensor | None]

    @property
    def has_sparse_layers(self) -> bool:
        return any(c is not None for c in self.coverage)


def selection_view(model, tokenizer, text: str) -> SelectionView:
    """Run ``model`` on ``text`` and collect the view (see the module docstring)."""
    units = split_units(text, tokenizer, "token")
    limit = int(getattr(model.config, "max_position_embeddings", 1 << 30))
    if len(units.token_ids) > limit:
        raise ConfigError("text", f"has {len(units.token_ids)} tokens but the model's context is {limit} "
                          "(max_position_embeddings); accepted: a shorter text")
    ids = torch.tensor([units.token_ids], device=model.device)
    maps = capture_attention(model, ids)
    tokens = [tokenizer.decode([i]) for i in units.token_ids]
    by_query = [None if c is None else c[0] for c in maps.coverage]
    return SelectionView(tokens, maps, maps.layer_coverage(), by_query)
