"""`seekdeep finetune --task classification`: a labelled JSONL trains a score head (full or LoRA
with the head trained in full), held-out accuracy before / after, the classifier saved in
transformers' layout (loadable, explainable), --grad-flow records; bad settings are refused."""

from __future__ import annotations

import json
import random

import pytest
import torch

import seekdeep
from seekdeep.errors import ConfigError
from seekdeep.recipes.finetune import FinetuneConfig, finetune

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """Base LM + a JSONL where the label is which of two keywords the text ends with."""
    from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM
    from seekdeep.tokenizer import train_tokenizer

    rng = random.Random(0)
    rows = []
    for i in range(160):
        label = ["bad", "good"][i % 2]
        words = [rng.choice(WORDS) for _ in range(rng.randrange(3, 9))]
        rows.append({"text": " ".join(words + ["fine" if label == "good" else "awful"]), "label": label})
    root = tmp_path_factory.mktemp("clf-task")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = train_tokenizer(iter([r["text"] for r in rows] * 3), vocab_size=300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, bos_token_id=None,
                                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    model.init_weights()
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    return root / "base", data


def _cfg(base, data, out, **kw):
    args = dict(base=str(base), data=str(data), task="classification", seq_len=32, batch_size=16, steps=30,
                eval_interval=100, checkpoint_interval=100, warmup_steps=2, output_dir=str(out), progress=False)
    args.update(kw)
    return FinetuneConfig(**args)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_classification_trains_saves_and_explains(task, tmp_path, method):
    base, data = task
    lora = "r=4,alpha=8,targets=all-linear"
    summary = finetune(_cfg(base, data, tmp_path / method, method=method, lr=1e-2 if method == "full" else 3e-2,
                            lora=lora, grad_flow=True))
    assert summary["heldout_examples"] == 16 and summary["train_examples"] == 144
    assert summary["accuracy_after"] >= 0.9 > summary["accuracy_before"] - 0.2
    assert summary["labels"] == {0: "bad", 1: "good"}
    clf = seekdeep.AutoModelForSequenceClassification.from_pretrained(summary["model_dir"])
    tok = seekdeep.AutoTokenizer.from_pretrained(summary["model_dir"])
    assert clf.id2label == {0: "bad", 1: "good"} and "lm_head.weight" not in clf.state_dict()
    with torch.no_grad():
        logits = clf(**tok(["alpha beta fine", "gamma awful"], padding=True, return_tensors="pt")).logits
    assert logits.argmax(-1).tolist() == [1, 0]
    if method == "lora":
        assert (tmp_path / method / "adapter" / "adapter_config.json").is_file()
        assert "score" in json.loads((tmp_path / method / "adapter" / "adapter_config.json").read_text())["modules_to_save"]
    flow = json.loads((tmp_path / method / "grad_flow.json").read_text())
    assert flow["history"] and "score" in flow["history"][0]["grad_norm"]
    assert (tmp_path / method / "grad_flow.png").is_file()
    from seekdeep.explain import explain

    exp = explain(clf, "alpha beta fine", tok, method="ablation", progress=False)
    assert exp.data[0][int(exp.values[0].argmax())].strip() == "fine"


def test_classification_config_errors(task, tmp_path):
    base, data = task
    with pytest.raises(ConfigError, match="task"):
        _cfg(base, data, tmp_path, task="ranking")
    with pytest.raises(ConfigError, match="data"):
        FinetuneConfig(base=str(base), task="classification")
    with pytest.raises(ConfigError, match="method"):
        _cfg(base, data, tmp_path, method="prompt")


def test_train_grad_flow_records_every_layer(corpus, tmp_path):
    from seekdeep.recipes.train import TrainConfig, train

    summary = train(TrainConfig(data=str(corpus), vocab_size=300, seq_len=32, batch_size=4, steps=4, eval_interval=4,
                                eval_batches=1, checkpoint_interval=4, warmup_steps=1, sample_tokens=2,
                                output_dir=str(tmp_path / "run"), progress=False, grad_flow=True))
    flow = json.loads((tmp_path / "run" / "grad_flow.json").read_text())
    assert summary["grad_flow"]["png"].endswith("grad_flow.png") and [r["step"] for r in flow["history"]] == [1]
    assert {"embed_tokens", "layers.00", "layers.01", "norm"} <= set(flow["history"][0]["grad_norm"])
    with pytest.raises(ConfigError, match="grad_flow"):
        train(TrainConfig(data=str(corpus), output_dir=str(tmp_path / "p"), parallel="dp_shard=2", grad_flow=True))
