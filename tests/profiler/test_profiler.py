from __future__ import annotations

import json

import pytest
import torch

from seekdeep.cli import main
from seekdeep.errors import ConfigError
from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM
from seekdeep.profiler import LatencyProfiler, format_table
from seekdeep.profiler.latency import Measurement, recommend
from seekdeep.profiler.plot import plot_profile


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig.from_name("tiny", vocab_size=128, max_position_embeddings=64))
    m.init_weights()
    return m.eval()


def _m(batch, latency, tps, length=512):
    return Measurement(batch, length, 16, 1.0, 1.0, latency, tps, batch / latency * 1e3)


def test_find_optimal_batch_measures_and_respects_the_budget(model):
    profiler = LatencyProfiler(model, new_tokens=3, repeats=1, warmup=0)
    rec = profiler.find_optimal_batch(input_length=16, batch_sizes=(1, 2, 4))
    assert [m.batch_size for m in rec.measurements] == [1, 2, 4]
    assert rec.batch_size in (1, 2, 4) and rec.best.batch_size == rec.batch_size
    for m in rec.measurements:
        assert m.latency_ms >= m.prefill_ms > 0 and m.output_tokens_per_s > 0
    impossible = profiler.find_optimal_batch(input_length=16, latency_budget_ms=1e-6, batch_sizes=(1, 2))
    assert impossible.batch_size == 1 and impossible.best is None and "no batch size meets" in impossible.reason
    with pytest.raises(ConfigError, match="input_length"):
        profiler.find_optimal_batch(input_length=100)
    with pytest.raises(ConfigError, match="latency_budget_ms"):
        profiler.find_optimal_batch(input_length=8, latency_budget_ms=-1)


def test_recommendation_rules():
    rows = [_m(1, 10, 100), _m(2, 12, 170), _m(4, 20, 200), _m(8, 40, 205)]
    assert recommend(rows, 512, latency_budget_ms=25).batch_size == 4  # best throughput under 25 ms
    assert recommend(rows, 512, latency_budget_ms=11).batch_size == 1
    assert recommend(rows, 512, None).batch_size == 4  # smallest within 5% of the best (205)
    table = format_table(rows, recommend(rows, 512, 25))
    assert "<- recommended" in table.splitlines()[4] and len(table.splitlines()) == 6


def test_plot_and_profile_cli(model, tmp_path, capsys):
    rows = [_m(1, 10, 100), _m(2, 12, 170), _m(1, 20, 60, length=128)]
    png = plot_profile(rows, tmp_path / "p.png", recommend(rows, 512, None))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    out = tmp_path / "profile"
    assert main(["profile", str(model_dir), "--batch-sizes", "1", "2", "--input-lengths", "8", "16",
                 "--new-tokens", "2", "--repeats", "1", "--warmup", "0", "--output-dir", str(out)]) == 0
    report = json.loads((out / "profile.json").read_text())
    assert len(report["measurements"]) == 4 and report["recommendation"]["input_length"] == 16
    assert (out / "profile.png").read_bytes()[:4] == b"\x89PNG"
    assert "recommended batch size for input length 16" in capsys.readouterr().out
