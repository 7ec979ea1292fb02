"""Gradient-flow diagnostics: per-layer gradient and update norms.

* :func:`gradient_flow` — one forward/backward on a batch, the gradient norm of every layer
  (embedding, each decoder block, final norm, head) with a warning for layers whose gradient
  vanishes, explodes or never arrives.
* :class:`GradientFlowRecorder` — the same during training, through two optimizer hooks (no
  edit of the loop): before ``optimizer.step()`` it reads the (unscaled, clipped) gradients,
  after it the update each layer received; every ``every`` steps. ``save(out_dir)`` writes
  ``grad_flow.json`` and ``grad_flow.png``, and the scalars go to TensorBoard when it is
  installed.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from seekdeep.errors import ConfigError
from seekdeep.explain.config import GradFlowConfig
from seekdeep.files import write_json_atomic

_LAYER = re.compile(r"^(?:.*?\.)?layers\.(\d+)\.")


def layer_of(name: str) -> str:
    """Group a parameter name by layer: ``model.layers.3.mlp.up_proj.weight`` -> ``layers.3``;
    adapters and wrapped base layers stay with their layer; anything else by its top module."""
    m = _LAYER.match(name)
    if m:
        return f"layers.{int(m.group(1)):02d}"
    parts = [p for p in name.split(".") if p not in ("model", "base_layer", "weight", "bias")]
    return parts[0] if parts else name


def _groups(model) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    groups: dict[str, list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(layer_of(name), []).append((name, p))
    if not groups:
        raise ConfigError("model", "has no trainable parameters; gradient flow needs at least one")
    return dict(sorted(groups.items()))


def _norm(tensors) -> float:
    total = 0.0
    for t in tensors:
        total += float(t.detach().float().pow(2).sum())
    return math.sqrt(total)


@dataclass
class FlowWarning:
    layer: str
    kind: str  # "vanishing", "exploding", "non-finite", "no gradient"
    value: float | None
    step: int

    def __str__(self) -> str:
        value = "" if self.value is None else f" (gradient norm {self.value:.3g})"
        return f"gradient flow, step {self.step}: layer {self.layer}: {self.kind} gradient{value}"


def _check(layer: str, norm: float | None, cfg: GradFlowConfig, step: int) -> FlowWarning | None:
    if norm is None:
        return FlowWarning(layer, "no gradient", None, step)
    if not math.isfinite(norm):
        return FlowWarning(layer, "non-finite", norm, step)
    if norm < cfg.vanish:
        return FlowWarning(layer, "vanishing", norm, step)
    if norm > cfg.explode:
        return FlowWarning(layer, "exploding", norm, step)
    return None


def _layer_grad_norms(groups) -> dict[str, float | None]:
    out = {}
    for layer, params in groups.items():
        grads = [p.grad for _, p in params if p.grad is not None]
        out[layer] = _norm(grads) if grads else None
    return out


@dataclass
class GradFlowReport:
    grad_norms: dict[str, float | None]
    param_norms: dict[str, float]
    loss: float
    warnings: list[FlowWarning] = field(default_factory=list)


def gradient_flow(model, batch: dict, config: GradFlowConfig | None = None, plot: str | Path | None = None) -> GradFlowReport:
    """Per-layer gradient norms of ``model`` on ``batch`` (input_ids, optional attention_mask and
    labels; a causal LM without labels is scored on its own ids). The model's ``.grad`` are
    cleared before and after; nothing is updated. ``plot``: a PNG path for a bar chart."""
    cfg = config or GradFlowConfig()
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise ConfigError("batch", f"expected a dict with input_ids (and optionally attention_mask, labels), got "
                          f"{type(batch).__name__}")
    groups = _groups(model)
    kwargs = dict(batch)
    if "labels" not in kwargs and hasattr(model, "lm_head"):
        kwargs["labels"] = kwargs["input_ids"]
    if "labels" not in kwargs:
        raise ConfigError("batch", "a classifier needs labels in the batch to have a loss")
    model.zero_grad(set_to_none=True)
    out = model(**kwargs)
    if out.loss is None:
        raise ConfigError("batch", "the model returned no loss for this batch")
    out.loss.backward()
    norms = _layer_grad_norms(groups)
    report = GradFlowReport(norms, {k: _norm(p for _, p in v) for k, v in groups.items()}, float(out.loss.detach()))
    for layer, norm in norms.items():
        w = _check(layer, norm, cfg, 0)
        if w is not None:
            report.warnings.append(w)
            print(f"warning: {w}", file=sys.stderr)
    model.zero_grad(set_to_none=True)
    if plot is not None:
        _bar_plot(Path(plot), norms)
    return report


class GradientFlowRecorder:
    """Records per-layer gradient / update norms through optimizer hooks (module docstring).

    ``log_dir``: TensorBoard directory (written only when tensorboard is installed)."""

    def __init__(self, model, optimizer: torch.optim.Optimizer, config: GradFlowConfig | None = None,
                 log_dir: str | Path | None = None):
        self.cfg = config or GradFlowConfig()
        self.groups = _groups(model)
        self.history: list[dict] = []
        self.warnings: list[FlowWarning] = []
        self._warned: set[tuple[str, str]] = set()
        self._step = 0
        self._before: dict[str, list[torch.Tensor]] | None = None
        self._pending: dict | None = None
        self._writer = None
        if log_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(log_dir))
            except ImportError:  # tensorboard not installed: JSON + PNG only
                self._writer = None
        self._handles = [optimizer.register_step_pre_hook(self._pre), optimizer.register_step_post_hook(self._post)]

    def _pre(self, optimizer, args, kwargs) -> None:
        self._step += 1
        if (self._step - 1) % self.cfg.every:
            return
        norms = _layer_grad_norms(self.groups)
        self._pending = {"step": self._step, "grad_norm": norms}
        self._before = {k: [p.detach().clone() for _, p in v] for k, v in self.groups.items()}
        for layer, norm in norms.items():
            w = _check(layer, norm, self.cfg, self._step)
            if w is not None and (layer, w.kind) not in self._warned:
                self._warned.add((layer, w.kind))
                self.warnings.append(w)
                print(f"warning: {w}", file=sys.stderr)

    def _post(self, optimizer, args, kwargs) -> None:
        if self._pending is None:
            return
        record = self._pending
        record["update_norm"] = {k: _norm(p.detach() - b for (_, p), b in zip(v, self._before[k]))
                                 for k, v in self.groups.items()}
        record["param_norm"] = {k: _norm(p for _, p in v) for k, v in self.groups.items()}
        self.history.append(record)
        if self._writer is not None:
            for kind in ("grad_norm", "update_norm"):
                for layer, value in record[kind].items():
                    if value is not None:
                        self._writer.add_scalar(f"{kind}/{layer}", value, record["step"])
        self._pending, self._before = None, None

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._writer is not None:
            self._writer.close()

    def save(self, out_dir: str | Path) -> dict[str, str]:
        """Write grad_flow.json and grad_flow.png in ``out_dir``; returns their paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "grad_flow.json", {"config": self.cfg.to_dict(), "history": self.history,
                                                   "warnings": [str(w) for w in self.warnings]})
        paths = {"json": str(out / "grad_flow.json")}
        if self.history:
            _history_plot(out / "grad_flow.png", self.history)
            paths["png"] = str(out / "grad_flow.png")
        return paths


def _bar_plot(path: Path, norms: dict[str, float | None]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from seekdeep.files import atomic_write

    layers = list(norms)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(layers)), 3.2))
    ax.bar(range(len(layers)), [norms[k] or 0.0 for k in layers])
    ax.set_yscale("log")
    ax.set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("gradient norm")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def _history_plot(path: Path, history: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from seekdeep.files import atomic_write

    layers = list(history[0]["grad_norm"])
    steps = [r["step"] for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    cmap = plt.get_cmap("viridis")
    for i, layer in enumerate(layers):
        colour = cmap(i / max(len(layers) - 1, 1))
        for ax, kind in zip(axes, ("grad_norm", "update_norm")):
            values = [r[kind].get(layer) for r in history]
            ax.plot(steps, [float("nan") if v is None else max(v, 1e-30) for v in values], color=colour,
                    label=layer, lw=1)
    for ax, title in zip(axes, ("gradient norm per layer", "update norm per layer")):
        ax.set_yscale("log"), ax.set_xlabel("step"), ax.set_title(title, fontsize=9)
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
