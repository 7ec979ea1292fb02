"""End-to-end runs of the training recipe on a tiny slice of the standard library."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import seekdeep
from seekdeep.data.corpus import stdlib_root
from seekdeep.errors import CheckpointError, ConfigError
from seekdeep.recipes.train import TrainConfig, train

SMALL = ["json/__init__.py", "json/decoder.py", "json/encoder.py", "json/scanner.py", "textwrap.py", "string.py",
         "bisect.py", "heapq.py", "pprint.py", "calendar.py", "shlex.py", "fnmatch.py"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for rel in SMALL:
        src = stdlib_root() / rel
        (root / rel.replace("/", "_")).write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
    return root


def _args(corpus, out, **kw):
    base = dict(data=str(corpus), vocab_size=400, seq_len=64, batch_size=4, steps=12, eval_interval=4, eval_batches=2,
                checkpoint_interval=3, topk=16, indexer_warmup_steps=2, output_dir=str(out), progress=False,
                sample_tokens=8)
    base.update(kw)
    return base


def _cli(args: dict) -> list[str]:
    argv = [sys.executable, "-m", "seekdeep.cli", "train"]
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            argv += [flag, str(value)]
    return argv


def _train_losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["indexer_loss"]) for r in rows if r["kind"] == "train"}


def test_run_produces_a_loadable_model_and_learns(corpus, tmp_path):
    summary = train(TrainConfig(**_args(corpus, tmp_path / "run", steps=16)))
    losses = _train_losses(tmp_path / "run")
    assert sorted(losses) == list(range(1, 17))
    assert losses[16][0] < losses[1][0] - 0.5  # it learns
    phases = [json.loads(x)["phase"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert phases[0] == "dense" and "indexer_warmup" in phases and phases[-1] == "sparse"
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    final = Path(summary["model_dir"])
    model = seekdeep.AutoModel.from_pretrained(final)
    tok = seekdeep.AutoTokenizer.from_pretrained(final)
    assert model.config.attention_backend == "dsa"
    ids = torch.tensor([tok.encode("def f(x):\n    return x")])
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert torch.isfinite(loss)
    assert summary["heldout_ppl"] == pytest.approx(torch.exp(torch.tensor(summary["heldout_loss"])).item(), rel=1e-5)
    assert len(list((tmp_path / "run" / "checkpoints").iterdir())) == 2  # keep_last


def test_indexer_warmup_changes_only_the_indexer(corpus, tmp_path):
    from seekdeep.data import prepare_data
    from seekdeep.recipes.train import apply_phase, build_model

    cfg = TrainConfig(**_args(corpus, tmp_path))
    data = prepare_data(cfg.data, vocab_size=cfg.vocab_size, seq_len=cfg.seq_len, progress=False)
    model = build_model(cfg, data.tokenizer, torch.device("cpu"))
    apply_phase(model, "indexer_warmup")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".inner.index" in n for n in trainable)
    apply_phase(model, "sparse")
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.slow
def test_kill_and_resume_gives_the_same_losses(corpus, tmp_path):
    full = tmp_path / "full"
    subprocess.run(_cli(_args(corpus, full)), check=True, capture_output=True, timeout=600)
    reference = _train_losses(full)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(_args(corpus, killed)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = killed / "checkpoints" / "checkpoint-00000006"
    deadline = time.time() + 300
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert target.exists(), proc.stderr.read().decode()
    assert not (killed / "final").exists()  # it really died mid-run

    resumed = subprocess.run(_cli(_args(corpus, killed, resume="auto")), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    assert _train_losses(killed) == reference  # bit-exact on CPU fp32, step by step


def test_bad_inputs_are_specific(corpus, tmp_path):
    with pytest.raises(ConfigError, match="seq_len"):
        train(TrainConfig(**_args(corpus, tmp_path / "a", seq_len=100_000)))
    with pytest.raises(ConfigError, match="preset"):
        TrainConfig(preset="huge")
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig(precision="fp8")
    not_a_ckpt = tmp_path / "nope"
    not_a_ckpt.mkdir()
    with pytest.raises(CheckpointError):
        train(TrainConfig(**_args(corpus, tmp_path / "b", resume=str(not_a_ckpt))))
    assert not (tmp_path / "b" / "final").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(seekdeep.SeekdeepError, match="empty"):
        train(TrainConfig(**_args(empty, tmp_path / "c")))
