"""PNG plot of a profile: latency and throughput against batch size, one line per input length."""

from __future__ import annotations

from pathlib import Path

from seekdeep.profiler.latency import BatchRecommendation, Measurement


def plot_profile(measurements: list[Measurement], path: str | Path,
                 recommended: BatchRecommendation | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax_lat, ax_tp) = plt.subplots(1, 2, figsize=(11, 4.2))
    for length in sorted({m.input_length for m in measurements}):
        rows = sorted((m for m in measurements if m.input_length == length), key=lambda m: m.batch_size)
        xs = [m.batch_size for m in rows]
        ax_lat.plot(xs, [m.latency_ms for m in rows], marker="o", label=f"input {length}")
        ax_tp.plot(xs, [m.output_tokens_per_s for m in rows], marker="o", label=f"input {length}")
    if recommended is not None and recommended.best is not None:
        best = recommended.best
        ax_tp.scatter([best.batch_size], [best.output_tokens_per_s], s=160, facecolors="none", edgecolors="red",
                      label=f"recommended: batch {best.batch_size}")
        if recommended.latency_budget_ms is not None:
            ax_lat.axhline(recommended.latency_budget_ms, color="red", linestyle="--", label="latency budget")
    for ax, title, ylabel in ((ax_lat, "Request latency", "ms"), (ax_tp, "Throughput", "output tokens / s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
