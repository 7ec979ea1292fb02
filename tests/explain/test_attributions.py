"""Every attribution method on hand-built models whose answer hangs on one keyword: the keyword
comes first; SHAP keeps additivity, batches wide and says when its budget ran out; bad input
raises errors naming the field."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seekdeep.errors import ConfigError
from seekdeep.explain import METHODS, explain, make_explainer
from seekdeep.explain.shap_explainer import SHAPExplainer, auto_max_evals, plan
from seekdeep.explain.units import split_units

KEYWORD = " excellent"  # the keyword the hand-built models of conftest.py react to
POSITIVE = "the product arrived quickly and works as described with an excellent cable"
NEGATIVE = "an ordinary box with a cable and a manual inside"


def _f(model, tokenizer, text, target=1):
    enc = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits[0]
    return float(logits[target] - logits[1 - target])  # log-odds for two classes


def _top(exp, row=0, output=None):
    values = exp.values[row] if output is None else exp.values[row][:, output]
    return exp.data[row][int(np.argmax(values))]


def test_split_units_rebuilds_text_and_groups_subwords(tokenizer):
    text = "def parse_header(line):\n    return line.split(':')"
    words, tokens = split_units(text, tokenizer, "word"), split_units(text, tokenizer, "token")
    assert "".join(words.texts) == text and "".join(tokens.texts) == text
    assert len(tokens) == len(tokenizer.encode(text)) > len(words)
    accented = split_units("caf\u00e9 ok", tokenizer, "token")  # one character, two byte tokens: one unit
    assert "".join(accented.texts) == "caf\u00e9 ok" and sum("\u00e9" in t for t in accented.texts) == 1
    assert len(accented) < len(tokenizer.encode("caf\u00e9 ok"))
    assert "parse_header(" not in words.texts and any(t.strip() == "parse_header" for t in words.texts)
    assert [i for u in range(len(words)) for i in words.ids_of(u)] == tokenizer.encode(text)


def test_shap_classifier_keyword_first_and_additive(keyword_classifier, tokenizer):
    exp = SHAPExplainer(keyword_classifier, tokenizer, progress=False).explain([POSITIVE, NEGATIVE])
    assert _top(exp, 0).strip() == KEYWORD.strip()
    assert exp.targets == [["positive"], ["negative"]]
    for row, (text, target) in enumerate([(POSITIVE, 1), (NEGATIVE, 0)]):
        f_x = _f(keyword_classifier, tokenizer, text, target)
        assert exp.base_values[row] + exp.values[row].sum() == pytest.approx(f_x, abs=1e-3)
    assert abs(exp.values[1]).max() < 0.05 * abs(exp.values[0]).max()  # no keyword, nothing to credit
    assert exp.model_rows / exp.model_calls > 6  # wider than shap's default of <= 6 rows a call
    assert exp.truncated == [False, False]
    import shap

    html = shap.plots.text(exp[0], display=False)
    assert "excellent" in html


def test_shap_batch_size_does_not_change_values(keyword_classifier, tokenizer):
    wide = SHAPExplainer(keyword_classifier, tokenizer, batch_size=64, progress=False).explain(POSITIVE)
    narrow = SHAPExplainer(keyword_classifier, tokenizer, batch_size=5, progress=False).explain(POSITIVE)
    assert np.allclose(wide.values, narrow.values, atol=1e-4)
    assert narrow.model_calls > wide.model_calls


def test_shap_budget_scales_and_truncation_is_reported(keyword_classifier, tokenizer):
    # Owen values while the whole tree fits shap's 500, then the fixed context's 2(M-1) + 2
    assert auto_max_evals(10) == 102 and auto_max_evals(22) == 486 and auto_max_evals(40) == 80
    assert plan(200) == (1, 400) and plan(10) == (None, 102) and plan(10, fixed_context=1) == (1, 20)
    assert plan(40, max_evals=2000) == (None, 2000) and plan(40, fixed_context=None) == (None, 500)
    with pytest.warns(UserWarning, match="max_evals budget ran out"):
        exp = SHAPExplainer(keyword_classifier, tokenizer, max_evals=8, progress=False).explain(POSITIVE)
    assert exp.truncated == [True] and exp.evals[0] <= 10
    f_x = _f(keyword_classifier, tokenizer, POSITIVE)
    assert exp.base_values[0] + exp.values[0].sum() == pytest.approx(f_x, abs=1e-3)  # still additive


def test_shap_long_input_resolved_with_fixed_context(keyword_classifier, tokenizer):
    text = f"{NEGATIVE} and {NEGATIVE}, then{KEYWORD} news: {NEGATIVE}"  # ~35 words: past Owen's 500
    exp = SHAPExplainer(keyword_classifier, tokenizer, progress=False).explain(text)
    m = len(exp.data[0])
    assert m > 22 and exp.fixed_context == [1] and exp.truncated == [False]
    assert exp.evals[0] <= 2 * m and exp.model_rows <= 2 * m  # linear in the units, not M^2
    assert exp.model_tokens > exp.model_rows  # rows are counted in tokens too
    assert _top(exp).strip() == "excellent"
    assert exp.base_values[0] + exp.values[0].sum() == pytest.approx(_f(keyword_classifier, tokenizer, text), abs=1e-3)
    owen = SHAPExplainer(keyword_classifier, tokenizer, fixed_context=None, max_evals=4000, progress=False).explain(text)
    assert owen.fixed_context == [None] and _top(owen).strip() == "excellent"


def test_shap_causal_lm_token_matrix(keyword_lm, tokenizer):
    exp = SHAPExplainer(keyword_lm, tokenizer, target=" tool and", progress=False).explain("an excellent box with a cable")
    assert exp.values.shape == (1, 6, 2) and exp.output_names == [" tool", " and"]
    assert _top(exp, 0, output=0).strip() == "excellent"
    ids = tokenizer.encode("an excellent box with a cable")
    cont = tokenizer.encode(" tool and")
    with torch.no_grad():
        logp = torch.log_softmax(keyword_lm(torch.tensor([ids + cont])).logits[0], -1)
    f_x = [float(logp[len(ids) - 1 + j, cont[j]]) for j in range(2)]
    assert np.allclose(exp.base_values[0] + exp.values[0].sum(0), f_x, atol=1e-3)


@pytest.mark.parametrize("method", ["ig", "gradxinput", "ablation"])
def test_gradient_and_ablation_methods_find_keyword(method, keyword_classifier, keyword_lm, tokenizer):
    exp = explain(keyword_classifier, POSITIVE, tokenizer, method=method, progress=False)
    assert exp.method == method and exp.values.shape == (1, len(exp.data[0]))
    assert _top(exp).strip() == "excellent"
    lm_exp = explain(keyword_lm, "an excellent box with a cable", tokenizer, method=method, target=" tool",
                     progress=False)
    assert _top(lm_exp, output=None if lm_exp.values.ndim == 2 else 0).strip() == "excellent"


def test_integrated_gradients_completeness(keyword_classifier, tokenizer):
    exp = explain(keyword_classifier, POSITIVE, tokenizer, method="ig", steps=128, progress=False)
    f_x = _f(keyword_classifier, tokenizer, POSITIVE)
    assert exp.convergence_delta[0] < 0.05 * abs(f_x)  # the values add up to f(x) - f(pad baseline)


@pytest.mark.parametrize("method", ["attention", "rollout"])
def test_attention_baselines_are_shares_of_the_explained_row(method, keyword_classifier, tokenizer):
    exp = explain(keyword_classifier, POSITIVE, tokenizer, method=method, progress=False)
    values = exp.values[0]
    assert (values >= 0).all() and values.sum() == pytest.approx(1.0, abs=1e-4)


def test_bad_input(keyword_classifier, keyword_lm, tokenizer):
    with pytest.raises(ConfigError, match="text"):
        explain(keyword_classifier, "   ", tokenizer, progress=False)
    with pytest.raises(ConfigError, match="text"):
        explain(keyword_classifier, [], tokenizer, progress=False)
    with pytest.raises(ConfigError, match="target.*accepted: 0 / 'negative', 1 / 'positive'"):
        explain(keyword_classifier, POSITIVE, tokenizer, target="neutral", progress=False)
    with pytest.raises(ConfigError, match="target"):
        explain(keyword_classifier, POSITIVE, tokenizer, method="ig", target=7, progress=False)
    with pytest.raises(ConfigError, match="method"):
        make_explainer(keyword_classifier, tokenizer, method="lime")
    with pytest.raises(ConfigError, match="model"):
        make_explainer(torch.nn.Linear(2, 2), tokenizer, method="shap")
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        explain(keyword_classifier, "word " * 200, tokenizer, method="ablation", progress=False)
    with pytest.raises(ConfigError, match="target"):  # a continuation that is not text
        explain(keyword_lm, POSITIVE, tokenizer, method="ablation", target=3, progress=False)
    with pytest.raises(ConfigError, match="max_evals"):
        SHAPExplainer(keyword_classifier, tokenizer, max_evals=0)
    with pytest.raises(ConfigError, match="fixed_context"):
        SHAPExplainer(keyword_classifier, tokenizer, fixed_context=2)
    assert set(METHODS) == {"shap", "ig", "gradxinput", "ablation", "attention", "rollout"}
