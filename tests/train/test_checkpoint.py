"""Checkpoints: exact resume, pruning, corruption detection and crash safety."""

import random
import shutil

import numpy as np
import pytest
import torch

import seekdeep
from seekdeep.errors import CheckpointError, ConfigError
from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM
from seekdeep.optim import MixedPrecisionOptimizer
from seekdeep.train import (
    DynamicLossScaler,
    latest_checkpoint,
    load_checkpoint,
    make_scheduler,
    param_groups,
    save_checkpoint,
)
from seekdeep.train import checkpoint as ckpt_module

VOCAB = 96


class Run:
    """A tiny fp32 training run whose batches come from the global torch RNG, so resuming
    exactly needs the weights, the optimizer, the scheduler, the scaler and the RNG."""

    def __init__(self, seed: int = 0, tie: bool = True):
        torch.manual_seed(seed)
        self.model = LlamaForCausalLM(LlamaConfig.from_name("tiny", vocab_size=VOCAB, tie_word_embeddings=tie))
        self.model.init_weights()
        self.optimizer = torch.optim.AdamW(param_groups(self.model, 0.1), lr=2e-3)
        self.scheduler = make_scheduler(self.optimizer, warmup=2, total=10)
        self.scaler = DynamicLossScaler(init_scale=256.0, growth_interval=2)

    def train(self, steps: int) -> list[float]:
        losses = []
        for _ in range(steps):
            ids = torch.randint(0, VOCAB, (2, 16))
            self.optimizer.zero_grad()
            loss = self.model(ids, labels=ids).loss
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            losses.append(loss.item())
        return losses

    def save(self, run_dir, step, **kwargs):
        return save_checkpoint(run_dir, step, self.model, self.optimizer, self.scheduler, self.scaler, **kwargs)

    def load(self, path):
        return load_checkpoint(path, self.model, self.optimizer, self.scheduler, self.scaler)


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    run = Run()
    run.train(3)
    path = run.save(tmp_path, 3, data_state={"epoch": 0, "offset": (3, 7), "perm": torch.arange(5)}, extra={"note": "x"})
    py_next, np_next = random.random(), np.random.rand()
    losses = run.train(3)

    torch.manual_seed(1234)  # a different RNG position and different initial weights
    random.seed(5)
    np.random.seed(5)
    fresh = Run(seed=99)
    state = fresh.load(tmp_path)  # the run directory resolves to its latest checkpoint
    assert state.path == path and state.step == 3
    assert state.data_state["offset"] == (3, 7) and torch.equal(state.data_state["perm"], torch.arange(5))
    assert state.extra == {"note": "x"}
    assert (random.random(), np.random.rand()) == (py_next, np_next)
    resumed = fresh.train(3)
    assert resumed == losses
    for a, b in zip(run.model.parameters(), fresh.model.parameters()):
        assert torch.equal(a, b)
    assert fresh.scaler.scale_value == run.scaler.scale_value
    assert fresh.scheduler.get_last_lr() == run.scheduler.get_last_lr()
    assert fresh.model.lm_head.weight is fresh.model.model.embed_tokens.weight


def test_checkpoint_opens_with_automodel(tmp_path):
    run = Run(tie=False)
    path = run.save(tmp_path, 1)
    loaded = seekdeep.AutoModel.from_pretrained(path)
    for (name, a), b in zip(run.model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_mixed_precision_optimizer_resumes_exactly(tmp_path):
    def build(seed):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig.from_name("tiny", vocab_size=VOCAB)).to(torch.bfloat16)
        model.init_weights()
        return model, MixedPrecisionOptimizer(model.parameters(), lr=3e-3)

    def train(model, opt, steps):
        out = []
        for _ in range(steps):
            ids = torch.randint(0, VOCAB, (2, 16))
            opt.zero_grad()
            loss = model(ids, labels=ids).loss
            opt.backward(loss)
            opt.step()
            out.append(loss.item())
        return out

    model, opt = build(0)
    train(model, opt, 2)
    save_checkpoint(tmp_path, 2, model, opt)
    losses = train(model, opt, 2)
    model2, opt2 = build(1)
    load_checkpoint(tmp_path, model2, opt2)
    assert train(model2, opt2, 2) == losses
    for a, b in zip(opt.master_params, opt2.master_params):
        assert torch.equal(a, b)


