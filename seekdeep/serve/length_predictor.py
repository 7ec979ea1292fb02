"""Output-length prediction for length-aware scheduling.

A request's output length is predicted from what is known when it arrives: its prompt and its
``max_tokens``. The model is a ridge regression of ``log(1 + output tokens)`` on a few
features (log prompt length, log ``max_tokens``, the prompt's first tokens hashed by position
-- a template or system prompt marks the task -- and a hashed bag of its last tokens). It is fitted on the
server's own finished requests (sufficient statistics ``X^T X`` and ``X^T y``, refitted every
few observations, so an update costs one outer product), shrunk towards a cold-start default
length until data arrives, and persisted as JSON next to the model.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

import torch

from seekdeep.errors import ConfigError
from seekdeep.files import write_json_atomic
from seekdeep.validate import check_float, check_int

log = logging.getLogger(__name__)

FILE_NAME = "length_predictor.json"
_VERSION = 1
_HEAD = 4  # leading tokens hashed by position
_TAIL = 8  # trailing tokens hashed as a bag


class LengthPredictor:
    """``predict(prompt_ids, max_tokens) -> tokens`` and ``observe(prompt_ids, max_tokens, n)``.

    ``default``: the cold-start prediction (tokens); ``ridge``: the pull towards it, in
    observations' worth; ``buckets``: hashed token features; ``path``: where :meth:`save`
    writes (atomically); ``save_every``: observations between automatic saves (0: never)."""

    def __init__(self, default: int = 64, ridge: float = 1.0, buckets: int = 64, refit_every: int = 8,
                 path: str | Path | None = None, save_every: int = 64):
        check_int("default", default, 1, 1 << 24)
        check_float("ridge", ridge, 0, 1e9, lo_open=True)
        check_int("buckets", buckets, 2, 4096)
        check_int("refit_every", refit_every, 1, 1 << 20)
        check_int("save_every", save_every, 0, 1 << 30)
        self.default, self.ridge, self.buckets, self.refit_every = default, ridge, buckets, refit_every
        self.path = None if path is None else Path(path)
        self.save_every = save_every
        self.dim = 3 + buckets
        self.xtx = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        self.xty = torch.zeros(self.dim, dtype=torch.float64)
        self.count = 0
        self._prior = torch.zeros(self.dim, dtype=torch.float64)
        self._prior[0] = math.log1p(default)  # bias feature is 1: cold start predicts ``default``
        self.weights = self._prior.clone()
        self._save_failed = False

    # -- features and prediction
    def features(self, prompt_ids: Sequence[int], max_tokens: int) -> torch.Tensor:
        x = torch.zeros(self.dim, dtype=torch.float64)
        x[0] = 1.0
        x[1] = math.log1p(len(prompt_ids)) / 8  # / 8: keeps the features near unit scale
        x[2] = math.log1p(max_tokens) / 8
        # the first tokens by position (a template or system prompt marks the task), the last
        # ones as a bag (the question); each hashed into its own half of the buckets
        half = self.buckets // 2
        for pos, t in enumerate(prompt_ids[:_HEAD]):
            x[3 + (t * 2654435761 + pos * 40503) % half] += 1.0
        for t in prompt_ids[-_TAIL:]:
            x[3 + half + (t * 2654435761) % (self.buckets - half)] += 1.0 / _TAIL
        return x

    def predict(self, prompt_ids: Sequence[int], max_tokens: int) -> int:
        """Predicted output tokens, in [1, max_tokens]."""
        y = float(self.features(prompt_ids, max_tokens) @ self.weights)
        return int(min(max_tokens, max(1, round(math.expm1(min(y, 30.0))))))

    def observe(self, prompt_ids: Sequence[int], max_tokens: int, num_output: int) -> None:
        """Learn from one finished request (``num_output`` tokens produced)."""
        x = self.features(prompt_ids, max_tokens)
        self.xtx += torch.outer(x, x)
        self.xty += x * math.log1p(num_output)
        self.count += 1
        if self.count % self.refit_every == 0:
            self.refit()
        if self.path is not None and self.save_every and self.count % self.save_every == 0:
            self.save()

    def refit(self) -> None:
        # ridge towards the prior: argmin |Xw - y|^2 + ridge |w - prior|^2
        eye = torch.eye(self.dim, dtype=torch.float64)
        self.weights = torch.linalg.solve(self.xtx + self.ridge * eye, self.xty + self.ridge * self._prior)

    # -- persistence
    def to_dict(self) -> dict:
        return {"version": _VERSION, "default": self.default, "ridge": self.ridge, "buckets": self.buckets,
                "refit_every": self.refit_every, "count": self.count, "xtx": self.xtx.tolist(),
                "xty": self.xty.tolist()}

    @classmethod
    def from_dict(cls, data: dict, **kwargs) -> "LengthPredictor":
        if not isinstance(data, dict) or data.get("version") != _VERSION:
            raise ConfigError("length_predictor", f"unknown format (version {data.get('version') if isinstance(data, dict) else None!r}); "
                              f"accepted: version {_VERSION}")
        pred = cls(default=data["default"], ridge=data["ridge"], buckets=data["buckets"],
                   refit_every=data["refit_every"], **kwargs)
        xtx = torch.tensor(data["xtx"], dtype=torch.float64)
        xty = torch.tensor(data["xty"], dtype=torch.float64)
        if xtx.shape != (pred.dim, pred.dim) or xty.shape != (pred.dim,) or not torch.isfinite(xtx).all():
            raise ConfigError("length_predictor", f"statistics of shape {tuple(xtx.shape)} / {tuple(xty.shape)}; "
                              f"accepted: ({pred.dim}, {pred.dim}) / ({pred.dim},), finite")
        pred.xtx, pred.xty, pred.count = xtx, xty, int(data["count"])
        if pred.count:
            pred.refit()
        return pred

    def save(self, path: str | Path | None = None) -> None:
        """Write the statistics atomically (a crash never leaves half a file). A read-only
        model directory is logged once and otherwise ignored: prediction goes on in memory."""
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ConfigError("path", "no path to save the length predictor to")
        try:
            write_json_atomic(target, self.to_dict())
        except OSError as exc:
            if not self._save_failed:
                log.warning("cannot save the length predictor to %s (%s); it keeps learning in memory", target, exc)
            self._save_failed = True

    @classmethod
    def load(cls, path: str | Path, **kwargs) -> "LengthPredictor":
        """The predictor saved at ``path``, or a cold one (that will save there) when the file
        is missing or unreadable (logged: a corrupt file must not stop the server)."""
        import json

        path = Path(path)
        if path.is_file():
            try:
                return cls.from_dict(json.loads(path.read_text(encoding="utf-8")), path=path, **kwargs)
            except (ValueError, KeyError, TypeError, ConfigError) as exc:
                log.warning("ignoring the length predictor at %s (%s); starting from the default", path, exc)
        return cls(path=path, **kwargs)
