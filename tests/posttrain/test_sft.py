"""End-to-end `seekdeep sft` on a tiny base: the assistant loss falls, the final model is a
plain HF-layout model, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import seekdeep
from seekdeep.cli import main
from seekdeep.errors import ConfigError
from seekdeep.posttrain.config import SFTConfig
from seekdeep.recipes.sft import sft


def _cfg(base, data, out, **kw):
    args = dict(base=str(base), data=str(data), seq_len=64, batch_size=4, steps=8, eval_interval=4, eval_batches=2,
                checkpoint_interval=4, lr=1e-2, warmup_steps=1, output_dir=str(out), progress=False,
                lora="r=4,alpha=8,targets=all-linear")
    args.update(kw)
    return SFTConfig(**args)


@pytest.mark.slow
def test_sft_lowers_the_assistant_loss_and_publishes_a_servable_model(base, chat_jsonl, tmp_path):
    s = sft(_cfg(base, chat_jsonl, tmp_path / "run", pack=True))  # packed rows (the resume test runs padded)
    assert s["steps"] == 8 and s["heldout_loss_after"] < s["heldout_loss_before"]
    assert s["train"]["examples"] == 38 and s["heldout"]["examples"] == 2
    final = tmp_path / "run" / "final"
    assert (final / "config.json").is_file() and (final / "tokenizer.json").is_file()
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["model_dir"] == str(final)
    # the merged model reproduces the final held-out loss with no adapter code involved
    from seekdeep.posttrain.chat import assistant_loss, eval_batches, render_records
    from seekdeep.recipes.sft import sft_records
    from seekdeep.train import PrecisionPolicy

    model = seekdeep.AutoModel.from_pretrained(final)
    tok = seekdeep.AutoTokenizer.from_pretrained(final)
    _, heldout, _ = sft_records(_cfg(base, chat_jsonl, tmp_path))
    examples, _ = render_records(tok, heldout, 64)
    loss = assistant_loss(model, eval_batches(examples, 4, tok.pad_token_id, 2), PrecisionPolicy())
    assert loss == pytest.approx(s["heldout_loss_after"], abs=1e-4)


@pytest.mark.slow
def test_sft_resume_equals_an_uninterrupted_run(base, chat_jsonl, tmp_path):
    whole = sft(_cfg(base, chat_jsonl, tmp_path / "whole"))
    shutil.copytree(tmp_path / "whole" / "checkpoints" / "checkpoint-00000004",
                    tmp_path / "split" / "checkpoints" / "checkpoint-00000004")
    resumed = sft(_cfg(base, chat_jsonl, tmp_path / "split", resume="auto"))
    assert resumed["steps"] == 8
    assert resumed["heldout_loss_after"] == pytest.approx(whole["heldout_loss_after"], abs=1e-5)
    a = seekdeep.AutoModel.from_pretrained(tmp_path / "whole" / "final").state_dict()
    b = seekdeep.AutoModel.from_pretrained(tmp_path / "split" / "final").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_sft_cli_refuses_bad_input_in_one_line(base, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert main(["sft", str(base), "--data", str(bad), "--output-dir", str(tmp_path / "o"), "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert "bad.jsonl:1" in err and "no assistant turn" in err and "Traceback" not in err
    with pytest.raises(ConfigError, match="group_size|seq_len"):
        SFTConfig(seq_len=0)


def test_default_instruction_tasks_keep_held_out_modules_out():
    from seekdeep.data import default_corpus
    from seekdeep.posttrain.instructions import default_tasks, module_name

    split = default_corpus()
    heldout_modules = {module_name(f, split.root) for f in split.heldout_files}
    heldout = default_tasks("heldout")
    assert heldout
    assert {t.module for t in heldout} <= heldout_modules
    # the reference body under its header is the original function, which parses
    import ast

    for task in heldout:
        ast.parse(task.assemble(task.body))
    assert default_tasks("heldout") == heldout  # deterministic (and cached)
