"""Cross-modal retrieval metrics: R@k, median rank and mAP@k in both directions, aware of
several positives per query (several images may share one caption), with ties broken
pessimistically (a positive tied with a negative ranks after it, so a constant scorer gets
no credit), and zero-shot classification through class prompts."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from seekdeep.errors import ConfigError


def _as_numpy(x: Any, field: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 2:
        raise ConfigError(field, f"expected a 2-D (queries, gallery) array, got shape {x.shape}")
    return x


def ranked_positives(scores: Any, positives: Any) -> list[np.ndarray]:
    """For each query (row), the 1-based ranks of its positives in the gallery ordered by
    descending score, ties ordered negatives first. ``positives``: (Q, G) booleans."""
    s = _as_numpy(scores, "scores").astype(np.float64)
    p = _as_numpy(positives, "positives").astype(bool)
    if s.shape != p.shape:
        raise ConfigError("positives", f"shape {p.shape} must equal the scores' shape {s.shape}")
    if not np.isfinite(s).all():
        raise ConfigError("scores", "contains NaN or infinite values")
    if not p.any(axis=1).all():
        raise ConfigError("positives", f"queries {np.flatnonzero(~p.any(axis=1))[:5].tolist()} have no positive in the gallery")
    out = []
    for row_s, row_p in zip(s, p):
        order = np.lexsort((row_p.astype(np.int8), -row_s))  # primary: score desc; ties: negatives (0) first
        out.append(np.flatnonzero(row_p[order]) + 1)
    return out


def retrieval_metrics(scores: Any, positives: Any, ks: Sequence[int] = (1, 5, 10), map_k: int = 10) -> dict[str, float]:
    """R@k (a positive within the top k), median and mean rank of the first positive, and
    mAP@``map_k`` = mean over queries of sum_{i<=k} precision@i * rel_i / min(k, n_positives)."""
    for k in (*ks, map_k):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError("ks", f"got {k!r}; accepted: integers >= 1")
    ranks = ranked_positives(scores, positives)
    first = np.array([r[0] for r in ranks], dtype=np.float64)
    out = {f"R@{k}": float((first <= k).mean()) for k in ks}
    out["median_rank"] = float(np.median(first))
    out["mean_rank"] = float(first.mean())
    aps = []
    for r in ranks:
        hits = r[r <= map_k]
        # precision at the i-th hit = (number of hits so far) / (its rank)
        aps.append(float((np.arange(1, len(hits) + 1) / hits).sum() / min(map_k, len(r))) if len(hits) else 0.0)
    out[f"mAP@{map_k}"] = float(np.mean(aps))
    return out


def bidirectional_metrics(scores: Any, positives: Any, names: tuple[str, str] = ("text_to_image", "image_to_text"), **kwargs: Any) -> dict[str, dict[str, float]]:
    """``scores`` / ``positives``: (queries of the first modality, items of the second); the
    second direction uses the transposes."""
    s, p = _as_numpy(scores, "scores"), _as_numpy(positives, "positives")
    return {names[0]: retrieval_metrics(s, p, **kwargs), names[1]: retrieval_metrics(s.T, p.T, **kwargs)}


def chance_metrics(positives: Any, ks: Sequence[int] = (1, 5, 10), map_k: int = 10, draws: int = 20, seed: int = 0) -> dict[str, float]:
    """Metrics of random scores (mean over ``draws``): the chance level to print beside a model."""
    p = _as_numpy(positives, "positives")
    rng = np.random.default_rng(seed)
    runs = [retrieval_metrics(rng.standard_normal(p.shape), p, ks=ks, map_k=map_k) for _ in range(draws)]
    return {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}


def labels_to_positives(query_labels: Sequence[Any], gallery_labels: Sequence[Any]) -> np.ndarray:
    """(Q, G) booleans: gallery items sharing the query's label (multi-positive ground truth)."""
    return np.asarray(query_labels)[:, None] == np.asarray(gallery_labels)[None, :]


def zero_shot_accuracy(embeds: torch.Tensor, class_embeds: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy of assigning each embedding (N, E) to the class whose prompt embedding (C, E) is
    the most cosine-similar."""
    if embeds.dim() != 2 or class_embeds.dim() != 2 or embeds.shape[1] != class_embeds.shape[1]:
        raise ConfigError("class_embeds", f"need (N, E) and (C, E) with one E, got {tuple(embeds.shape)} and {tuple(class_embeds.shape)}")
    sims = torch.nn.functional.normalize(embeds, dim=-1) @ torch.nn.functional.normalize(class_embeds, dim=-1).t()  # (N, C)
    return float((sims.argmax(-1) == labels).float().mean())
