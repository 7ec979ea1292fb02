"""Incremental detokenization with stop strings, for streaming.

Sits between the engine (token ids) and the HTTP layer (text). Text is released only when it
is final: a trailing incomplete UTF-8 character (decoded as U+FFFD) is held back, and so are
the last ``len(longest stop) - 1`` characters, which could still turn into a stop string.
When a stop string appears, the text before it is released and :attr:`stopped` is set; the
caller then aborts the request in the engine.
"""

from __future__ import annotations

from typing import Callable, Sequence


class IncrementalDetokenizer:
    """``decode``: token ids -> text (e.g. ``lambda ids: tok.decode(ids, skip_special_tokens=True)``)."""

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()):
        self.decode = decode
        self.stop = [s for s in stop if s]
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.token_ids: list[int] = []
        self.text = ""  # full decoded text so far (up to a stop string, once found)
        self.emitted = 0  # characters of ``text`` already released
        self.stopped = False
        self.stop_string: str | None = None

    def add(self, new_ids: Sequence[int], final: bool = False) -> str:
        """Append tokens; return the newly releasable text (everything left when ``final``)."""
        if self.stopped:
            return ""
        self.token_ids.extend(new_ids)
        text = self.decode(self.token_ids)
        if self.stop:
            # a stop string can only start where the previously checked text could still change
            start = max(0, self.emitted - self.holdback)
            hits = [(text.find(s, start), s) for s in self.stop]
            hits = [(pos, s) for pos, s in hits if pos >= 0]
            if hits:
                pos, s = min(hits)
                self.text = text[:pos]
                self.stopped, self.stop_string = True, s
                return self._release(len(self.text))
        self.text = text
        if final:
            return self._release(len(text))
        end = len(text) - self.holdback
        while end > self.emitted and text[end - 1] == "\ufffd":
            end -= 1
        return self._release(end)

    def _release(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
