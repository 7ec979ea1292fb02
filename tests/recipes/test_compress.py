"""End-to-end runs of ``seekdeep compress`` on a tiny model and a tiny corpus."""

from __future__ import annotations

import json
import math

import pytest
import torch

import seekdeep
from seekdeep.cli import main
from seekdeep.errors import ConfigError
from seekdeep.recipes.compress import CompressConfig, compress, parameter_count


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpus):
    from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM
    from seekdeep.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(sorted(str(p) for p in corpus.iterdir())[:4], vocab_size=320)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256, bos_token_id=None,
                                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True))
    model.init_weights()
    path = tmp_path_factory.mktemp("compress-base")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _cfg(base, corpus, out, **kw):
    args = dict(model=str(base), data=str(corpus), seq_len=32, batch_size=4, eval_batches=2, calibration_batches=2,
                recovery_steps=3, distill_steps=3, latency_prompt=8, latency_tokens=4, latency_rounds=1,
                output_dir=str(out), progress=False)
    args.update(kw)
    return CompressConfig(**args)


@pytest.mark.slow
def test_prune_distill_quantize_pipeline_writes_every_stage_and_the_report(base, corpus, tmp_path):
    report = compress(_cfg(base, corpus, tmp_path / "run", prune=0.4, distill=True, quant="int8"))
    stages = report["stages"]
    assert [s["stage"] for s in stages] == ["input", "prune", "distill", "quant-int8"]
    params = [s["parameters"] for s in stages]
    assert params[1] < params[0] and params[2] < params[1]
    assert params[3] == params[2]  # quantisation keeps every weight, in fewer bits
    sizes = [s["file_bytes"] for s in stages]
    assert sizes[3] < 0.5 * sizes[2]
    prune_details = stages[1]["details"]
    assert prune_details["prunable_fraction_removed"] == pytest.approx(0.4, abs=0.1)
    assert stages[2]["details"]["student_layers"] == 2
    for s in stages:
        assert math.isfinite(s["heldout_ppl"]) and s["decode_ms_per_token"] > 0
    # every stage's directory reloads to the model that was measured
    for s in stages[1:]:
        model = seekdeep.AutoModel.from_pretrained(s["model_dir"])
        assert parameter_count(model) == s["parameters"]
    out = tmp_path / "run"
    saved = json.loads((out / "report.json").read_text())
    assert [s["stage"] for s in saved["stages"]] == ["input", "prune", "distill", "quant-int8"]
    assert saved["stages"][1]["parameters_ratio"] == pytest.approx(params[1] / params[0])
    assert "| prune |" in (out / "report.md").read_text()
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quantize_only_keeps_parameter_count_and_shrinks_the_file(base, corpus, tmp_path):
    report = compress(_cfg(base, corpus, tmp_path / "q", quant="int4", group_size=32))
    first, quant = report["stages"]
    assert quant["stage"] == "quant-int4"
    assert quant["parameters"] == first["parameters"]
    assert quant["file_bytes"] < 0.5 * first["file_bytes"]
    reloaded = seekdeep.AutoModel.from_pretrained(quant["model_dir"])
    ids = torch.randint(0, reloaded.config.vocab_size, (1, 12))
    assert torch.isfinite(reloaded(ids).logits).all()


def test_cli_runs_quantisation(base, corpus, tmp_path, capsys):
    code = main(["compress", str(base), "--data", str(corpus), "--quant", "int8-weight-only", "--seq-len", "32",
                 "--batch-size", "4", "--eval-batches", "1", "--latency-prompt", "8", "--latency-tokens", "2",
                 "--latency-rounds", "1", "--output-dir", str(tmp_path / "cli"), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| quant-int8-weight-only |" in printed and "report.png" in printed


@pytest.mark.parametrize("kw, field", [
    ({}, "prune"),
    ({"quant": "int3"}, "quant"),
    ({"prune": 1.5}, "prune"),
    ({"prune": 0.0}, "prune"),
    ({"prune": 0.3, "prune_method": "random"}, "prune_method"),
    ({"prune": 0.3, "prune_targets": "mlp,experts"}, "prune_targets"),
    ({"distill": True, "temperature": 0.0}, "temperature"),
    ({"quant": "int8", "calibration_batches": 0}, "calibration_batches"),
])
def test_bad_settings_name_the_field(kw, field):
    with pytest.raises(ConfigError) as info:
        CompressConfig(**kw)
    assert info.value.field == field


def test_missing_default_model_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="seekdeep train"):
        compress(CompressConfig(quant="int8", progress=False, output_dir=str(tmp_path / "o")))
