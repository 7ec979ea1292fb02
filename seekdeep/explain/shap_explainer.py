"""SHAP values for seekdeep models through shap's Partition explainer.

``SHAPExplainer(model, tokenizer).explain("This product is excellent")`` returns a
``shap.Explanation``, so ``shap.plots.text(values)`` works unchanged. What differs from
``shap.Explainer(pipeline)``:

* shap's Text masker is fed by our tokenizer, offsets included, with units (words built from
  sub-word tokens by default) as its features; a masked unit's tokens are deleted from the one
  tokenisation of the full text, never re-tokenised (see :mod:`seekdeep.explain.units`);
* model calls are DEFAULT_BATCH (16) rows wide, chosen by measurement (see
  :data:`seekdeep.explain.config.DEFAULT_BATCH`; shap's default is 5-6 rows a call);
* ``fixed_context="auto"`` (with ``max_evals="auto"``) computes exact Owen values — every
  coalition of the partition tree's other groups averaged, shap's ``fixed_context=None`` — when
  the budget resolves the whole tree (about M^2 evaluations for M units, so up to ~22 units),
  and past that shap's ``fixed_context=1`` (each group scored with the rest of the input kept),
  which resolves the whole tree in 2(M-1) evaluations. The alternative, Owen values cut at a
  budget, leaves groups unexplored and spreads their credit evenly: at 160 tokens the 500
  evaluations stopped two or three words above the planted keyword, which then tied with its
  neighbours (see :func:`plan`);
* every explanation says whether the budget ran out (``explanation.truncated``, and a warning)
  and which context it used (``explanation.fixed_context``);
* additivity holds: ``base_values + values.sum() == f(x)``, f being the explained output of
  :mod:`seekdeep.explain.target` (log-odds of the target class, or the continuation tokens'
  log-probabilities).
"""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from seekdeep.errors import ConfigError
from seekdeep.explain.config import DEFAULT_BATCH, MAX_EVALS
from seekdeep.explain.target import Prepared, Scorer
from seekdeep.validate import check_int

MASKED = -1  # unit id shap's masker writes for a masked unit (deleted before the model sees it)


DEFAULT_EVALS = 500  # shap's own default budget; "auto" stays within it while Owen values fit
CONTEXTS = ("auto", None, 0, 1)


def full_evals(num_units: int, fixed_context) -> int:
    """Evaluations that resolve the whole partition tree (the two base rows included): 2 per
    internal node with a fixed context; for Owen values (``None``) a node at depth k is reached
    in 2^k contexts, ~(2/3) M^2 for a balanced tree, bounded here by M^2 (unbalanced trees)."""
    m = max(num_units, 1)
    return 2 * (m - 1) + 2 if fixed_context in (0, 1) else m * m + 2


def plan(num_units: int, max_evals="auto", fixed_context="auto") -> tuple[int | None, int]:
    """(fixed_context, budget) for one input of ``num_units`` units.

    ``fixed_context="auto"``: Owen values (None) when ``full_evals`` fits the budget (the given
    one, or DEFAULT_EVALS for "auto"), else 1. ``max_evals="auto"``: exactly what the chosen
    context needs, so nothing is truncated and no evaluation is spent past a full resolution."""
    cap = DEFAULT_EVALS if max_evals == "auto" else max_evals
    context = fixed_context
    if context == "auto":
        context = None if full_evals(num_units, None) <= cap else 1
    need = full_evals(num_units, context)
    if max_evals == "auto":
        return context, need if context is not None else min(need, cap)
    return context, max_evals


def auto_max_evals(num_units: int) -> int:
    """The budget ``max_evals="auto"`` gives with ``fixed_context="auto"``."""
    return plan(num_units)[1]


class _UnitTokenizer:
    """The tokenizer callable shap's Text masker wants (input_ids + offset_mapping), giving the
    current input's units as its tokens: ids 0..M-1 and their character spans."""

    def __init__(self):
        self.prepared: Prepared | None = None

    def __call__(self, s, return_offsets_mapping: bool = False, **_):
        units = self.prepared.units if self.prepared is not None and self.prepared.units.text == s else None
        if units is None:  # shap probes with "" to find special tokens; there are none at this level
            if s:
                raise ConfigError("text", "shap asked for a text other than the one being explained")
            return {"input_ids": [], "offset_mapping": []} if return_offsets_mapping else {"input_ids": []}
        out = {"input_ids": list(range(len(units)))}
        if return_offsets_mapping:
            out["offset_mapping"] = list(units.char_spans)
        return out


