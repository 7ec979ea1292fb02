"""Synthetic long-context retrieval: associative recall over a repeated sequence.

A sample of ``seq_len`` tokens holds a *source*: ``span`` distinct tokens in random order, and
later its *copy*; the rest is filler (ids of their own), split at random before the source and
between source and copy. Every token of the copy but its first is labelled, and predicting it is
an associative recall: the current token is the key, its successor in the source the value.
So each answer lies ``offset`` slots back (the copy's distance to the source, at least ``span``
and random per sample, so no fixed-offset attention can answer), several times a sparse key
budget when ``span`` is: only a key selection that reaches the source gets it right.

This is the form of recall a tiny model learns within a few hundred steps (an induction circuit:
a previous-token head in one layer, a head looking up the current token's earlier occurrence in
the next). Pairs scattered among filler and queried once each (classic multi-query associative
recall) give 16-odd labels per sample and did not lift off chance in that budget.

Token ids: sequence tokens ``[0, num_tokens)``, filler ``[num_tokens, num_tokens + num_filler)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seekdeep.errors import ConfigError

IGNORE_INDEX = -100  # labels the loss skips


@dataclass(frozen=True)
class CopyRecall:
    """Generator of repeated-sequence recall samples; the same ``seed`` always gives the same batch."""

    seq_len: int = 256
    span: int = 128  # tokens in the source (and in its copy)
    num_tokens: int = 128  # sequence vocabulary; the source draws ``span`` of them without replacement
    num_filler: int = 16

    def __post_init__(self) -> None:
        for name in ("seq_len", "span", "num_tokens", "num_filler"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(name, f"must be an integer >= 1, got {value!r}")
        if self.span < 2:
            raise ConfigError("span", f"got {self.span}; accepted: >= 2 (the copy's first token has no label)")
        if self.span > self.num_tokens:
            raise ConfigError("span", f"got {self.span} with num_tokens={self.num_tokens}; source tokens are "
                              "distinct, accepted: span <= num_tokens")
        if 2 * self.span > self.seq_len:
            raise ConfigError("seq_len", f"got {self.seq_len}: a source and its copy of span={self.span} need "
                              f"{2 * self.span}; accepted: seq_len >= 2 * span")

    @property
    def vocab_size(self) -> int:
        return self.num_tokens + self.num_filler

    def sample(self, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``input_ids`` (B, T), ``labels`` (B, T) (the token itself on the copy, -100 elsewhere;
        the model shifts them) and, per row, where the source and the copy start, (B,) each."""
        g = torch.Generator().manual_seed(seed)
        b, t, span = batch_size, self.seq_len, self.span
        ids = self.num_tokens + torch.randint(self.num_filler, (b, t), generator=g)  # (B, T) filler
        source = torch.rand(b, self.num_tokens, generator=g).argsort(-1)[:, :span]  # (B, span) distinct
        free = t - 2 * span  # filler slots, split into before-source / between / after-copy
        cuts = torch.randint(free + 1, (b, 2), generator=g).sort(-1).values  # (B, 2)
        source_start, copy_start = cuts[:, 0], cuts[:, 1] + span  # (B,)
        rows = torch.arange(b)[:, None]
        offsets = torch.arange(span)[None]  # (1, span)
        ids[rows, source_start[:, None] + offsets] = source
        ids[rows, copy_start[:, None] + offsets] = source
        labels = torch.full_like(ids, IGNORE_INDEX)
        answered = copy_start[:, None] + offsets[:, 1:]  # (B, span - 1)
        labels[rows, answered] = ids[rows, answered]
        return ids, labels, source_start, copy_start
