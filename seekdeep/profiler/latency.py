"""``LatencyProfiler(model).find_optimal_batch(input_length=512, latency_budget_ms=...)``.

One measurement = a batch of ``batch_size`` random prompts of ``input_length`` tokens,
prefilled in one forward and then decoded greedily for ``new_tokens`` steps with the KV cache
(the work one batch of a serving engine does). Latency is the wall time of that whole request;
throughput is output tokens per second. The recommended batch size is the one with the highest
throughput whose latency fits the budget (without a budget: the smallest batch within 5% of
the best throughput, past which a bigger batch only adds latency).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from seekdeep.errors import ConfigError

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32)


@dataclass
class Measurement:
    batch_size: int
    input_length: int
    new_tokens: int
    prefill_ms: float
    decode_ms_per_token: float
    latency_ms: float  # prefill + every decode step
    output_tokens_per_s: float
    requests_per_s: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BatchRecommendation:
    batch_size: int
    input_length: int
    latency_budget_ms: float | None
    reason: str
    best: Measurement | None
    measurements: list[Measurement] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"batch_size": self.batch_size, "input_length": self.input_length,
                "latency_budget_ms": self.latency_budget_ms, "reason": self.reason,
                "best": self.best.to_dict() if self.best else None,
                "measurements": [m.to_dict() for m in self.measurements]}


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(name, f"must be a positive integer, got {value!r}")
    return value


class LatencyProfiler:
    """Times a causal LM. ``new_tokens``: decode steps per measurement; ``repeats``: timed
    runs per point (the median is kept) after ``warmup`` untimed ones."""

    def __init__(self, model, new_tokens: int = 16, repeats: int = 3, warmup: int = 1, seed: int = 0):
        self.model = model
        self.new_tokens = _positive_int(new_tokens, "new_tokens")
        self.repeats = _positive_int(repeats, "repeats")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ConfigError("warmup", f"must be an integer >= 0, got {warmup!r}")
        self.warmup = warmup
        self.seed = seed
        self.device = next(model.parameters()).device

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def _run_once(self, ids: torch.Tensor) -> tuple[float, float]:
        self._sync()
        start = time.perf_counter()
        out = self.model(ids, use_cache=True, logits_to_keep=1)
        next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        self._sync()
        prefill = time.perf_counter() - start
        cache = out.past_key_values
        for _ in range(self.new_tokens - 1):
            out = self.model(next_ids, past_key_values=cache, use_cache=True)
            next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        self._sync()
        return prefill, time.perf_counter() - start

    def measure(self, batch_size: int, input_length: int) -> Measurement:
        _positive_int(batch_size, "batch_size")
        _positive_int(input_length, "input_length")
        limit = self.model.config.max_position_embeddings
        if input_length + self.new_tokens > limit:
            raise ConfigError("input_length", f"{input_length} + new_tokens {self.new_tokens} exceeds the model's "
                              f"max_position_embeddings ({limit})")
        gen = torch.Generator().manual_seed(self.seed)
        ids = torch.randint(0, self.model.config.vocab_size, (batch_size, input_length), generator=gen).to(self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            for _ in range(self.warmup):
                self._run_once(ids)
            runs = [self._run_once(ids) for _ in range(self.repeats)]
        finally:
            self.model.train(was_training)
        prefill = statistics.median(r[0] for r in runs)
        total = statistics.median(r[1] for r in runs)
        decode = (total - prefill) / max(1, self.new_tokens - 1)
        return Measurement(batch_size, input_length, self.new_tokens, prefill * 1e3, decode * 1e3, total * 1e3,
                           batch_size * self.new_tokens / total, batch_size / total)

    def profile(self, batch_sizes=DEFAULT_BATCH_SIZES, input_lengths=(128, 512),
                latency_budget_ms: float | None = None) -> list[Measurement]:
        """Measure every (input length, batch size); for each length, stop growing the batch
        once the latency is over twice the budget or the device runs out of memory."""
        results = []
        for length in input_lengths:
            for batch in sorted(batch_sizes):
                try:
                    m = self.measure(batch, length)
                except torch.OutOfMemoryError:
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    break
                results.append(m)
                if latency_budget_ms is not None and m.latency_ms > 2 * latency_budget_ms:
                    break
        return results

    def find_optimal_batch(self, input_length: int = 512, latency_budget_ms: float | None = None,
                           batch_sizes=DEFAULT_BATCH_SIZES) -> BatchRecommendation:
        if latency_budget_ms is not None and not (isinstance(latency_budget_ms, (int, float)) and latency_budget_ms > 0):
            raise ConfigError("latency_budget_ms", f"must be a positive number or None, got {latency_budget_ms!r}")
        measurements = self.profile(batch_sizes, [input_length], latency_budget_ms)
        return recommend(measurements, input_length, latency_budget_ms)


def recommend(measurements: list[Measurement], input_length: int, latency_budget_ms: float | None) -> BatchRecommendation:
    rows = [m for m in measurements if m.input_length == input_length]
    if not rows:
        raise ConfigError("input_length", f"no measurement for input length {input_length}")
    if latency_budget_ms is not None:
        fitting = [m for m in rows if m.latency_ms <= latency_budget_ms]
        if not fitting:
            fastest = min(rows, key=lambda m: m.latency_ms)
            return BatchRecommendation(1, input_length, latency_budget_ms,
                                       f"no batch size meets {latency_budget_ms:g} ms (batch 1 takes "
                                       f"{fastest.latency_ms:.1f} ms); use batch 1 or a faster device", None, rows)
        best = max(fitting, key=lambda m: m.output_tokens_per_s)
        return BatchRecommendation(best.batch_size, input_length, latency_budget_ms,
                                   f"highest throughput ({best.output_tokens_per_s:.1f} tok/s) within "
                                   f"{latency_budget_ms:g} ms", best, rows)
    top = max(m.output_tokens_per_s for m in rows)
    best = min((m for m in rows if m.output_tokens_per_s >= 0.95 * top), key=lambda m: m.batch_size)
    return BatchRecommendation(best.batch_size, input_length, None,
                               f"smallest batch within 5% of the best throughput ({top:.1f} tok/s)", best, rows)


def format_table(measurements: list[Measurement], recommended: BatchRecommendation | None = None) -> str:
    header = f"{'input':>6} {'batch':>6} {'prefill ms':>11} {'decode ms/tok':>14} {'latency ms':>11} {'out tok/s':>10} {'req/s':>8}"
    lines = [header, "-" * len(header)]
    for m in measurements:
        mark = ""
        if recommended is not None and recommended.best is m:
            mark = "  <- recommended"
        lines.append(f"{m.input_length:>6} {m.batch_size:>6} {m.prefill_ms:>11.1f} {m.decode_ms_per_token:>14.2f} "
                     f"{m.latency_ms:>11.1f} {m.output_tokens_per_s:>10.1f} {m.requests_per_s:>8.2f}{mark}")
    return "\n".join(lines)