class SHAPExplainer:
    """Partition-explainer SHAP values of a classifier's target class or a causal LM's continuation.

    ``target``: see :class:`seekdeep.explain.target.Scorer`; ``max_evals``: ``"auto"`` or an int
    (model evaluations per input); ``fixed_context``: ``"auto"``, None (Owen values), 1 (the rest
    of the input kept) or 0 (the rest deleted), see :func:`plan`; ``batch_size``: rows per
    model call; ``granularity``: ``"word"`` or ``"token"``; ``progress``: tqdm over inputs and
    shap's own bar on long ones."""

    method = "shap"

    def __init__(self, model, tokenizer=None, target=None, max_evals="auto", batch_size: int = DEFAULT_BATCH,
                 granularity: str = "word", max_new_tokens: int = 8, progress: bool = True,
                 fixed_context="auto"):
        import shap

        if tokenizer is None:
            tokenizer = _tokenizer_of(model)
        if max_evals != "auto":
            check_int("max_evals", max_evals, 4, MAX_EVALS)
        if not any(fixed_context is c or (isinstance(fixed_context, int) and not isinstance(fixed_context, bool)
                                          and fixed_context == c) for c in CONTEXTS):
            raise ConfigError("fixed_context", f"got {fixed_context!r}; accepted: 'auto', None, 0 or 1")
        self.fixed_context = fixed_context
        self.model, self.tokenizer = model, tokenizer
        self.scorer = Scorer(model, tokenizer, target, batch_size, granularity, max_new_tokens)
        self.max_evals, self.batch_size, self.progress = max_evals, batch_size, progress
        self._units_tok = _UnitTokenizer()
        self.masker = shap.maskers.Text(self._units_tok, mask_token=MASKED, output_type="token_ids")
        self._explainer = shap.explainers.Partition(self._f, self.masker)

    def _f(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x).reshape(len(x), -1)  # (rows, M) unit ids, MASKED where masked
        return self.scorer.score_units(x != MASKED, self._prepared)

    def explain(self, text: str | list[str]):
        """A ``shap.Explanation``: ``(n_texts, n_units)`` values for a single output (classifier),
        ``(n_texts, n_units, n_outputs)`` for a continuation; one row for a single string."""
        texts = _texts(text)
        prepared = [self.scorer.prepare(t) for t in texts]
        rows = []
        bar = tqdm(prepared, desc="shap", disable=not self.progress or len(prepared) < 2, leave=False)
        for p in bar:
            rows.append(self._explain_one(p))
        return merge_rows(rows, method=self.method)

    def _explain_one(self, prepared: Prepared):
        self._prepared = prepared
        self._units_tok.prepared = prepared
        m = len(prepared.units)
        context, budget = plan(m, self.max_evals, self.fixed_context)
        calls0, rows0, tokens0 = self.scorer.calls, self.scorer.rows, self.scorer.tokens
        exp = self._explainer([prepared.units.text], max_evals=budget, batch_size=self.batch_size,
                              fixed_context=context, silent=not self.progress)[0]
        used = int(getattr(self._explainer, "last_eval_count", 0)) + 2
        values = np.asarray(exp.values, dtype=float)  # (M,) or (M, n_outputs)
        if len(prepared.output_names) == 1 and values.ndim == 2:
            values = values[:, 0]
        base = np.asarray(exp.base_values, dtype=float)
        base = base.reshape(-1)[0] if len(prepared.output_names) == 1 else base.reshape(-1)
        return dict(values=values, base_values=base, data=np.array(prepared.units.texts, dtype=object),
                    output_names=prepared.output_names, prepared=prepared, max_evals=budget, evals=used,
                    truncated=used >= budget - 1 and budget < full_evals(m, context), fixed_context=context,
                    model_calls=self.scorer.calls - calls0, model_tokens=self.scorer.tokens - tokens0,
                    model_rows=self.scorer.rows - rows0, clustering=exp.clustering,
                    hierarchical_values=exp.hierarchical_values)


def merge_rows(rows: list[dict], method: str):
    """One ``shap.Explanation`` from per-input results (same fields as shap's own)."""
    import shap

    values = [r["values"] for r in rows]
    same = len({v.shape for v in values}) == 1
    stacked = np.stack(values) if same else _object_array(values)
    data = np.stack([r["data"] for r in rows]) if same else _object_array([r["data"] for r in rows])
    base = np.stack([np.asarray(r["base_values"]) for r in rows])
    names = rows[0]["output_names"]
    multi = values[0].ndim == 2
    kwargs = {}
    if rows[0].get("clustering") is not None and same:
        kwargs["clustering"] = np.stack([r["clustering"] for r in rows])
        kwargs["hierarchical_values"] = np.stack([r["hierarchical_values"] for r in rows])
    exp = shap.Explanation(values=stacked, base_values=base, data=data,
                           output_names=names if multi and all(r["output_names"] == names for r in rows) else None,
                           feature_names=_object_array([list(r["data"]) for r in rows]) if not same else [list(r["data"]) for r in rows],
                           **kwargs)
    # bookkeeping shap has no field for; plain attributes on the Explanation
    exp.method = method
    exp.targets = [r["output_names"] for r in rows]
    exp.truncated = [bool(r.get("truncated", False)) for r in rows]
    exp.max_evals = [r.get("max_evals") for r in rows]
    exp.evals = [r.get("evals") for r in rows]
    exp.model_calls = sum(r.get("model_calls", 0) for r in rows)
    exp.model_rows = sum(r.get("model_rows", 0) for r in rows)
    exp.model_tokens = sum(r.get("model_tokens", 0) for r in rows)  # real (unpadded) tokens the model read
    exp.fixed_context = [r.get("fixed_context") for r in rows]
    exp.prepared = [r["prepared"] for r in rows]
    exp.outputs = [r.get("f_x") for r in rows]
    if any(exp.truncated):
        import warnings

        which = [i for i, t in enumerate(exp.truncated) if t]
        warnings.warn(f"shap: the max_evals budget ran out on input(s) {which} ({exp.evals} evaluations used); the "
                      "unexplored groups share their credit evenly. Raise max_evals for finer values.", stacklevel=3)
    return exp


def _object_array(items) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        out[i] = item
    return out


def _texts(text) -> list[str]:
    if isinstance(text, str):
        return [text]
    if isinstance(text, (list, tuple)) and text and all(isinstance(t, str) for t in text):
        return list(text)
    raise ConfigError("text", f"expected a non-empty string or a non-empty list of strings, got {text!r:.80}")


def _tokenizer_of(model):
    source = getattr(model.config, "source", None)
    if source:
        from pathlib import Path

        from seekdeep.tokenizer import Tokenizer

        directory = Path(source).parent
        if (directory / "tokenizer.json").is_file():
            return Tokenizer.from_pretrained(directory)
    raise ConfigError("tokenizer", "the model was not loaded from a directory with tokenizer.json; pass tokenizer=")
