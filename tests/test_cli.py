from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from seekdeep.cli import main, make_default_model


def _run(args, env_extra=None, cwd=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "seekdeep.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=cwd)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("default-model")
    make_default_model(path)
    return path


def test_generate_greedy_matches_library_call(model_dir, capsys):
    from seekdeep import AutoModel, AutoTokenizer

    assert main(["generate", str(model_dir), "--prompt", "import os\n", "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    model, tok = AutoModel.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor([tok.encode("import os\n")])
    expected = tok.decode(model.generate(ids, max_new_tokens=12)[0].tolist(), skip_special_tokens=True)
    assert printed == expected


def test_stream_prints_the_same_text_as_non_stream(model_dir, capsys):
    args = ["generate", str(model_dir), "--prompt", "class A:\n", "--max-new-tokens", "10", "--temperature", "0.8", "--seed", "3"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--stream"]) == 0
    streamed = capsys.readouterr().out
    assert streamed == plain


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    # the flag reaches GenerationConfig unchanged and is refused there, before the model path is looked at
    assert main(["generate", "x", "--top-p", "2"]) == 2
    assert "--top-p: must be in (0, 1]" in capsys.readouterr().err


@pytest.mark.slow
def test_main_job_creates_the_default_model_and_generates(tmp_path):
    result = _run(["generate", "--max-new-tokens", "8"], {"SEEKDEEP_HOME": str(tmp_path)}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "default-model" / "config.json").is_file()
    assert (tmp_path / "default-model" / "tokenizer.json").is_file()
    assert result.stdout.startswith("def fibonacci(n):")
    assert "8 tokens" in result.stderr
