"""The run-directory rule, for every recipe: a finished run is never overwritten unless asked
(--overwrite), an unfinished one is resumable (--resume auto), and the refusal names the
directory and the ways on."""

from __future__ import annotations

import argparse
import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from seekdeep.cli import main
from seekdeep.train import RunDirectoryError, prepare_run_dir, publish_dir


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpus):
    from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM
    from seekdeep.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(sorted(str(p) for p in corpus.iterdir())[:4], vocab_size=320)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=128,
                                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                                         tie_word_embeddings=True))
    model.init_weights()
    path = tmp_path_factory.mktemp("rundir-base")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _run(recipe: str, base: Path, corpus: Path, out: Path, **kw):
    """One tiny run of ``recipe`` into ``out``; returns the file that holds its final model."""
    common = dict(output_dir=str(out), progress=False, seed=0)
    if recipe == "train":
        from seekdeep.recipes.train import TrainConfig, train

        args = dict(data=str(corpus), vocab_size=320, seq_len=32, batch_size=2, steps=2, eval_interval=2,
                    eval_batches=1, checkpoint_interval=1, topk=8, sample_tokens=2)
        train(TrainConfig(**{**args, **common, **kw}))
        return out / "final" / "model.safetensors"
    if recipe == "finetune":
        from seekdeep.recipes.finetune import FinetuneConfig, finetune

        args = dict(base=str(base), data=str(corpus), seq_len=32, batch_size=2, steps=2, eval_interval=2,
                    eval_batches=1, checkpoint_interval=1, lora="r=2,alpha=4,targets=q_proj")
        finetune(FinetuneConfig(**{**args, **common, **kw}))
        return out / "adapter" / "adapter_model.safetensors"
    if recipe == "distill":
        from seekdeep.recipes.distill import DistillRunConfig, distill

        args = dict(teacher=str(base), data=str(corpus), seq_len=32, batch_size=2, steps=2, eval_interval=2,
                    eval_batches=1, checkpoint_interval=1)
        distill(DistillRunConfig(**{**args, **common, **kw}))
        return out / "final" / "model.safetensors"
    from seekdeep.recipes.compress import CompressConfig, compress

    args = dict(model=str(base), data=str(corpus), quant="int8-dynamic", seq_len=32, batch_size=2, eval_batches=1,
                calibration_batches=1, latency_prompt=4, latency_tokens=2, latency_rounds=1)
    compress(CompressConfig(**{**args, **common, **kw}))
    return out / "report.json"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["train", "finetune", "distill", "compress"])
def test_a_finished_run_is_refused_then_replaced_only_with_overwrite(recipe, base, corpus, tmp_path):
    out = tmp_path / recipe
    artefact = _run(recipe, base, corpus, out)
    before = _digest(artefact)
    listing = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))

    with pytest.raises(RunDirectoryError) as err:
        _run(recipe, base, corpus, out, seed=1)
    message = str(err.value)
    assert str(out) in message and "--output-dir" in message and "--overwrite" in message
    assert ("--resume auto" in message) == (recipe != "compress")  # compress cannot resume
    assert _digest(artefact) == before  # nothing was touched
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == listing

    _run(recipe, base, corpus, out, seed=1, overwrite=True)
    assert artefact.is_file()
    if recipe != "compress":  # a different seed: a different model (compress's report also changes, by time)
        assert _digest(artefact) != before
        assert not any(p.name.startswith(".") for p in out.iterdir())  # no temp or old directories left


@pytest.mark.slow
def test_an_unfinished_train_run_resumes_and_a_plain_rerun_is_refused(base, corpus, tmp_path):
    out = tmp_path / "train"
    _run("train", base, corpus, out)
    (out / "summary.json").unlink()  # as if the process died after its last checkpoint
    shutil.rmtree(out / "final")
    with pytest.raises(RunDirectoryError, match="unfinished run.*--resume auto"):
        _run("train", base, corpus, out)
    _run("train", base, corpus, out, resume="auto", steps=3)
    assert (out / "summary.json").is_file() and (out / "final" / "config.json").is_file()


def test_cli_refuses_a_second_train_run_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "train" / "final").mkdir(parents=True)
    (tmp_path / "runs" / "train" / "summary.json").write_text("{}")
    assert main(["train", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("seekdeep train: error: --output-dir: runs/train")
    assert "--overwrite" in err and "--resume auto" in err
    assert main(["train", "--steps", "1", "--overwrite", "--resume", "auto"]) == 2
    assert "--overwrite: cannot be combined with --resume" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "runs" / "train").iterdir()) == ["final", "summary.json"]


def test_prepare_run_dir_states(tmp_path):
    fresh = tmp_path / "fresh"
    assert prepare_run_dir(fresh, command="train") == fresh and fresh.is_dir()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(RunDirectoryError, match="not a `seekdeep train` run"):
        prepare_run_dir(other, command="train")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(RunDirectoryError, match="is a file"):
        prepare_run_dir(a_file, command="train", overwrite=True)
    # --overwrite drops the old checkpoints (a later --resume auto must not find them) but keeps the final model
    run = tmp_path / "run"
    (run / "checkpoints" / "checkpoint-00000001").mkdir(parents=True)
    (run / "final").mkdir()
    (run / "summary.json").write_text("{}")
    prepare_run_dir(run, command="train", overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["final"]


def test_publish_dir_keeps_the_old_directory_when_writing_fails(tmp_path):
    final = tmp_path / "final"
    publish_dir(final, lambda tmp: (tmp / "a.txt").write_text("old"))

    def broken(tmp: Path) -> None:
        (tmp / "a.txt").write_text("new, half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        publish_dir(final, broken)
    assert (final / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # the temp directory is gone
    publish_dir(final, lambda tmp: (tmp / "b.txt").write_text("new"))
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]


#: commands with an --output-dir that hold measurements re-taken on every run, not finished work
REMEASURED = {"profile"}


def _recipe_commands() -> dict[str, argparse.ArgumentParser]:
    from seekdeep.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    return {name: p for name, p in sub.items()
            if any("--output-dir" in a.option_strings for a in p._actions) and name not in REMEASURED}


def test_every_command_that_writes_a_run_has_overwrite():
    commands = _recipe_commands()
    assert {"train", "finetune", "distill", "compress"} <= set(commands)
    for name, parser in commands.items():
        assert any("--overwrite" in a.option_strings for a in parser._actions), f"`seekdeep {name}` lacks --overwrite"


@pytest.mark.parametrize("command", sorted(_recipe_commands()))
def test_every_recipe_refuses_a_finished_run_before_starting(command, base, tmp_path, capsys, monkeypatch):
    """The refusal comes first: no model is loaded, no data read, nothing written (cheap for
    every recipe, including the federated and multimodal ones)."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "done"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    argv = [command, "--output-dir", str(out)]
    if command == "compress":
        argv += [str(base), "--quant", "int8-dynamic"]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--output-dir: {out} already holds a finished run" in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
