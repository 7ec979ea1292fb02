"""End-to-end runs of the fine-tuning recipe on a tiny base and a tiny slice of the standard library."""

from __future__ import annotations

import json

import pytest
import torch

import seekdeep
from seekdeep.cli import main
from seekdeep.errors import ConfigError
from seekdeep.recipes.finetune import FinetuneConfig, finetune


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpus):
    from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM
    from seekdeep.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(sorted(str(p) for p in corpus.iterdir())[:4], vocab_size=320)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, bos_token_id=None,
                                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True))
    model.init_weights()
    path = tmp_path_factory.mktemp("ft-base")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _cfg(base, out, **kw):
    args = dict(base=str(base), seq_len=32, batch_size=4, steps=6, eval_interval=3, eval_batches=2,
                checkpoint_interval=3, lr=1e-2, warmup_steps=1, output_dir=str(out), progress=False,
                lora="r=4,alpha=8,targets=all-linear")
    args.update(kw)
    return FinetuneConfig(**args)


@pytest.mark.slow
def test_lora_run_improves_and_saves_only_the_adapter(base, corpus, tmp_path):
    s = finetune(_cfg(base, tmp_path / "run", data=str(corpus)))
    assert s["steps"] == 6 and s["ppl_after"] < s["ppl_before"]
    assert 0 < s["trainable_percent"] < 100
    adapter = tmp_path / "run" / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(base)
    checkpoints = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["checkpoint-00000003", "checkpoint-00000006"]
    assert not list(checkpoints[-1].glob("model*.safetensors"))  # the adapter, not the model
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [3, 6]
    assert (tmp_path / "run" / "loss.png").is_file()
    # the saved adapter on a fresh base reproduces the final held-out loss
    model = seekdeep.AutoModel.from_pretrained(base)
    model.load_adapter(adapter)
    from seekdeep.data import TokenWindows
    from seekdeep.recipes.finetune import prepare_finetune_data
    from seekdeep.recipes.train import evaluate
    from seekdeep.train import PrecisionPolicy

    _, heldout, _ = prepare_finetune_data(_cfg(base, tmp_path, data=str(corpus)), seekdeep.AutoTokenizer.from_pretrained(base))
    loss = evaluate(model, TokenWindows(heldout, 32, 4, shuffle=False), 2, PrecisionPolicy())
    assert loss == pytest.approx(s["loss_after"], abs=1e-5)


@pytest.mark.slow
def test_resume_continues_the_same_run(base, corpus, tmp_path):
    import shutil

    whole = finetune(_cfg(base, tmp_path / "whole", data=str(corpus)))
    # as if the run had stopped after its step-3 checkpoint
    shutil.copytree(tmp_path / "whole" / "checkpoints" / "checkpoint-00000003",
                    tmp_path / "split" / "checkpoints" / "checkpoint-00000003")
    resumed = finetune(_cfg(base, tmp_path / "split", data=str(corpus), resume="auto"))
    assert resumed["steps"] == 6
    assert resumed["loss_after"] == pytest.approx(whole["loss_after"], abs=1e-4)


@pytest.mark.parametrize("method", ["bottleneck", "prompt", "full"])
def test_other_methods(base, corpus, tmp_path, method):
    s = finetune(_cfg(base, tmp_path, data=str(corpus), method=method, steps=3, lr=None))
    assert s["ppl_after"] < s["ppl_before"]
    if method == "full":
        assert s["trainable_percent"] == 100 and (tmp_path / "final" / "config.json").is_file()
    else:
        assert s["trainable_percent"] < 30 and (tmp_path / "adapter" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_package_mode_and_merge(base, tmp_path):
    s = finetune(_cfg(base, tmp_path, package="json", steps=3, merge=True))
    assert s["package"] == "json" and s["modules"] >= 4 and s["heldout_tokens"] < s["train_tokens"]
    from seekdeep.data import package_files
    from seekdeep.recipes.finetune import package_split

    train, heldout = package_split("json")
    files = [p.read_text(encoding="utf-8") for p in package_files("json")]
    assert [a + b for a, b in zip(train, heldout)] == files  # disjoint, and nothing lost
    merged = seekdeep.AutoModel.from_pretrained(tmp_path / "merged")
    adapted = seekdeep.AutoModel.from_pretrained(base)
    adapted.load_adapter(tmp_path / "adapter")
    ids = torch.randint(0, merged.config.vocab_size, (1, 16))
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-4)


def test_head_lora_bias_adapter_trains_saves_and_refuses_merge_before_training(base, corpus, tmp_path):
    spec = "r=2,alpha=4,targets=q_proj,v_proj,lm_head,r.lm_head=1,lora_bias"
    s = finetune(_cfg(base, tmp_path / "a", data=str(corpus), steps=3, lora=spec))
    saved = json.loads((tmp_path / "a" / "adapter" / "adapter_config.json").read_text())
    assert saved["lora_bias"] is True and saved["rank_pattern"] == {"lm_head": 1}
    adapted = seekdeep.AutoModel.from_pretrained(base)
    adapted.load_adapter(tmp_path / "a" / "adapter")
    head = dict(adapted._tuner_layers())["lm_head"]
    assert head.lora_A["default"].weight.shape[0] == 1 and torch.count_nonzero(head.lora_B["default"].bias) > 0
    assert s["ppl_after"] < s["ppl_before"]
    with pytest.raises(ConfigError) as info:
        finetune(_cfg(base, tmp_path / "b", data=str(corpus), steps=3, lora=spec, merge=True))
    assert info.value.field == "merge" and "has no bias" in str(info.value) and "q_proj" in str(info.value)
    assert not (tmp_path / "b" / "adapter").exists()  # refused before any training


def test_cli(base, corpus, tmp_path, capsys):
    argv = ["finetune", str(base), "--data", str(corpus), "--steps", "2", "--seq-len", "32", "--batch-size", "2",
            "--eval-batches", "1", "--no-progress", "--output-dir", str(tmp_path), "--lora", "r=2,alpha=4,targets=q_proj,v_proj,dora"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "held-out perplexity" in out and "before" in out
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
    assert main(["finetune", str(base), "--data", str(corpus), "--lora", "r=0"]) == 2
    assert "rank" in capsys.readouterr().err
    assert main(["finetune", str(base), "--method", "ia3"]) == 2


def test_config_errors():
    with pytest.raises(ConfigError, match="method"):
        FinetuneConfig(method="qlora")
    with pytest.raises(ConfigError, match="package"):
        FinetuneConfig(data="x", package="json")
    with pytest.raises(ConfigError, match="merge"):
        FinetuneConfig(method="prompt", merge=True)
    with pytest.raises(ConfigError, match="steps"):
        FinetuneConfig(steps=0)
