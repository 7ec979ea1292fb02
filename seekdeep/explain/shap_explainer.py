"""SHAP values for seekdeep models through shap's Partition explainer.

``SHAPExplainer(model, tokenizer).explain("This product is excellent")`` returns a
``shap.Explanation``, so ``shap.plots.text(values)`` works unchanged. What differs from
``shap.Explainer(pipeline)``:

* shap's Text masker is fed by our tokenizer, offsets included, with units (words built from
  sub-word tokens by default) as its features; a masked unit's tokens are deleted from the one
  tokenisation of the full text, never re-tokenised (see :mod:`seekdeep.explain.units`);
* model calls are batched 64 rows wide (shap's default is 5-6 rows a call);
* ``max_evals="auto"`` sizes the budget by the number of units (:func:`auto_max_evals`) and
  every explanation says whether the budget ran out (``explanation.truncated``, and a warning)
  — shap then spreads the unresolved credit evenly inside the unexplored groups, which keeps
  additivity but blurs them;
* additivity holds: ``base_values + values.sum() == f(x)``, f being the explained output of
  :mod:`seekdeep.explain.target` (log-odds of the target class, or the continuation tokens'
  log-probabilities).
"""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from seekdeep.errors import ConfigError
from seekdeep.explain.target import Prepared, Scorer

MASKED = -1  # unit id shap's masker writes for a masked unit (deleted before the model sees it)


def auto_max_evals(num_units: int) -> int:
    """Evaluations for ``max_evals="auto"``: what a full resolution of the partition tree needs
    (~2 M^2) for short inputs, shap's 500 in the middle, then 4 per unit past 125 units.

    Why not more: on CPU a model row costs about the same whether it comes 6 or 64 to a call
    (measured on the default tiny model at 160 tokens: 1,224 rows took 23-28 s against shap's
    default 516 rows in 6-9 s), so the budget, not the batch width, sets the time, and at the
    benchmark's lengths it stays at shap's default. Word units (fewer than tokens) are what let
    the same budget resolve deeper."""
    return int(min(2 * num_units * num_units, max(500, 4 * num_units)))


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
    (model evaluations per input); ``batch_size``: rows per model call; ``granularity``:
    ``"word"`` or ``"token"``; ``progress``: tqdm over inputs and shap's own bar on long ones."""

    method = "shap"

    def __init__(self, model, tokenizer=None, target=None, max_evals="auto", batch_size: int = 64,
                 granularity: str = "word", max_new_tokens: int = 8, progress: bool = True):
        import shap

        if tokenizer is None:
            tokenizer = _tokenizer_of(model)
        if max_evals != "auto" and (isinstance(max_evals, bool) or not isinstance(max_evals, int) or max_evals < 4):
            raise ConfigError("max_evals", f"got {max_evals!r}; accepted: 'auto' or an int >= 4")
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
        budget = auto_max_evals(m) if self.max_evals == "auto" else self.max_evals
        calls0, rows0 = self.scorer.calls, self.scorer.rows
        exp = self._explainer([prepared.units.text], max_evals=budget, batch_size=self.batch_size,
                              silent=not self.progress)[0]
        used = int(getattr(self._explainer, "last_eval_count", 0)) + 2
        values = np.asarray(exp.values, dtype=float)  # (M,) or (M, n_outputs)
        if len(prepared.output_names) == 1 and values.ndim == 2:
            values = values[:, 0]
        base = np.asarray(exp.base_values, dtype=float)
        base = base.reshape(-1)[0] if len(prepared.output_names) == 1 else base.reshape(-1)
        return dict(values=values, base_values=base, data=np.array(prepared.units.texts, dtype=object),
                    output_names=prepared.output_names, prepared=prepared, max_evals=budget, evals=used,
                    truncated=used >= budget - 1 and budget < 2 * m * m, model_calls=self.scorer.calls - calls0,
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
