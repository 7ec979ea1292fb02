"""What an explanation scores: the input split into units (tokens, or words made of the
tokenizer's sub-word tokens), each with its token ids and its span of the original text.

Masking a unit deletes its tokens from the one tokenisation of the full text, so a masked
input is never re-tokenised (re-tokenising a masked string merges tokens across the cut and,
through shap's string masker, collapses the whitespace code depends on)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from seekdeep.errors import ConfigError

GRANULARITIES = ("word", "token")
_WORD_CHAR = re.compile(r"\w")


@dataclass
class Units:
    """``text`` split into units. ``token_ids``: the full tokenisation (specials included);
    ``prefix`` / ``suffix``: special tokens the tokenizer adds (never masked); ``spans[u]``:
    unit u's token positions [start, end) in ``token_ids``; ``char_spans[u]``: its slice of
    ``text`` (whitespace before the next unit included, so the slices rebuild the text)."""

    text: str
    token_ids: list[int]
    prefix: list[int]
    suffix: list[int]
    spans: list[tuple[int, int]]
    char_spans: list[tuple[int, int]]

    def __len__(self) -> int:
        return len(self.spans)

    @property
    def texts(self) -> list[str]:
        return [self.text[a:b] for a, b in self.char_spans]

    def ids_of(self, unit: int) -> list[int]:
        a, b = self.spans[unit]
        return self.token_ids[a:b]

    def keep(self, kept: list[int] | None = None) -> list[int]:
        """Token ids with only the ``kept`` units (all when None), specials in place."""
        if kept is None:
            return list(self.token_ids)
        body = [i for u in kept for i in self.ids_of(u)]
        return self.prefix + body + self.suffix

    def unit_of_token(self) -> list[int]:
        """Unit index of each position of ``token_ids`` (-1 for specials)."""
        owner = [-1] * len(self.token_ids)
        for u, (a, b) in enumerate(self.spans):
            for pos in range(a, b):
                owner[pos] = u
        return owner


def backend_of(tokenizer):
    """The ``tokenizers.Tokenizer`` behind seekdeep's Tokenizer or a transformers fast tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode"):
        raise ConfigError("tokenizer", f"{type(tokenizer).__name__} has no backend_tokenizer; accepted: a seekdeep "
                          "Tokenizer or a transformers fast tokenizer (offsets are needed)")
    return backend


def split_units(text: str, tokenizer, granularity: str = "word") -> Units:
    """Tokenise ``text`` once and group its tokens into units.

    ``word``: a token whose text starts with a word character joins the previous unit when that
    one ends with a word character (``excel`` + ``lent``, ``foo`` + ``_bar``), and a token
    sharing characters with the previous one (one UTF-8 character split into byte tokens) always
    joins; ``token``: one unit per token."""
    if granularity not in GRANULARITIES:
        raise ConfigError("granularity", f"got {granularity!r}; accepted: {', '.join(GRANULARITIES)}")
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("text", f"must be a non-empty string, got {text!r:.80}")
    enc = backend_of(tokenizer).encode(text, add_special_tokens=True)
    ids, offsets, special = list(enc.ids), list(enc.offsets), list(enc.special_tokens_mask)
    body = [i for i, s in enumerate(special) if not s]
    if not body:
        raise ConfigError("text", f"{text!r:.80} has no tokens besides special ones")
    first, last = body[0], body[-1]
    if any(special[first:last + 1]):
        raise ConfigError("text", "special tokens inside the text are not supported; remove them")
    spans: list[list[int]] = []
    chars: list[list[int]] = []
    prev_end = -1
    for pos in body:
        start, end = offsets[pos]
        piece = text[start:end]
        joins = bool(spans) and (
            start < prev_end
            or (granularity == "word" and piece[:1] and _WORD_CHAR.match(piece[:1])
                and _WORD_CHAR.match(text[prev_end - 1:prev_end] or " "))
        )
        if joins:
            spans[-1][1] = pos + 1
            chars[-1][1] = max(chars[-1][1], end)
        else:
            spans.append([pos, pos + 1])
            chars.append([start, end])
        prev_end = max(prev_end, end)
    # Each unit's slice runs to the next unit's start, so joining them rebuilds the text.
    char_spans = [(chars[u][0] if u else 0, chars[u + 1][0] if u + 1 < len(chars) else len(text))
                  for u in range(len(chars))]
    return Units(text, ids, ids[:first], ids[last + 1:], [tuple(s) for s in spans], char_spans)
