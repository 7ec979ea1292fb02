"""Attributions through captum, returned as the same ``shap.Explanation`` as SHAP's:

* ``ig``: Integrated Gradients on the token embeddings (the embedding layer's output), from a
  baseline of the pad token's embedding at every prompt position (or zero vectors) to the
  input, ``steps`` points. Zero is a poor baseline for RMSNorm models: the trunk is scale
  invariant, so the output barely moves along most of a path that starts at 0 and the
  attributions miss most of f(x) - f(baseline) (measured on the hand-built test model:
  convergence delta 34 of 34 with zero, 0.002 with pad, 128 steps);
* ``gradxinput``: gradient x input on the embeddings (one backward pass);
* ``ablation``: captum's FeatureAblation over units, a unit's value being f(x) minus f(x with
  that unit deleted), evaluated ``batch_size`` perturbations per model call.

Token attributions are summed over the embedding dimension, then over a unit's tokens.
``base_values`` is f(x) minus the sum of the values, so ``shap.plots.text`` shows f(x); for
IG it equals f(baseline) up to the convergence delta (kept in ``explanation.convergence_delta``),
for the other two it is not the output of any input."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from seekdeep.errors import ConfigError
from seekdeep.explain.config import DEFAULT_BATCH, MAX_STEPS
from seekdeep.explain.shap_explainer import _texts, _tokenizer_of, merge_rows
from seekdeep.explain.target import Prepared, Scorer
from seekdeep.validate import check_int

GRADIENT_METHODS = ("ig", "gradxinput")
BASELINES = ("zero", "pad")


def _embedding_layer(model) -> torch.nn.Embedding:
    layer = getattr(getattr(model, "model", None), "embed_tokens", None)
    if not isinstance(layer, torch.nn.Embedding):
        raise ConfigError("model", f"{type(model).__name__} has no model.embed_tokens embedding; gradient methods need "
                          "one (accepted: seekdeep's causal LMs and sequence classifiers)")
    return layer


class _Base:
    def __init__(self, model, tokenizer, target, batch_size, granularity, max_new_tokens, progress):
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else _tokenizer_of(model)
        self.scorer = Scorer(model, self.tokenizer, target, batch_size, granularity, max_new_tokens)
        self.batch_size, self.progress = batch_size, progress

    def explain(self, text: str | list[str]):
        prepared = [self.scorer.prepare(t) for t in _texts(text)]
        rows = []
        for p in tqdm(prepared, desc=self.method, disable=not self.progress or len(prepared) < 2, leave=False):
            calls0, rows0, tokens0 = self.scorer.calls, self.scorer.rows, self.scorer.tokens
            row = self._explain_one(p)
            row.setdefault("model_calls", self.scorer.calls - calls0)
            row.setdefault("model_rows", self.scorer.rows - rows0)
            row.setdefault("model_tokens", self.scorer.tokens - tokens0)
            rows.append(row)
        exp = merge_rows(rows, method=self.method)
        if rows and "convergence_delta" in rows[0]:
            exp.convergence_delta = [r["convergence_delta"] for r in rows]
        return exp

    def _row(self, prepared: Prepared, token_values: np.ndarray, f_x: np.ndarray, **extra) -> dict:
        """Unit values from token values (T_prompt, n_outputs) and the shared row fields."""
        owner = prepared.units.unit_of_token()
        values = np.zeros((len(prepared.units), token_values.shape[1]))
        for pos, unit in enumerate(owner):
            if unit >= 0:
                values[unit] += token_values[pos]
        base = f_x - values.sum(0)
        single = len(prepared.output_names) == 1
        return dict(values=values[:, 0] if single else values, base_values=base[0] if single else base,
                    data=np.array(prepared.units.texts, dtype=object), output_names=prepared.output_names,
                    prepared=prepared, f_x=f_x, **extra)


class GradientExplainer(_Base):
    """``method``: ``"ig"`` (Integrated Gradients, ``steps`` points, ``baseline`` ``"zero"`` or
    ``"pad"``) or ``"gradxinput"``. Other arguments as :class:`SHAPExplainer`."""

    def __init__(self, model, tokenizer=None, target=None, method: str = "ig", steps: int = 64, baseline: str = "pad",
                 batch_size: int = DEFAULT_BATCH, granularity: str = "word", max_new_tokens: int = 8, progress: bool = True):
        if method not in GRADIENT_METHODS:
            raise ConfigError("method", f"got {method!r}; accepted: {', '.join(GRADIENT_METHODS)}")
        check_int("steps", steps, 2, MAX_STEPS)
        if baseline not in BASELINES:
            raise ConfigError("baseline", f"got {baseline!r}; accepted: {', '.join(BASELINES)}")
        self.method, self.steps, self.baseline = method, steps, baseline
        self.embedding = _embedding_layer(model)
        super().__init__(model, tokenizer, target, batch_size, granularity, max_new_tokens, progress)

    def _explain_one(self, prepared: Prepared) -> dict:
        from captum.attr import InputXGradient, IntegratedGradients

        ids = torch.tensor([self.scorer.full_ids(prepared)], device=self.model.device)  # (1, T)
        n_prompt = len(prepared.units.token_ids)
        with torch.no_grad():
            embeds = self.embedding(ids).detach()  # (1, T, C)
        mask = torch.ones_like(ids)

        def forward(x: torch.Tensor) -> torch.Tensor:  # x: (B, T, C) -> (B, n_outputs)
            return self.scorer.forward_embeds(x, mask.expand(x.shape[0], -1), prepared)

        if self.method == "ig":
            baseline = embeds.clone()
            with torch.no_grad():
                if self.baseline == "zero":
                    baseline[:, :n_prompt] = 0.0
                else:
                    baseline[:, :n_prompt] = self.embedding.weight[self.scorer.pad_id]
            method = IntegratedGradients(forward)
        else:
            method = InputXGradient(forward)
        outputs = len(prepared.output_names)
        token_values = np.zeros((n_prompt, outputs))
        deltas = []
        was_training = self.model.training
        self.model.eval()
        try:
            for j in range(outputs):
                if self.method == "ig":
                    attr, delta = method.attribute(embeds, baselines=baseline, target=j, n_steps=self.steps,
                                                   internal_batch_size=self.batch_size, return_convergence_delta=True)
                    deltas.append(float(delta.abs().max()))
                    self.scorer.calls += -(-self.steps // self.batch_size)
                    self.scorer.rows += self.steps
                    self.scorer.tokens += self.steps * ids.shape[1]
                else:
                    attr = method.attribute(embeds.clone().requires_grad_(True), target=j)
                    self.scorer.calls += 1
                    self.scorer.rows += 1
                    self.scorer.tokens += ids.shape[1]
                token_values[:, j] = attr[0, :n_prompt].sum(-1).detach().float().cpu().numpy()
            with torch.no_grad():
                f_x = forward(embeds)[0].float().cpu().numpy()
        finally:
            self.model.train(was_training)
        extra = {"convergence_delta": max(deltas)} if deltas else {}
        return self._row(prepared, token_values, f_x, **extra)


class AblationExplainer(_Base):
    """Leave-one-unit-out deletion through captum's FeatureAblation (see the module docstring)."""

    method = "ablation"

    def __init__(self, model, tokenizer=None, target=None, batch_size: int = DEFAULT_BATCH, granularity: str = "word",
                 max_new_tokens: int = 8, progress: bool = True):
        super().__init__(model, tokenizer, target, batch_size, granularity, max_new_tokens, progress)

    def _explain_one(self, prepared: Prepared) -> dict:
        from captum.attr import FeatureAblation

        m = len(prepared.units)

        def forward(keep: torch.Tensor) -> torch.Tensor:  # keep: (B, M) 1 = unit present -> (B, n_outputs)
            scores = self.scorer.score_units(keep.detach().cpu().numpy() > 0.5, prepared)
            return torch.from_numpy(scores)

        keep = torch.ones(1, m)
        outputs = len(prepared.output_names)
        values = np.zeros((m, outputs))
        ablation = FeatureAblation(forward)
        for j in range(outputs):
            attr = ablation.attribute(keep, baselines=0.0, target=j, feature_mask=torch.arange(m)[None],
                                      perturbations_per_eval=self.batch_size)
            values[:, j] = attr[0].numpy()
        f_x = self.scorer.score_units(np.ones((1, m), dtype=bool), prepared)[0]
        owner = prepared.units.unit_of_token()  # _row sums token values; here values are per unit already
        token_values = np.zeros((len(owner), outputs))
        first = {}
        for pos, unit in enumerate(owner):
            if unit >= 0 and unit not in first:
                first[unit] = pos
                token_values[pos] = values[unit]
        return self._row(prepared, token_values, f_x)
