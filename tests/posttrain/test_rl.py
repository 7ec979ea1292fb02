"""End-to-end `seekdeep rl` (GRPO and DPO) on a tiny base."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import seekdeep
from seekdeep.cli import main
from seekdeep.errors import ConfigError
from seekdeep.posttrain.config import RLConfig
from seekdeep.recipes.rl import rl


@pytest.fixture(scope="module")
def prompts_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("rl") / "prompts.jsonl"
    rows = [{"prompt": f"Write the body of f{i}.", "header": f"def f{i}(x):\n    '''Return x plus {i}.'''\n"}
            for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(base, data, out, **kw):
    args = dict(base=str(base), data=str(data), steps=4, batch_size=2, group_size=3, max_new_tokens=8,
                rewards="parse,length", length_budget=4, lr=5e-3, checkpoint_interval=2, output_dir=str(out),
                progress=False, lora="r=4,alpha=8,targets=all-linear")
    args.update(kw)
    return RLConfig(**args)


def _fails_on_f1(prompt, completion):
    if "f1(" in prompt.task.header:
        raise ValueError("no reward for f1")
    return sum(c in "aeiou" for c in completion) / max(len(completion), 1)  # varies between samples


@pytest.mark.slow
def test_grpo_run_writes_its_artefacts_and_skips_failing_rewards(base, prompts_jsonl, tmp_path):
    with pytest.warns(UserWarning, match="on prompt"):
        s = rl(_cfg(base, prompts_jsonl, tmp_path / "run", steps=6), extra_rewards={"flaky": (_fails_on_f1, 1.0)})
    run = tmp_path / "run"
    assert s["steps"] == 6 and (run / "rewards.png").is_file() and (run / "summary.json").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert all({"reward", "kl", "length"} <= set(r) for r in records)
    assert records[0]["kl"] < 1e-6  # the LoRA policy starts as the reference
    assert records[-1]["kl"] > records[0]["kl"]
    skipped = sum(r["skipped"] for r in records)
    assert skipped == s["events"].get("reward_flaky_failed", 0) and skipped % 3 == 0
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 * 2 * 3
    model = seekdeep.AutoModel.from_pretrained(run / "final")  # a plain model in the HF layout
    assert model.config.vocab_size > 0 and not list((run / "final").glob("adapter*"))


@pytest.mark.slow
def test_grpo_resume_equals_an_uninterrupted_run(base, prompts_jsonl, tmp_path):
    rl(_cfg(base, prompts_jsonl, tmp_path / "whole"))
    shutil.copytree(tmp_path / "whole" / "checkpoints" / "checkpoint-00000002",
                    tmp_path / "split" / "checkpoints" / "checkpoint-00000002")
    for log in ("metrics.jsonl", "samples.jsonl"):  # as if killed after step 4 with the step-2 checkpoint left
        shutil.copy(tmp_path / "whole" / log, tmp_path / "split" / log)
    rl(_cfg(base, prompts_jsonl, tmp_path / "split", resume="auto"))
    a = seekdeep.AutoModel.from_pretrained(tmp_path / "whole" / "final").state_dict()
    b = seekdeep.AutoModel.from_pretrained(tmp_path / "split" / "final").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    whole = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    split = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in split] == [1, 2, 3, 4]
    assert [r["reward"] for r in whole] == pytest.approx([r["reward"] for r in split])
    # the redone steps' samples replace the first attempt's: each step's samples once, as uninterrupted
    samples = {run: [json.loads(x) for x in (tmp_path / run / "samples.jsonl").read_text().splitlines()]
               for run in ("whole", "split")}
    assert len(samples["split"]) == 4 * 2 * 3 and [r["step"] for r in samples["split"]] == sorted(r["step"] for r in samples["split"])
    assert [r["completion"] for r in samples["split"]] == [r["completion"] for r in samples["whole"]]


@pytest.mark.slow
def test_grpo_learns_to_answer_short(base, prompts_jsonl, tmp_path):
    """With the length reward alone (budget 2 tokens) the policy's completions get shorter."""
    s = rl(_cfg(base, prompts_jsonl, tmp_path / "short", steps=12, rewards="length", length_budget=2, lr=3e-2,
                batch_size=3, group_size=4, kl_beta=0.0))
    records = [json.loads(line) for line in (tmp_path / "short" / "metrics.jsonl").read_text().splitlines()]
    first = sum(r["length"] for r in records[:3]) / 3
    last = sum(r["length"] for r in records[-3:]) / 3
    assert last < first, (first, last)
    assert s["reward_last_quarter"] > s["reward_first_quarter"]


@pytest.mark.slow
def test_dpo_on_pairs_prefers_the_chosen_answers(base, tmp_path):
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"double {i}", "chosen": f"return {i} * 2", "rejected": "pass"} for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = rl(RLConfig(base=str(base), algorithm="dpo", data=str(data), steps=8, batch_size=4, lr=1e-2, dpo_beta=0.5,
                    checkpoint_interval=8, output_dir=str(tmp_path / "dpo"), progress=False, lora="r=4,alpha=8,targets=all-linear"))
    records = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the start
    assert records[-1]["loss"] < records[0]["loss"] and records[-1]["accuracy"] == 1.0
    assert s["pairs"] == 4 and (tmp_path / "dpo" / "rewards.png").is_file()


def test_rl_config_and_cli_refuse_bad_values(base, tmp_path, capsys):
    with pytest.raises(ConfigError, match="group_size"):
        RLConfig(group_size=1)
    with pytest.raises(ConfigError, match="rewards"):
        RLConfig(rewards="parse,vibes")
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"text": 1}\n')
    assert main(["rl", str(base), "--data", str(bad), "--output-dir", str(tmp_path / "o"), "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert "p.jsonl:1" in err and "'prompt'" in err and "Traceback" not in err
