"""``seekdeep bench``: a bounded load generator for a running OpenAI-compatible server.

Sends streaming ``/v1/completions`` requests -- a fixed number, or for a fixed duration --
either with Poisson arrivals at a given rate (``qps``) or as fast as ``max_concurrency``
allows, and reports request throughput, output tokens/s, time to first token (TTFT), time per
output token (TPOT) and inter-token latency (ITL) percentiles. Only loopback servers are
accepted unless ``allow_remote`` is set: this is a benchmark, not a load-testing tool.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlparse

from seekdeep.errors import ConfigError
from seekdeep.validate import MAX_SEED, check_float, check_int

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class BenchConfig:
    url: str = "http://127.0.0.1:8000"
    model: str | None = None  # default: the first served model
    num_requests: int | None = 64
    duration: float | None = None  # seconds; replaces num_requests as the bound
    qps: float | None = None  # Poisson arrival rate; None = send as fast as max_concurrency allows
    max_concurrency: int | None = 32
    prompt_len: int = 128
    max_tokens: int = 128
    ignore_eos: bool = True
    temperature: float = 0.0
    seed: int = 0
    api_key: str | None = None
    timeout: float = 600.0
    allow_remote: bool = False

    def __post_init__(self) -> None:
        host = urlparse(self.url).hostname
        if host is None:
            raise ConfigError("url", f"not a URL: {self.url!r}")
        if host not in _LOOPBACK and not self.allow_remote:
            raise ConfigError("url", f"host {host!r} is not loopback (127.0.0.1 / localhost); pass --allow-remote to bench it")
        if self.num_requests is None and self.duration is None:
            raise ConfigError("num_requests", "give a request count or a duration so the run is bounded")
        check_int("num_requests", self.num_requests, 1, 10**7, optional=True)
        check_float("duration", self.duration, 0, 7 * 86400, lo_open=True, optional=True)
        check_float("qps", self.qps, 0, 1e6, lo_open=True, optional=True)
        if self.qps is None and self.max_concurrency is None:
            raise ConfigError("max_concurrency", "give a Poisson rate (qps) or a concurrency limit")
        check_int("max_concurrency", self.max_concurrency, 1, 1 << 16, optional=True)
        check_int("prompt_len", self.prompt_len, 1, 1 << 20)
        check_int("max_tokens", self.max_tokens, 1, 1 << 20)
        check_float("temperature", self.temperature, 0, 2)  # the API's range
        check_int("seed", self.seed, 0, MAX_SEED)
        check_float("timeout", self.timeout, 0, 7 * 86400, lo_open=True)


@dataclass
class RequestResult:
    ok: bool
    start: float
    end: float
    ttft: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None


def percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float | None]:
    """mean / p50 / p90 / p99 (nearest rank), scaled (seconds -> ms by default)."""
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    ordered = sorted(values)

    def rank(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]

    return {"mean": round(statistics.fmean(ordered) * scale, 3), "p50": round(rank(50) * scale, 3),
            "p90": round(rank(90) * scale, 3), "p99": round(rank(99) * scale, 3)}


async def _one_request(client, cfg: BenchConfig, model: str, prompt) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": cfg.max_tokens, "temperature": cfg.temperature,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": cfg.ignore_eos}
    start = time.perf_counter()
    result = RequestResult(False, start, start)
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                result.error = f"HTTP {resp.status_code}: {text[:200]}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    result.ok = True
                    break
                payload = json.loads(data)
                if "error" in payload:
                    result.error = str(payload["error"])
                    break
                now = time.perf_counter()
                if payload.get("choices") and payload["choices"][0].get("text"):
                    if result.ttft is None:
                        result.ttft = now - start
                    result.chunk_times.append(now)
                if payload.get("usage"):
                    result.prompt_tokens = payload["usage"]["prompt_tokens"]
                    result.output_tokens = payload["usage"]["completion_tokens"]
    except Exception as exc:  # noqa: BLE001 - a failed request is counted, the run goes on
        result.error = f"{type(exc).__name__}: {exc}"
    result.end = time.perf_counter()
    return result


async def run_bench(cfg: BenchConfig) -> dict:
    """Run the load and return the report (also what ``seekdeep bench`` prints as JSON)."""
    import httpx

    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=max(64, cfg.max_concurrency or 0), max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=cfg.url.rstrip("/"), headers=headers, timeout=cfg.timeout, limits=limits) as client:
        cards = (await client.get("/v1/models")).raise_for_status().json()["data"]
        model = cfg.model or cards[0]["id"]
        card = next((c for c in cards if c["id"] == model), {})
        vocab = card.get("vocab_size")
        rng = random.Random(cfg.seed)

        def make_prompt():
            if vocab:  # exact prompt length as token ids
                return [rng.randrange(min(vocab, 1000)) for _ in range(cfg.prompt_len)]
            return " ".join(rng.choice(("def", "x", "return", "self", "import", "for", "in")) for _ in range(cfg.prompt_len))

        semaphore = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
        tasks: list[asyncio.Task] = []

        async def send(prompt):
            try:
                return await _one_request(client, cfg, model, prompt)
            finally:
                if semaphore is not None:
                    semaphore.release()

        t0 = time.perf_counter()
        while True:
            if cfg.num_requests is not None and len(tasks) >= cfg.num_requests:
                break
            if cfg.duration is not None and time.perf_counter() - t0 >= cfg.duration:
                break
            if semaphore is not None:
                await semaphore.acquire()  # at most max_concurrency requests in flight
            tasks.append(asyncio.create_task(send(make_prompt())))
            if cfg.qps is not None:
                await asyncio.sleep(rng.expovariate(cfg.qps))
        results: list[RequestResult] = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0

    done = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in done)
    itl = [b - a for r in done for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    tpot = [(r.end - r.start - r.ttft) / (r.output_tokens - 1) for r in done if r.ttft is not None and r.output_tokens > 1]
    errors = sorted({r.error for r in results if r.error})[:5]
    return {
        "url": cfg.url, "model": model, "requests": len(results), "completed": len(done), "failed": len(results) - len(done),
        "duration_s": round(elapsed, 3),
        "request_throughput": round(len(done) / elapsed, 4),
        "output_tokens_per_s": round(out_tokens / elapsed, 3),
        "total_tokens_per_s": round((out_tokens + sum(r.prompt_tokens for r in done)) / elapsed, 3),
        "output_tokens": out_tokens,
        "ttft_ms": percentiles([r.ttft for r in done if r.ttft is not None]),
        "tpot_ms": percentiles(tpot),
        "itl_ms": percentiles(itl),
        "e2e_ms": percentiles([r.end - r.start for r in done]),
        "config": {k: v for k, v in asdict(cfg).items() if k != "api_key"},
        "errors": errors,
    }


def format_table(report: dict) -> str:
    lines = [
        f"{'requests':<24}{report['completed']}/{report['requests']} completed in {report['duration_s']} s",
        f"{'request throughput':<24}{report['request_throughput']} req/s",
        f"{'output tokens/s':<24}{report['output_tokens_per_s']}",
        f"{'':<24}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}",
    ]
    for key, label in (("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"), ("itl_ms", "ITL (ms)"), ("e2e_ms", "E2E (ms)")):
        row = report[key]
        cells = "".join(f"{'-' if row[p] is None else row[p]:>10}" for p in ("mean", "p50", "p90", "p99"))
        lines.append(f"{label:<24}{cells}")
    if report["errors"]:
        lines.append("errors: " + "; ".join(report["errors"]))
    return "\n".join(lines)
