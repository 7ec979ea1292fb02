"""Settings of ``seekdeep explain`` and of the gradient-flow recorder. Plain dataclasses: this
module imports no explainer, model or recipe, so the CLI and the recipes can read it cheaply."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from seekdeep.errors import ConfigError
from seekdeep.files import check_model_path
from seekdeep.validate import MAX_BATCH, MAX_COUNT, check_float, check_int

METHODS = ("shap", "ig", "gradxinput", "ablation", "attention", "rollout")
GRANULARITIES = ("word", "token")
#: ``--fixed-context`` values and the SHAPExplainer argument each stands for
FIXED_CONTEXTS = {"auto": "auto", "owen": None, "0": 0, "1": 1}
MAX_EVALS = 10**7  # model evaluations per input: a full resolution of 2,000 units needs ~8M
MAX_STEPS = 1 << 16  # integration points of Integrated Gradients
#: rows per model call. Measured on CPU (``benchmarks/explain.py --batch-cost``: one thread, the
#: trained benchmark classifier, a 160-token input, CPU ms per row): 2.2 / 2.4 / 2.6 / 3.0 at
#: 5 / 16 / 64 / 128 rows for half-masked rows, 3.8 / 4.2 / 5.6 / 6.1 for rows missing one word
#: — wider calls pad more and leave the cache, so on CPU 16 keeps the per-row cost within ~10%
#: of 5 with a third of the calls. On an accelerator pass more.
DEFAULT_BATCH = 16


@dataclass
class ExplainConfig:
    """One explanation written as a standalone HTML report.

    ``model``: a directory in Hugging Face layout (a sequence classifier or a causal LM, with
    its tokenizer); ``text``: the input; ``target``: a class name / index (classifier, default the
    predicted class) or the continuation to score (causal LM, default the model's own greedy
    continuation of ``max_new_tokens`` tokens); ``max_evals``: ``auto`` or an int (shap only);
    ``fixed_context`` (shap only): ``auto`` (exact Owen values while they fit the budget, else
    ``1``), ``owen`` (Owen values: every coalition of the partition tree's other groups, cut at
    ``max_evals``), ``1`` (each group scored with the rest of the input kept) or ``0`` (with the
    rest deleted)."""

    model: str | None = None
    text: str | None = None
    method: str = "shap"
    target: str | None = None
    output: str = "report.html"
    max_evals: str = "auto"
    fixed_context: str = "auto"
    batch_size: int = DEFAULT_BATCH
    granularity: str = "word"
    max_new_tokens: int = 8
    steps: int = 64
    attention_backend: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("model", "give the model directory to explain (Hugging Face layout with tokenizer.json)")
        if not isinstance(self.text, str) or not self.text.strip():
            raise ConfigError("text", f"give a non-empty text to explain (--text), got {self.text!r}")
        if self.method not in METHODS:
            raise ConfigError("method", f"got {self.method!r}; accepted: {', '.join(METHODS)}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError("granularity", f"got {self.granularity!r}; accepted: {', '.join(GRANULARITIES)}")
        if not isinstance(self.output, str) or not self.output.endswith((".html", ".htm")):
            raise ConfigError("output", f"must be a path ending in .html, got {self.output!r}")
        if isinstance(self.max_evals, int) and not isinstance(self.max_evals, bool):
            self.max_evals = str(self.max_evals)
        if self.max_evals != "auto" and not (str(self.max_evals).isdigit() and 4 <= int(self.max_evals) <= MAX_EVALS):
            raise ConfigError("max_evals", f"got {self.max_evals!r}; accepted: 'auto' or an integer in [4, {MAX_EVALS:,}]")
        if self.fixed_context is None or (isinstance(self.fixed_context, int) and not isinstance(self.fixed_context, bool)):
            # the SHAPExplainer spelling (None = Owen values, 0, 1) from Python callers
            self.fixed_context = "owen" if self.fixed_context is None else str(self.fixed_context)
        if self.fixed_context not in FIXED_CONTEXTS:
            raise ConfigError("fixed_context", f"got {self.fixed_context!r}; accepted: {', '.join(FIXED_CONTEXTS)}")
        if self.fixed_context != "auto" and self.method != "shap":
            raise ConfigError("fixed_context", f"applies to --method shap only, not {self.method!r}; accepted: auto")
        check_int("batch_size", self.batch_size, 1, MAX_BATCH)
        check_int("max_new_tokens", self.max_new_tokens, 1, 1 << 16)
        check_int("steps", self.steps, 2, MAX_STEPS)
        check_model_path("model", self.model)

    @property
    def max_evals_value(self) -> int | str:
        return "auto" if self.max_evals == "auto" else int(self.max_evals)

    @property
    def fixed_context_value(self) -> int | str | None:
        return FIXED_CONTEXTS[self.fixed_context]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExplainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(unknown[0], f"not an explain setting; accepted: {', '.join(sorted(known))}")
        return cls(**d)


@dataclass
class GradFlowConfig:
    """Gradient-flow recording during training (``--grad-flow``).

    ``every``: record every N optimiser steps; ``vanish`` / ``explode``: a layer whose gradient
    norm falls below / rises above these gets a warning (once per layer)."""

    every: int = 10
    vanish: float = 1e-7
    explode: float = 1e3

    def __post_init__(self) -> None:
        check_int("grad_flow.every", self.every, 1, MAX_COUNT)
        for name in ("vanish", "explode"):
            check_float(f"grad_flow.{name}", getattr(self, name), 0.0, lo_open=True)
        if self.vanish >= self.explode:
            raise ConfigError("grad_flow.vanish", f"must be below explode={self.explode}, got {self.vanish}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GradFlowConfig":
        return cls(**d)
