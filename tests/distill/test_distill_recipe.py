"""End-to-end runs of the distillation recipe on a tiny teacher and a tiny slice of the standard library."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import seekdeep
from seekdeep.cli import build_parser, main
from seekdeep.data.corpus import stdlib_root
from seekdeep.errors import ConfigError
from seekdeep.recipes.distill import DistillRunConfig, distill

FILES = ["textwrap.py", "string.py", "bisect.py", "heapq.py", "pprint.py", "shlex.py", "fnmatch.py", "calendar.py"]


@pytest.fixture(autouse=True)
def _home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SEEKDEEP_HOME", str(tmp_path_factory.getbasetemp() / "seekdeep-home"))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the models here are tiny: extra threads only add synchronisation, which dominates on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("kd-corpus")
    for i in range(3):  # more documents than the every-20th hold-out rule needs
        for name in FILES:
            (root / f"{i}_{name}").write_text((stdlib_root() / name).read_text(encoding="utf-8"), encoding="utf-8")
    return root


def _teacher(path, corpus, train_steps: int, **config):
    """A 4-layer teacher, trained for a few steps on the corpus so that it knows something."""
    from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM
    from seekdeep.tokenizer import train_tokenizer

    files = sorted(corpus.iterdir())
    tokenizer = train_tokenizer([str(p) for p in files[:4]], vocab_size=320)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=4, num_attention_heads=2, bos_token_id=None,
                                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True, **config))
    model.init_weights()
    ids = torch.tensor(tokenizer.encode("\n".join(p.read_text() for p in files[:8]), add_special_tokens=False))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(train_steps):
        starts = torch.randint(0, len(ids) - 33, (8,), generator=generator)
        batch = torch.stack([ids[s:s + 32] for s in starts.tolist()])
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, corpus):
    return _teacher(tmp_path_factory.mktemp("kd-teacher"), corpus, train_steps=40)


def _cfg(teacher, out, **kw):
    args = dict(teacher=str(teacher), seq_len=32, batch_size=4, steps=8, eval_interval=4, eval_batches=2,
                checkpoint_interval=4, lr=1e-2, warmup_steps=1, output_dir=str(out), progress=False)
    args.update(kw)
    return DistillRunConfig(**args)


def test_distillation_improves_the_student_and_saves_it(teacher, corpus, tmp_path):
    s = distill(_cfg(teacher, tmp_path / "run", data=str(corpus)))
    assert s["steps"] == 8 and s["layers"] == [0, 2] and s["student_layers"] == 2 and s["teacher_layers"] == 4
    assert s["student_loss"] < s["student_init_loss"]
    assert s["teacher_ppl"] < s["student_init_ppl"]  # dropping half the layers hurts before distillation
    assert 0.5 < s["parameter_ratio"] < 1
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 4, 8]
    assert [r["eval_loss"] for r in records if r["kind"] == "teacher_eval"] == [s["teacher_loss"]]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 8 and all(r["kl"] >= 0 and r["total"] > 0 for r in train)
    assert [c.name for c in sorted((run / "checkpoints").iterdir())] == ["checkpoint-00000004", "checkpoint-00000008"]
    assert (run / "loss.png").is_file()
    assert json.loads((run / "summary.json").read_text())["student_loss"] == s["student_loss"]
    # the saved student reloads, with the teacher's tokenizer, and reproduces the final held-out loss
    student = seekdeep.AutoModel.from_pretrained(run / "final")
    assert student.config.num_hidden_layers == 2
    tokenizer = seekdeep.AutoTokenizer.from_pretrained(run / "final")
    from seekdeep.data import TokenWindows, tokenizer_fingerprint
    from seekdeep.recipes.distill import prepare_distill_data
    from seekdeep.recipes.train import evaluate
    from seekdeep.train import PrecisionPolicy

    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(seekdeep.AutoTokenizer.from_pretrained(teacher))
    _, heldout, _ = prepare_distill_data(str(corpus), tokenizer, 32)
    loss = evaluate(student, TokenWindows(heldout, 32, 4, shuffle=False), 2, PrecisionPolicy())
    assert loss == pytest.approx(s["student_loss"], abs=1e-5)


@pytest.mark.slow
def test_resume_continues_the_same_run(teacher, corpus, tmp_path):
    whole = distill(_cfg(teacher, tmp_path / "whole", data=str(corpus), steps=6, checkpoint_interval=3, eval_interval=3))
    # as if the run had stopped after its step-3 checkpoint
    shutil.copytree(tmp_path / "whole" / "checkpoints" / "checkpoint-00000003",
                    tmp_path / "split" / "checkpoints" / "checkpoint-00000003")
    resumed = distill(_cfg(teacher, tmp_path / "split", data=str(corpus), steps=6, resume="auto",
                           temperature=9.0))  # the checkpoint's settings win over the new ones
    assert resumed["steps"] == 6 and resumed["config"]["temperature"] == 2.0
    assert resumed["student_loss"] == pytest.approx(whole["student_loss"], abs=1e-5)
    assert resumed["student_init_loss"] == pytest.approx(whole["student_init_loss"], abs=1e-6)
    records = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [4, 5, 6]


@pytest.mark.slow
def test_dsa_teacher_and_the_embedded_corpus(tmp_path, corpus, monkeypatch):
    """With no --data the student learns on the embedded corpus (cut down here) and a dsa
    student trains its indexers with their KL loss."""
    import seekdeep.data

    real = seekdeep.data.default_corpus
    monkeypatch.setattr(seekdeep.data, "default_corpus", lambda *a, **k: real(limit_bytes=400_000))
    dsa = _teacher(tmp_path / "teacher", corpus, train_steps=0, attention_backend="dsa",
                   attention_options={"topk": 8, "index_heads": 2, "index_head_dim": 8})
    s = distill(_cfg(dsa, tmp_path / "run", steps=3, eval_interval=3, checkpoint_interval=3, layers="1,3"))
    assert s["data"].startswith("embedded corpus") and s["heldout_tokens"] > 0 and s["layers"] == [1, 3]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["indexer_loss"] > 0 for r in records if r["kind"] == "train")
    student = seekdeep.AutoModel.from_pretrained(tmp_path / "run" / "final")
    assert student.config.attention_backend == "dsa" and student.config.num_hidden_layers == 2


def test_cli(teacher, corpus, tmp_path, capsys):
    argv = ["distill", str(teacher), "--data", str(corpus), "--layers", "0,3", "--temperature", "3", "--alpha", "0.7",
            "--steps", "2", "--seq-len", "32", "--batch-size", "2", "--eval-batches", "1", "--no-progress",
            "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "teacher" in out and "2 of 4 layers" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["layers"] == [0, 3] and summary["config"]["temperature"] == 3.0 and summary["config"]["alpha"] == 0.7
    for flags, message in ((["--layers", "0,1,2,3"], "fewer layers"), (["--layers", "0,9"], "out of range"),
                           (["--layers", "2,1"], "increasing"), (["--temperature", "0"], "temperature"),
                           (["--alpha", "1.5"], "alpha")):
        assert main(["distill", str(teacher), "--data", str(corpus), "--output-dir", str(tmp_path / "bad"), *flags]) == 2
        assert message in capsys.readouterr().err


def test_cli_parses_and_default_teacher(tmp_path, monkeypatch):
    args = build_parser().parse_args(["distill", "--layers", "every_other", "--steps", "5"])
    assert args.teacher is None and args.layers == "every_other" and args.steps == 5 and args.temperature == 2.0
    monkeypatch.chdir(tmp_path)  # no runs/train/final here
    with pytest.raises(ConfigError, match=r"^teacher: .*runs/train/final"):
        distill(DistillRunConfig(output_dir=str(tmp_path / "out")))


def test_config_errors():
    assert DistillRunConfig(layers=[0, 2]).layers == "0,2"
    with pytest.raises(ConfigError, match="^layers"):
        DistillRunConfig(layers="1,1")
    with pytest.raises(ConfigError, match="^temperature"):
        DistillRunConfig(temperature=-1.0)
    with pytest.raises(ConfigError, match="^alpha"):
        DistillRunConfig(alpha=1.01)
    with pytest.raises(ConfigError, match="^steps"):
        DistillRunConfig(steps=0)
    with pytest.raises(ConfigError, match="^precision"):
        DistillRunConfig(precision="fp8")
