from __future__ import annotations

import asyncio
import json

import pytest

from seekdeep.cli import main
from seekdeep.errors import ConfigError
from seekdeep.serve.bench import BenchConfig, percentiles, run_bench


def test_bench_reports_throughput_and_latency_percentiles(server):
    report = asyncio.run(run_bench(BenchConfig(url=server.url, model="small", num_requests=8, max_concurrency=4,
                                               prompt_len=16, max_tokens=6)))
    assert (report["requests"], report["completed"], report["failed"]) == (8, 8, 0)
    assert report["output_tokens"] == 48
    assert report["output_tokens_per_s"] > 0 and report["request_throughput"] > 0
    for key in ("ttft_ms", "tpot_ms", "itl_ms"):
        assert set(report[key]) == {"mean", "p50", "p90", "p99"} and report[key]["p50"] is not None
        assert report[key]["p50"] <= report[key]["p90"] <= report[key]["p99"]


def test_bench_cli_poisson_arrivals_for_a_duration(server, capsys, tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--url", server.url, "--duration", "1.0", "--qps", "6", "--prompt-len", "8",
                 "--max-tokens", "4", "--output", str(out)]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out.strip().splitlines()[-1])
    assert report == json.loads(out.read_text())
    assert report["completed"] >= 1 and report["failed"] == 0 and report["config"]["qps"] == 6
    assert "TTFT (ms)" in captured.err and "output tokens/s" in captured.err


def test_bench_config_is_bounded_and_local_only():
    with pytest.raises(ConfigError, match="url"):
        BenchConfig(url="http://example.com:8000")
    with pytest.raises(ConfigError, match="num_requests"):
        BenchConfig(num_requests=None, duration=None)
    with pytest.raises(ConfigError, match="max_concurrency"):
        BenchConfig(qps=None, max_concurrency=None)
    assert BenchConfig(url="http://example.com", allow_remote=True).url == "http://example.com"


def test_percentiles_nearest_rank():
    values = [i / 1000 for i in range(1, 101)]  # 1 .. 100 ms
    assert percentiles(values) == {"mean": 50.5, "p50": 50.0, "p90": 90.0, "p99": 99.0}
    assert percentiles([])["p50"] is None
