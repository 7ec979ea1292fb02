"""One standalone HTML file per explanation: no notebook, no network (no remote script, style or
font; figures are inline PNG data URIs). Sections, each an element with its own id:

* ``summary``: model, method, target, f(x), base value, evaluation budget and model calls;
* ``tokens``: the input with every unit coloured by its value (red raises the output, blue lowers it);
* ``shap-text``: shap's own ``shap.plots.text`` view of the same ``shap.Explanation``;
* ``matrix``: for a continuation, prompt units x continuation tokens;
* ``attention``: per-layer, per-head attention heatmaps (causal and padding masks applied);
* ``selection``: for ``dsa`` layers, dense attention next to the keys the indexer kept and the
  dense mass they cover, per layer.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from seekdeep.files import atomic_write_text

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; } td, th { border: 1px solid #ddd; padding: 2px 6px; }
.tokens { font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.9; font-size: 0.95em; }
.tok { border-radius: 3px; padding: 1px 0; } .note { color: #666; font-size: 0.85em; }
img { max-width: 100%; }
"""


def _colour(value: float, scale: float) -> str:
    """Red for positive, blue for negative, alpha by |value| / scale."""
    alpha = 0.0 if scale <= 0 else min(abs(value) / scale, 1.0)
    rgb = "230,60,60" if value > 0 else "60,110,230"
    return f"rgba({rgb},{alpha:.3f})"


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _token_view(texts: list[str], values: np.ndarray) -> str:
    scale = float(np.abs(values).max()) if values.size else 0.0
    spans = [f'<span class="tok" style="background:{_colour(float(v), scale)}" title="{float(v):+.4g}">'
             f"{html.escape(t)}</span>" for t, v in zip(texts, values)]
    return f'<div class="tokens">{"".join(spans)}</div>'


def _matrix_table(texts: list[str], values: np.ndarray, outputs: list[str]) -> str:
    scale = float(np.abs(values).max()) if values.size else 0.0
    head = "".join(f"<th>{html.escape(repr(o))}</th>" for o in outputs)
    rows = []
    for t, row in zip(texts, values):
        cells = "".join(f'<td style="background:{_colour(float(v), scale)}">{float(v):+.3f}</td>' for v in row)
        rows.append(f"<tr><th>{html.escape(repr(t))}</th>{cells}</tr>")
    return f"<table><tr><th>prompt unit \\ generated token</th>{head}</tr>{''.join(rows)}</table>"