def test_keep_last_prunes_old_checkpoints(tmp_path):
    run = Run()
    for step in range(1, 6):
        run.save(tmp_path, step, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000004", "checkpoint-00000005"]
    run.save(tmp_path, 5, keep_last=2)  # re-saving a step replaces it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000004", "checkpoint-00000005"]
    # resuming from an older checkpoint and saving: the new one is kept even if a higher step exists
    path = run.save(tmp_path, 3, keep_last=1)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    with pytest.raises(ConfigError) as err:
        run.save(tmp_path, 6, keep_last=0)
    assert err.value.field == "keep_last"


def test_manifest_lists_every_file_with_size_and_hash(tmp_path):
    path = Run().save(tmp_path, 7)
    manifest = seekdeep.files.read_json(path / "manifest.json")
    on_disk = {p.name for p in path.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    assert {"model.safetensors", "config.json", "training_state.pt"} <= on_disk
    for name, info in manifest["files"].items():
        assert (path / name).stat().st_size == info["bytes"] and len(info["sha256"]) == 64


def test_truncated_safetensors_is_reported(tmp_path):
    run = Run()
    run.save(tmp_path, 1)
    path = run.save(tmp_path, 2)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert latest_checkpoint(tmp_path) == path  # still looks complete from outside...
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        Run().load(tmp_path)  # ...but loading refuses it and does not fall back silently


def test_flipped_byte_in_training_state_is_reported(tmp_path):
    path = Run().save(tmp_path, 1)
    state = path / "training_state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0x01
    state.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"training_state\.pt.*sha256"):
        Run().load(path)


def test_missing_file_and_missing_manifest(tmp_path):
    run = Run()
    first = run.save(tmp_path, 1)
    second = run.save(tmp_path, 2)
    (second / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json.*missing"):
        run.load(second)
    (second / "manifest.json").unlink()
    assert latest_checkpoint(tmp_path) == first
    with pytest.raises(CheckpointError, match="manifest.json"):
        run.load(second)
    assert run.load(tmp_path).step == 1


def test_leftover_temp_dir_is_ignored_and_cleaned(tmp_path):
    run = Run()
    first = run.save(tmp_path, 1)
    stale = tmp_path / ".checkpoint-00000009.tmp-424242"
    shutil.copytree(first, stale)  # even a complete-looking temp dir is not a checkpoint
    assert latest_checkpoint(tmp_path) == first
    assert run.load(tmp_path).step == 1
    run.save(tmp_path, 2)
    assert not stale.exists()


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(tmp_path, None)
    (tmp_path / "checkpoint-00000001").mkdir()
    with pytest.raises(CheckpointError, match="lack manifest.json"):
        load_checkpoint(tmp_path, None)
    with pytest.raises(CheckpointError, match="no such directory"):
        load_checkpoint(tmp_path / "nope", None)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        load_checkpoint(tmp_path / "file.txt", None)
    assert latest_checkpoint(tmp_path / "nope") is None


def test_crash_mid_save_leaves_no_checkpoint(tmp_path, monkeypatch):
    run = Run()
    first = run.save(tmp_path, 1)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    # the model files are written, then writing training_state.pt fails
    monkeypatch.setattr(ckpt_module.torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        run.save(tmp_path, 2)
    assert [p.name for p in tmp_path.iterdir()] == [first.name]

    # a hard crash (no cleanup runs) while writing the manifest: only a hidden temp dir remains
    monkeypatch.undo()
    monkeypatch.setattr(ckpt_module, "write_json_atomic", boom)
    monkeypatch.setattr(ckpt_module.shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(OSError):
        run.save(tmp_path, 3)
    monkeypatch.undo()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".checkpoint-00000003.tmp-")]
    assert len(leftovers) == 1 and (leftovers[0] / "training_state.pt").is_file()
    assert latest_checkpoint(tmp_path) == first
    assert run.load(tmp_path).step == 1
    run.save(tmp_path, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000001", "checkpoint-00000004"]


class _CustomDict(dict):
    """torch.load(weights_only=True) refuses unknown classes; JSON stores it as a dict."""


def test_user_state_json_fallback_and_refusal(tmp_path):
    run = Run()
    run.save(tmp_path, 1, data_state={"shard": _CustomDict(index=3)})
    assert run.load(tmp_path).data_state == {"shard": {"index": 3}}
    with pytest.raises(ConfigError) as err:
        run.save(tmp_path, 2, extra={"fn": object()})
    assert err.value.field == "extra"
    assert latest_checkpoint(tmp_path).name == "checkpoint-00000001"


def test_missing_state_for_a_given_object(tmp_path):
    run = Run()
    path = save_checkpoint(tmp_path, 1, run.model)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_checkpoint(path, run.model, run.optimizer)
    assert load_checkpoint(path, run.model).step == 1


def test_model_shape_mismatch_is_a_checkpoint_error(tmp_path):
    path = Run().save(tmp_path, 1)
    other = LlamaForCausalLM(LlamaConfig.from_name("tiny", vocab_size=VOCAB * 2, tie_word_embeddings=True))
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(path, other)


def test_resumed_config_keeps_identity_and_refuses_another_recipes_checkpoint(tmp_path):
    from seekdeep.recipes.distill import DistillRunConfig
    from seekdeep.train import resumed_config

    model = LlamaForCausalLM(LlamaConfig.from_name("tiny", vocab_size=VOCAB))
    saved = DistillRunConfig(temperature=3.0, steps=10, output_dir="a", overwrite=True)
    path = save_checkpoint(tmp_path, 1, model, extra={"config": {**vars(saved), "gone_field": 1}})
    current = DistillRunConfig(temperature=1.0, steps=40, output_dir="b", overwrite=True)
    cfg = resumed_config(path, current, command="distill", marker="temperature")
    # identity from the checkpoint (an unknown old field dropped), budget and output from the command line
    assert (cfg.temperature, cfg.steps, cfg.output_dir, cfg.overwrite) == (3.0, 40, "b", False)
    with pytest.raises(CheckpointError, match="not a `seekdeep sft` checkpoint"):
        resumed_config(path, current, command="sft", marker="max_body_lines")
    bare = save_checkpoint(tmp_path / "bare", 1, model)
    with pytest.raises(CheckpointError, match="not a `seekdeep distill` checkpoint"):
        resumed_config(bare, current, command="distill")
