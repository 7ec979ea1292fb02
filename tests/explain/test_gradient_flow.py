"""Gradient-flow diagnostics: per-layer norms that match a hand computation, warnings for layers
whose gradient never arrives / vanishes / explodes, and the recorder's optimizer hooks."""

from __future__ import annotations

import json

import pytest
import torch

from seekdeep.errors import ConfigError
from seekdeep.explain import GradFlowConfig, GradientFlowRecorder, gradient_flow
from seekdeep.explain.gradflow import layer_of

from keyword_models import tiny_config


def _lm(tokenizer):
    from seekdeep.models.llama import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(tokenizer, num_hidden_layers=2))
    model.init_weights()
    return model


def test_layer_grouping():
    assert layer_of("model.layers.3.self_attn.q_proj.base_layer.weight") == "layers.03"
    assert layer_of("model.embed_tokens.weight") == "embed_tokens" and layer_of("score.weight") == "score"


def test_gradient_flow_norms_and_warnings(tokenizer, tmp_path, capsys):
    model = _lm(tokenizer)
    ids = torch.randint(0, tokenizer.vocab_size, (2, 12))
    report = gradient_flow(model, {"input_ids": ids}, plot=tmp_path / "flow.png")
    assert set(report.grad_norms) == {"embed_tokens", "layers.00", "layers.01", "lm_head", "norm"}
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    by_hand = sum(float(p.grad.pow(2).sum()) for n, p in model.named_parameters() if ".layers.1." in n) ** 0.5
    assert report.grad_norms["layers.01"] == pytest.approx(by_hand, rel=1e-4)
    assert report.warnings == [] and (tmp_path / "flow.png").stat().st_size > 1000
    # a block whose output is cut from the graph gets no gradient: named in a warning
    handle = model.model.layers[0].register_forward_hook(lambda m, a, out: out.detach())
    cut = gradient_flow(model, {"input_ids": ids})
    handle.remove()
    assert [(w.layer, w.kind) for w in cut.warnings] == [("embed_tokens", "no gradient"), ("layers.00", "no gradient")]
    assert "layer layers.00: no gradient" in capsys.readouterr().err
    tight = gradient_flow(model, {"input_ids": ids}, GradFlowConfig(vanish=1e3, explode=1e4))
    assert {w.kind for w in tight.warnings} == {"vanishing"}
    with pytest.raises(ConfigError, match="batch"):
        gradient_flow(model, [ids])
    with pytest.raises(ConfigError, match="grad_flow.vanish"):
        GradFlowConfig(vanish=2.0, explode=1.0)


def test_recorder_hooks_record_grad_and_update_norms(tokenizer, tmp_path):
    model = _lm(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    recorder = GradientFlowRecorder(model, optimizer, GradFlowConfig(every=2), log_dir=tmp_path / "tb")
    ids = torch.randint(0, tokenizer.vocab_size, (2, 12))
    for step in range(6):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        if step == 4:  # a recorded step: check its update norm by hand
            before = model.model.layers[1].mlp.up_proj.weight.detach().clone()
            others = [p.detach().clone() for n, p in model.named_parameters() if ".layers.1." in n]
        optimizer.step()
        if step == 4:
            after = [p.detach().clone() for n, p in model.named_parameters() if ".layers.1." in n]
    recorder.close()
    assert [r["step"] for r in recorder.history] == [1, 3, 5]
    by_hand = sum(float((a - b).pow(2).sum()) for a, b in zip(after, others)) ** 0.5
    assert recorder.history[-1]["update_norm"]["layers.01"] == pytest.approx(by_hand, rel=1e-4)
    assert not torch.equal(before, model.model.layers[1].mlp.up_proj.weight)
    paths = recorder.save(tmp_path)
    saved = json.loads((tmp_path / "grad_flow.json").read_text())
    assert len(saved["history"]) == 3 and (tmp_path / "grad_flow.png").stat().st_size > 1000
    assert set(paths) == {"json", "png"}


def _tensorboard_scalars(log_dir) -> dict[str, dict[int, float]]:
    """tag -> {step: value} from every event file under ``log_dir``, read with tensorboard's own loader."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util.tensor_util import make_ndarray

    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(log_dir.rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                # the loader hands scalars over as 0-d tensors (simple_value converted)
                scalars.setdefault(value.tag, {})[event.step] = float(make_ndarray(value.tensor))
    return scalars


def test_recorder_writes_tensorboard_scalars(tokenizer, tmp_path):
    """With tensorboard installed, every recorded step's grad / update norms are in the event file."""
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    model = _lm(tokenizer)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    recorder = GradientFlowRecorder(model, optimizer, GradFlowConfig(every=2), log_dir=tmp_path / "tb")
    ids = torch.randint(0, tokenizer.vocab_size, (2, 12))
    for _ in range(5):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    recorder.close()
    scalars = _tensorboard_scalars(tmp_path / "tb")
    layers = set(recorder.history[0]["grad_norm"])
    assert set(scalars) == {f"{kind}/{layer}" for kind in ("grad_norm", "update_norm") for layer in layers}
    for record in recorder.history:  # steps 1, 3, 5
        for kind in ("grad_norm", "update_norm"):
            for layer, value in record[kind].items():
                assert scalars[f"{kind}/{layer}"][record["step"]] == pytest.approx(value, rel=1e-6)


@pytest.mark.slow
def test_train_grad_flow_writes_tensorboard(tmp_path):
    """`seekdeep train --grad-flow`: the recipe's run_dir/tensorboard holds the per-layer norms
    next to its training metrics."""
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from seekdeep.data.corpus import stdlib_root
    from seekdeep.recipes.train import TrainConfig, train

    data = tmp_path / "data"
    data.mkdir()
    for name in ("textwrap.py", "shlex.py"):
        (data / name).write_text((stdlib_root() / name).read_text(encoding="utf-8"), encoding="utf-8")
    train(TrainConfig(data=str(data), vocab_size=300, seq_len=32, batch_size=4, steps=2, eval_interval=2,
                      eval_batches=1, checkpoint_interval=2, warmup_steps=1, sample_tokens=2,
                      output_dir=str(tmp_path / "run"), progress=False, grad_flow=True))
    flow = json.loads((tmp_path / "run" / "grad_flow.json").read_text())
    scalars = _tensorboard_scalars(tmp_path / "run" / "tensorboard")
    record = flow["history"][0]
    for layer, value in record["grad_norm"].items():
        assert scalars[f"grad_norm/{layer}"][record["step"]] == pytest.approx(value, rel=1e-6)
    assert {f"update_norm/{layer}" for layer in record["update_norm"]} <= set(scalars)
