"""Explanations for seekdeep models: SHAP (shap's Partition explainer), Integrated Gradients and
gradient x input (captum), feature ablation, attention baselines, the dsa selection view,
gradient-flow diagnostics and standalone HTML reports. Every attribution method returns a
``shap.Explanation`` (``shap.plots.text(values)`` works on all of them).

Heavy imports (shap, captum) happen when an explainer is built, not on ``import seekdeep.explain``."""

from __future__ import annotations

from seekdeep.errors import ConfigError
from seekdeep.explain.config import METHODS, ExplainConfig, GradFlowConfig


def make_explainer(model, tokenizer=None, method: str = "shap", **kwargs):
    """The explainer for ``method`` (one of METHODS); kwargs go to its constructor."""
    if method == "shap":
        from seekdeep.explain.shap_explainer import SHAPExplainer

        return SHAPExplainer(model, tokenizer, **kwargs)
    if method in ("ig", "gradxinput"):
        from seekdeep.explain.gradients import GradientExplainer

        return GradientExplainer(model, tokenizer, method=method, **kwargs)
    if method == "ablation":
        from seekdeep.explain.gradients import AblationExplainer

        return AblationExplainer(model, tokenizer, **kwargs)
    if method in ("attention", "rollout"):
        from seekdeep.explain.attention import AttentionExplainer

        return AttentionExplainer(model, tokenizer, method=method, **kwargs)
    raise ConfigError("method", f"got {method!r}; accepted: {', '.join(METHODS)}")


def explain(model, text, tokenizer=None, method: str = "shap", **kwargs):
    """``make_explainer(model, tokenizer, method, **kwargs).explain(text)``."""
    return make_explainer(model, tokenizer, method, **kwargs).explain(text)


def __getattr__(name: str):
    # the classes load on first use so that importing the package stays light
    lazy = {
        "SHAPExplainer": "seekdeep.explain.shap_explainer",
        "GradientExplainer": "seekdeep.explain.gradients",
        "AblationExplainer": "seekdeep.explain.gradients",
        "AttentionExplainer": "seekdeep.explain.attention",
        "capture_attention": "seekdeep.explain.attention",
        "attention_rollout": "seekdeep.explain.attention",
        "gradient_flow": "seekdeep.explain.gradflow",
        "GradientFlowRecorder": "seekdeep.explain.gradflow",
        "write_report": "seekdeep.explain.report",
        "selection_view": "seekdeep.explain.selection",
    }
    if name in lazy:
        import importlib

        return getattr(importlib.import_module(lazy[name]), name)
    raise AttributeError(f"module 'seekdeep.explain' has no attribute {name!r}")


__all__ = ["METHODS", "ExplainConfig", "GradFlowConfig", "explain", "make_explainer", "SHAPExplainer", "GradientExplainer", "AblationExplainer",
           "AttentionExplainer", "capture_attention", "attention_rollout", "gradient_flow", "GradientFlowRecorder",
           "write_report", "selection_view"]
