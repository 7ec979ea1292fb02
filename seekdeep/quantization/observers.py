"""Activation observers for static quantisation: watch the inputs of a layer over calibration
batches, then choose the int8 scale and zero point.

- ``minmax``: the exact running min / max (every outlier widens the range).
- ``percentile``: the ``percentile``-th percentile of the observed values (of |x| when
  symmetric), which ignores rare outliers.
- ``mse``: the clipping range that minimises the mean squared quantisation error of the
  observed values, searched over a grid of fractions of the min / max range.

``percentile`` and ``mse`` work on a bounded random sample of the values (``sample_size``
per layer, drawn uniformly from each batch), so memory stays flat over many batches.
"""

from __future__ import annotations

import torch

OBSERVERS = ("minmax", "percentile", "mse")
QMIN, QMAX = -128, 127


def qparams_from_range(lo: float, hi: float, symmetric: bool) -> tuple[float, int]:
    """(scale, zero_point) mapping [lo, hi] (which must contain 0) onto int8."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        amax = max(abs(lo), abs(hi))
        return max(amax / 127.0, 1e-8), 0
    scale = max((hi - lo) / (QMAX - QMIN), 1e-8)
    zero_point = int(round(QMIN - lo / scale))
    return scale, max(QMIN, min(QMAX, zero_point))


def fake_quant_values(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    q = torch.round(x / scale + zero_point).clamp(QMIN, QMAX)
    return (q - zero_point) * scale


class Observer:
    """Collects statistics of every tensor passed to :meth:`observe`."""

    def __init__(self, kind: str = "minmax", percentile: float = 99.99, sample_size: int = 1 << 18, seed: int = 0):
        self.kind = kind
        self.percentile = percentile
        self.sample_size = sample_size
        self.min = float("inf")
        self.max = float("-inf")
        self.batches = 0
        self._samples: list[torch.Tensor] = []
        self._sampled = 0
        self._generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).float()
        if flat.numel() == 0:
            return
        self.min = min(self.min, float(flat.min()))
        self.max = max(self.max, float(flat.max()))
        self.batches += 1
        if self.kind != "minmax":
            take = min(flat.numel(), max(self.sample_size // 16, 1))
            idx = torch.randint(0, flat.numel(), (take,), generator=self._generator).to(flat.device)
            self._samples.append(flat[idx].cpu())
            self._sampled += take
            if self._sampled > 2 * self.sample_size:  # thin the reservoir to keep memory flat
                pool = torch.cat(self._samples)
                keep = torch.randperm(pool.numel(), generator=self._generator)[: self.sample_size]
                self._samples, self._sampled = [pool[keep]], self.sample_size

    @property
    def observed(self) -> bool:
        return self.batches > 0

    def qparams(self, symmetric: bool) -> tuple[float, int]:
        """(scale, zero_point) for int8."""
        if not self.observed:
            raise RuntimeError("observer saw no values")
        if self.kind == "minmax":
            return qparams_from_range(self.min, self.max, symmetric)
        sample = torch.cat(self._samples)
        if self.kind == "percentile":
            q = self.percentile / 100.0
            if symmetric:
                return qparams_from_range(0.0, float(torch.quantile(sample.abs(), q)), True)
            lo = float(torch.quantile(sample, 1.0 - q))
            hi = float(torch.quantile(sample, q))
            return qparams_from_range(lo, hi, False)
        return self._mse_qparams(sample, symmetric)

    def _mse_qparams(self, sample: torch.Tensor, symmetric: bool) -> tuple[float, int]:
        lo, hi = min(self.min, 0.0), max(self.max, 0.0)
        fractions = torch.linspace(0.05, 1.0, 96, dtype=torch.float64)  # (F,)
        x = sample.double()[None]  # (1, S)
        if symmetric:
            amax = max(-lo, hi)
            return self._best(x, fractions * amax / 127.0, torch.zeros_like(fractions))
        # asymmetric: clip the top, then the bottom (one pass each rather than a 2-D grid)
        scale, zero = self._range_qparams(torch.full_like(fractions, lo), fractions * hi)
        best_hi = hi * float(fractions[self._best_index(x, scale, zero)])
        scale, zero = self._range_qparams(fractions * lo, torch.full_like(fractions, best_hi))
        return self._best(x, scale, zero)

    @staticmethod
    def _range_qparams(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = ((hi - lo) / (QMAX - QMIN)).clamp(min=1e-8)
        return scale, torch.round(QMIN - lo / scale).clamp(QMIN, QMAX)

    @staticmethod
    def _best_index(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> int:
        scale = scale.clamp(min=1e-8)[:, None]
        zero = zero[:, None]
        q = torch.round(x / scale + zero).clamp(QMIN, QMAX)  # (F, S)
        return int(((q - zero) * scale - x).pow(2).mean(dim=1).argmin())

    def _best(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[float, int]:
        i = self._best_index(x, scale, zero)
        return max(float(scale[i]), 1e-8), int(zero[i])