def _heatmap_grid(probs: list, tokens: list[str], title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, heads = len(probs), probs[0].shape[1]
    fig, axes = plt.subplots(layers, heads, figsize=(2.6 * heads, 2.6 * layers), squeeze=False)
    label = len(tokens) <= 24
    for li, layer in enumerate(probs):
        for h in range(heads):
            ax = axes[li][h]
            ax.imshow(layer[0, h].float().numpy(), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(f"layer {li} head {h}", fontsize=8)
            if label:
                ax.set_xticks(range(len(tokens)), [repr(t)[1:-1] for t in tokens], rotation=90, fontsize=5)
                ax.set_yticks(range(len(tokens)), [repr(t)[1:-1] for t in tokens], fontsize=5)
            else:
                ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def _selection_figure(dense, selected, tokens: list[str], layer: int, coverage: float | None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 4.2))
    mass = dense[0].float().mean(0).numpy()  # (T, T) mean over heads
    a.imshow(mass, cmap="viridis", vmin=0.0, interpolation="nearest")
    a.set_title(f"layer {layer}: dense attention (mean of heads)", fontsize=9)
    chosen = selected[0].numpy().astype(float)
    b.imshow(mass, cmap="Greys", vmin=0.0, interpolation="nearest")
    b.imshow(np.ma.masked_where(chosen == 0, chosen), cmap="autumn", alpha=0.55, interpolation="nearest")
    cov = "n/a" if coverage is None else f"{coverage:.3f}"
    b.set_title(f"keys the indexer kept (orange); dense mass covered {cov}", fontsize=9)
    for ax in (a, b):
        ax.set_xlabel("key", fontsize=8), ax.set_ylabel("query", fontsize=8)
        if len(tokens) <= 24:
            ax.set_xticks(range(len(tokens)), [repr(t)[1:-1] for t in tokens], rotation=90, fontsize=5)
            ax.set_yticks(range(len(tokens)), [repr(t)[1:-1] for t in tokens], fontsize=5)
    return _png(fig)


def render_report(explanation, *, model_name: str = "", maps=None, tokens: list[str] | None = None,
                  row: int = 0) -> str:
    """The HTML text for row ``row`` of ``explanation`` (and the attention ``maps`` of the same
    input, from :func:`seekdeep.explain.capture_attention`, if given)."""
    import shap

    method = getattr(explanation, "method", "unknown")
    values = np.asarray(explanation.values[row], dtype=float)
    texts = [str(t) for t in explanation.data[row]]
    outputs = (getattr(explanation, "targets", None) or [["output"]])[row]
    base = np.asarray(explanation.base_values[row], dtype=float).reshape(-1)
    per_unit = values if values.ndim == 1 else values.sum(-1)
    f_x = base + (values.sum(0) if values.ndim == 2 else values.sum())
    summary = [
        ("model", model_name or "(in memory)"), ("method", method),
        ("target", ", ".join(repr(o) for o in outputs)),
        ("f(x)", ", ".join(f"{v:.4f}" for v in np.atleast_1d(f_x))),
        ("base value", ", ".join(f"{v:.4f}" for v in base)),
        ("units", str(len(texts))),
        ("model calls / rows", f"{getattr(explanation, 'model_calls', '?')} / {getattr(explanation, 'model_rows', '?')}"),
    ]
    if method == "shap":
        truncated = explanation.truncated[row]
        summary.append(("evaluations / budget", f"{explanation.evals[row]} / {explanation.max_evals[row]}"
                        + (" (budget ran out: unexplored groups share their credit evenly)" if truncated else "")))
        context = (getattr(explanation, "fixed_context", None) or [None])[row]
        summary.append(("coalitions", "Owen values: every coalition of the other groups averaged" if context is None
                        else f"fixed context {context}: each group scored with the rest of the input "
                             + ("kept" if context == 1 else "deleted")))
    if getattr(explanation, "convergence_delta", None):
        summary.append(("IG convergence delta", f"{explanation.convergence_delta[row]:.4g}"))
    notes = {
        "shap": "shap's Partition explainer (Owen values, or a fixed context on long inputs: see 'coalitions'); "
                "a masked unit's tokens are deleted. base + sum = f(x).",
        "ig": "Integrated Gradients on the token embeddings from the pad-token baseline (captum).",
        "gradxinput": "Gradient x input on the token embeddings (captum). base value = f(x) - sum, not a baseline output.",
        "ablation": "f(x) minus f(x with the unit deleted), captum FeatureAblation. base value = f(x) - sum.",
        "attention": "Last-layer attention (mean of heads) of the explained position: a baseline, not an attribution.",
        "rollout": "Attention rollout (Abnar & Zuidema): a baseline, not an attribution.",
    }
    parts = [f"<h1>seekdeep explain: {html.escape(method)}</h1>",
             f'<p class="note">{html.escape(notes.get(method, ""))}</p>',
             '<section id="summary"><h2>Summary</h2><table>'
             + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary)
             + "</table></section>",
             '<section id="tokens"><h2>Coloured tokens</h2>'
             + (f'<p class="note">summed over the {len(outputs)} outputs</p>' if values.ndim == 2 else "")
             + _token_view(texts, per_unit) + "</section>"]
    try:
        shap_html = shap.plots.text(explanation[row] if values.ndim == 1 else explanation[row, :, 0], display=False)
    except Exception as exc:  # a view of the same numbers; the report stands without it
        shap_html = f'<p class="note">shap.plots.text failed: {html.escape(str(exc))}</p>'
    parts.append(f'<section id="shap-text"><h2>shap.plots.text</h2>{shap_html}</section>')
    if values.ndim == 2:
        parts.append('<section id="matrix"><h2>Prompt x generated tokens</h2>'
                     + _matrix_table(texts, values, outputs) + "</section>")
    else:
        parts.append('<section id="matrix"><h2>Prompt x generated tokens</h2>'
                     '<p class="note">one output (a classifier): no matrix</p></section>')
    if maps is not None and maps.probs:
        tokens = tokens or [str(i) for i in range(maps.probs[0].shape[-1])]
        parts.append('<section id="attention"><h2>Attention per layer and head</h2>'
                     '<p class="note">row: query, column: key; masked keys have 0</p>'
                     f'<img alt="attention heatmaps" src="{_heatmap_grid(maps.probs, tokens, "dense attention")}">'
                     "</section>")
        coverage = maps.layer_coverage()
        if any(c is not None for c in coverage):
            rows = "".join(f"<tr><td>{i}</td><td>{'dense' if c is None else f'{c:.4f}'}</td></tr>"
                           for i, c in enumerate(coverage))
            figures = "".join(
                f'<img alt="dsa selection layer {i}" src="{_selection_figure(maps.probs[i], maps.selected[i], tokens, i, c)}">'
                for i, c in enumerate(coverage) if c is not None)
            parts.append('<section id="selection"><h2>dsa: keys kept vs dense attention</h2>'
                         '<table><tr><th>layer</th><th>dense mass covered by the kept keys</th></tr>'
                         f"{rows}</table>{figures}</section>")
        else:
            parts.append('<section id="selection"><h2>dsa: keys kept vs dense attention</h2>'
                         '<p class="note">no dsa layer in this model: every key is attended</p></section>')
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>seekdeep explain: {html.escape(method)}'
            f"</title><style>{_STYLE}</style></head><body>\n{body}\n</body></html>\n")


def write_report(path, explanation, **kwargs) -> Path:
    """Write :func:`render_report` to ``path`` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, render_report(explanation, **kwargs))
    return path
