"""``seekdeep explain MODEL --text "..." [--method shap|ig|gradxinput|ablation|attention|rollout]
[--target ...] --output report.html``: one explanation as a standalone HTML report."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields
from pathlib import Path

from seekdeep.errors import CheckpointError
from seekdeep.explain.config import ExplainConfig

_HELP = {
    "model": "model directory (Hugging Face layout with tokenizer.json): a sequence classifier or a causal LM",
    "text": "the input to explain",
    "method": "shap (default), ig, gradxinput, ablation, attention or rollout",
    "target": "classifier: class name or index (default: the predicted class); causal LM: the continuation to "
              "score (default: the model's greedy continuation of --max-new-tokens tokens)",
    "output": "HTML report to write (default: report.html)",
    "max_evals": "shap: model evaluations per input, or auto (grows with the number of words)",
    "fixed_context": "shap: auto (default: exact Owen values up to ~22 words, fixed context 1 past that), owen "
                     "(Owen values, cut at --max-evals), 1 (each word group scored with the rest of the text kept) "
                     "or 0 (with the rest deleted)",
    "granularity": "word (sub-word tokens grouped, default) or token",
    "steps": "ig: integration points (default: 64)",
    "attention_backend": "override the model's attention backend (e.g. eager, dsa)",
}


def load_model_and_tokenizer(model_dir: str, attention_backend: str | None = None):
    """A classifier when config.json names a *ForSequenceClassification, else the causal LM."""
    from seekdeep.auto import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from seekdeep.files import read_json
    from seekdeep.models.loading import resolve_model_dir

    path = resolve_model_dir(model_dir)
    if not (path / "tokenizer.json").is_file():
        raise CheckpointError(f"{path}: no tokenizer.json; explanations need the model's tokenizer next to it")
    overrides = {"attention_backend": attention_backend} if attention_backend else {}
    architectures = read_json(path / "config.json").get("architectures") or []
    if any(str(a).endswith("ForSequenceClassification") for a in architectures):
        model = AutoModelForSequenceClassification.from_pretrained(path, **overrides)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **overrides)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def run_explain(cfg: ExplainConfig) -> dict:
    """Explain ``cfg.text`` and write the report; returns a summary (path, top units, timing)."""
    import numpy as np

    from seekdeep.explain import make_explainer
    from seekdeep.explain.attention import capture_attention
    from seekdeep.explain.report import write_report

    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.attention_backend)
    kwargs = dict(target=cfg.target, batch_size=cfg.batch_size, granularity=cfg.granularity,
                  max_new_tokens=cfg.max_new_tokens, progress=cfg.progress)
    if cfg.method == "shap":
        kwargs["max_evals"] = cfg.max_evals_value
        kwargs["fixed_context"] = cfg.fixed_context_value
    if cfg.method == "ig":
        kwargs["steps"] = cfg.steps
    start = time.perf_counter()
    explanation = make_explainer(model, tokenizer, cfg.method, **kwargs).explain(cfg.text)
    seconds = time.perf_counter() - start
    prepared = explanation.prepared[0]
    import torch

    ids = prepared.units.token_ids + prepared.continuation
    maps = capture_attention(model, torch.tensor([ids], device=model.device))
    tokens = [tokenizer.decode([i]) for i in ids]
    path = write_report(cfg.output, explanation, model_name=str(cfg.model), maps=maps, tokens=tokens)
    values = np.asarray(explanation.values[0], dtype=float)
    per_unit = values if values.ndim == 1 else values.sum(-1)
    order = np.argsort(-per_unit)[:5]
    return {"report": str(path), "seconds": seconds, "target": explanation.targets[0],
            "top": [(str(explanation.data[0][i]), float(per_unit[i])) for i in order],
            "coverage": maps.layer_coverage()}


def cmd_explain(args: argparse.Namespace) -> int:
    cfg = ExplainConfig(**{f.name: getattr(args, f.name) for f in fields(ExplainConfig)})
    summary = run_explain(cfg)
    print(f"{cfg.method} for target {summary['target']} in {summary['seconds']:.2f}s; strongest units:")
    for text, value in summary["top"]:
        print(f"  {value:+.4f}  {text!r}")
    if any(c is not None for c in summary["coverage"]):
        print("dsa: dense attention mass covered by the kept keys, per layer: "
              + ", ".join("dense" if c is None else f"{c:.3f}" for c in summary["coverage"]))
    print(f"report: {Path(summary['report']).resolve()}", file=sys.stderr)
    return 0


def register(subparsers) -> None:
    """Add ``seekdeep explain`` (see the module docstring)."""
    from seekdeep.cli import add_recipe_command

    add_recipe_command(subparsers, "explain", "explain a model's output on a text (SHAP, IG, ablation, attention) "
                       "as a standalone HTML report", ExplainConfig, "model", _HELP, cmd_explain)
