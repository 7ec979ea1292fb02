"""Rewards and the doctest sandbox: real subprocesses, real doctests from the standard library."""

from __future__ import annotations

import os

import pytest

from seekdeep.posttrain.instructions import FunctionTask, function_tasks
from seekdeep.posttrain.rewards import DoctestReward, LengthReward, RewardSet, RLPrompt, parse_reward, prefix_reward
from seekdeep.posttrain.sandbox import run_doctests

ADD_DOC = '''Add two numbers.

    >>> add(2, 3)
    5
    '''


def _add(body: str) -> str:
    return "def add(a, b):\n    '''Add.'''\n" + "".join(f"    {line}\n" for line in body.splitlines())


def test_sandbox_passes_and_fails_doctests():
    assert run_doctests("heapq", _add("return a + b"), "add", ADD_DOC).pass_rate == 1.0
    wrong = run_doctests("heapq", _add("return a - b"), "add", ADD_DOC)
    assert wrong.status == "ok" and wrong.attempted == 1 and wrong.failed == 1 and wrong.pass_rate == 0.0
    broken = run_doctests("heapq", "def add(a, b):\n    return (\n", "add", ADD_DOC)
    assert broken.status == "error" and "SyntaxError" in broken.detail


def test_sandbox_refuses_writes_deletes_network_and_processes(tmp_path):
    target = tmp_path / "written.txt"
    keep = tmp_path / "keep"
    keep.mkdir()
    doc = '''
    >>> f()
    Traceback (most recent call last):
    ...
    PermissionError: sandbox: ...
    '''
    attempts = [f"open({str(target)!r}, 'w').write('x')",
                f"import os; os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)",
                f"import shutil; shutil.rmtree({str(keep)!r})",
                f"import os; os.remove({str(keep)!r})",
                "import socket; socket.create_connection(('127.0.0.1', 9))",
                "import subprocess; subprocess.run(['true'])",
                "import os; os.system('true')"]
    for code in attempts:
        source = "def f():\n    " + code + "\n"
        result = run_doctests("heapq", source, "f", doc)
        assert result.status == "ok" and result.failed == 0 and result.attempted == 1, (code, result)
    assert not target.exists() and keep.is_dir()
    # the run's working directory is a temporary one, removed afterwards
    import tempfile

    before = {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("seekdeep-sandbox-")}
    here = run_doctests("heapq", "def f():\n    import os\n    return os.getcwd()\n", "f", ">>> 'seekdeep-sandbox-' in f()\nTrue\n")
    assert here.pass_rate == 1.0
    assert {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("seekdeep-sandbox-")} == before


def test_sandbox_times_out_an_endless_loop():
    result = run_doctests("heapq", _add("while True:\n    pass"), "add", ADD_DOC, timeout=1.0)
    assert result.status == "timeout" and result.pass_rate == 0.0


def test_doctest_reward_on_a_real_stdlib_function():
    from seekdeep.data.corpus import stdlib_root

    tasks = [t for t in function_tasks(stdlib_root() / "fnmatch.py", stdlib_root(), 40) if t.doctest] or \
            [t for t in function_tasks(stdlib_root() / "textwrap.py", stdlib_root(), 40) if t.doctest]
    task = tasks[0]
    reward = DoctestReward(timeout=5)
    assert reward(RLPrompt(task.prompt, task), task.body) == 1.0  # the real body passes its own doctests
    assert reward(RLPrompt(task.prompt, task), "return None") < 1.0
    assert reward(RLPrompt("free-form"), "x = 1") is None  # not applicable
    assert reward.events["doctest_ok"] == 2


def test_parse_and_length_rewards(tokenizer):
    task = FunctionTask("m", "f", "def f(x):\n    '''Doc.'''\n", "return x", "    ", False)
    prompt = RLPrompt(task.prompt, task)
    assert parse_reward(prompt, "return x + 1") == 1.0
    assert parse_reward(prompt, "return (x +") == 0.0
    assert parse_reward(prompt, "   ") == 0.0  # an empty body is not an answer
    length = LengthReward(tokenizer, budget=4)
    assert length(prompt, "x") == 1.0 and length(prompt, " ".join(["x"] * 40)) == 0.0
    # prefix: the longest leading run of lines that parses under the header, as a share of the lines
    assert prefix_reward(prompt, "y = x\nreturn y") == 1.0
    assert prefix_reward(prompt, "y = x\nz = y\nreturn (y +") == pytest.approx(2 / 3)
    assert prefix_reward(prompt, "if x:\n    return 1\nelse") == pytest.approx(2 / 3)
    assert prefix_reward(prompt, "return )\nreturn x") == 0.0 and prefix_reward(prompt, "") == 0.0


def test_failing_reward_functions_skip_the_sample_and_are_counted():
    def raises(prompt, completion):
        raise RuntimeError("boom")

    rewards = RewardSet({"parse": (parse_reward, 1.0), "bad": (raises, 1.0)})
    with pytest.warns(UserWarning, match="'bad' raised RuntimeError: boom on prompt 'p'"):
        total, _ = rewards.score(RLPrompt("p"), "x = 1")
    assert total is None and rewards.events["reward_bad_failed"] == 1
    nan = RewardSet({"nan": (lambda p, c: float("nan"), 1.0), "str": (lambda p, c: "1", 1.0)})
    with pytest.warns(UserWarning, match="not a finite number"):
        assert nan.score(RLPrompt("p"), "x")[0] is None
    ok = RewardSet({"parse": (parse_reward, 2.0), "none": (lambda p, c: None, 1.0)})
    assert ok.score(RLPrompt("p"), "x = 1") == (2.0, {"parse": 1.0})
