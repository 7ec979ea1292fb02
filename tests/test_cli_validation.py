"""A systematic pass over the CLI and the public configs: every sub-command's numeric flags get
out-of-range values (0, negative, NaN, huge) and its path arguments missing / broken /
wrong-kind paths; each must end with a non-zero exit and one line naming the flag and what
is accepted — no traceback, nothing written to disk.

The sub-commands and their flags are read from the parser itself, so a new command or flag is
covered the moment it is registered; the tables below list only the values a flag accepts."""

from __future__ import annotations

import argparse
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from seekdeep.cli import build_parser, main

PROBES = ("0", "-1", "nan", "huge")
HUGE = {int: str(10**30), float: "1e30"}

#: (command, flag) -> the probe values that flag accepts (so they are not probed: they would run)
ACCEPTS: dict[tuple[str, str], set[str]] = {
    **{(cmd, "--seed"): {"0"} for cmd in ("generate", "train", "finetune", "distill", "compress", "bench")},
    ("generate", "--max-new-tokens"): {"0"},
    ("generate", "--temperature"): {"0"},  # greedy
    ("generate", "--top-k"): {"0"},  # off
    **{(cmd, "--warmup-steps"): {"0"} for cmd in ("train", "finetune", "distill")},
    ("train", "--indexer-warmup-steps"): {"0"},
    ("train", "--distance-bias"): {"0"},  # off
    ("train", "--dense-fraction"): {"0"},
    **{(cmd, "--min-lr-ratio"): {"0"} for cmd in ("train", "finetune", "distill")},
    **{(cmd, "--weight-decay"): {"0"} for cmd in ("train", "finetune", "distill")},
    **{(cmd, "--indexer-loss-weight"): {"0"} for cmd in ("train", "distill")},
    **{(cmd, "--alpha"): {"0"} for cmd in ("distill", "compress")},  # cross-entropy only
    # "no limit in practice" values: a huge time budget or clip threshold is a valid choice
    **{(cmd, "--max-time"): {"huge"} for cmd in ("train", "finetune", "distill")},
    **{(cmd, "--grad-clip"): {"huge"} for cmd in ("train", "finetune", "distill")},
    ("bench", "--temperature"): {"0"},
    ("serve", "--port"): {"0"},  # any free port
    ("serve", "--max-queue"): {"0"},
    ("serve", "--embedding-cache-size"): {"0"},  # off
    ("profile", "--warmup"): {"0"},
    ("profile", "--latency-budget-ms"): {"huge"},
    ("launch", "--max-restarts"): {"0"},
    ("launch", "--gpus-per-worker"): {"0"},
    **{(cmd, flag): {"0"} for cmd in ("sft", "rl") for flag in ("--seed", "--warmup-steps", "--min-lr-ratio",
                                                               "--weight-decay")},
    **{(cmd, flag): {"huge"} for cmd in ("sft", "rl") for flag in ("--max-time", "--grad-clip")},
    ("rl", "--kl-beta"): {"0"},  # no KL penalty
    ("rl", "--top-k"): {"0"},  # off
    ("align", "--seed"): {"0"},
    ("fl", "--seed"): {"0"},
    **{("vlm", flag): {"0"} for flag in ("--warmup", "--weight-decay", "--num-latents", "--seed", "--caption-every",
                                                  "--caption-steps")},
    ("fl", "--proximal-mu"): {"0"},  # FedAvg's local loss
    ("fl", "--server-momentum"): {"0"},  # plain FedAvg
    ("fl", "--warmup-steps"): {"0"},  # no warmup
    ("fl", "--min-lr-ratio"): {"0"},  # cosine down to zero
}

#: positional / path arguments per command: (argument, kind) with kind "model" (a model directory),
#: "data" (text file, .jsonl or folder), "model_dirs" (serve's models)
PATH_ARGS: dict[str, list[tuple[str, str]]] = {
    "generate": [("model", "model")],
    "train": [("--data", "data")],
    "finetune": [("base", "model"), ("--data", "data")],
    "distill": [("teacher", "model"), ("--data", "data")],
    "compress": [("model", "model"), ("--data", "data")],
    "serve": [("models", "model")],
    "profile": [("model", "model")],
    "explain": [("model", "model")],
    "fl": [("--base", "model")],
    "sft": [("base", "model"), ("--data", "data")],
    "rl": [("base", "model"), ("--data", "data")],
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from seekdeep.data.corpus import stdlib_root
    from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM
    from seekdeep.tokenizer import train_tokenizer

    tokenizer = train_tokenizer([str(stdlib_root() / "textwrap.py")], vocab_size=300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=256,
                                         eos_token_id=tokenizer.eos_token_id))
    path = tmp_path_factory.mktemp("cli-model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _numeric_type(action: argparse.Action):
    if action.type in (int, float):
        return action.type
    return None


def _required_args(command: str, model_dir: Path) -> list[str]:
    """What the command needs besides the probed flag so that only the flag can be wrong."""
    base = {
        "generate": [str(model_dir)],
        "finetune": [str(model_dir)],
        "distill": [str(model_dir), "--steps", "1"],
        "compress": [str(model_dir), "--quant", "int8-dynamic"],
        "serve": [str(model_dir)],
        "profile": [str(model_dir)],
        "explain": [str(model_dir), "--text", "def f(x): return x"],
        "sft": [str(model_dir)],
        "rl": [str(model_dir)],
        "launch": ["--dry-run"],
    }.get(command, [])
    return base


def _cases():
    cases = []
    for command, sub in _subparsers().items():
        for action in sub._actions:
            kind = _numeric_type(action)
            if kind is None or not action.option_strings:
                continue
            flag = action.option_strings[0]
            for probe in PROBES:
                if probe in ACCEPTS.get((command, flag), set()):
                    continue
                cases.append(pytest.param(command, flag, kind, probe, id=f"{command}{flag}={probe}"))
    return cases


class _Timeout(Exception):
    pass


def _run(argv: list[str], capsys, seconds: int = 60) -> tuple[int, str]:
    """main(argv) in this process (fast: torch is imported once) with an alarm, so a value that
    slips through and starts real work fails the test instead of hanging it."""
    def on_alarm(signum, frame):
        raise _Timeout(f"`seekdeep {' '.join(argv)}` was not refused within {seconds}s: it started working")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return code, capsys.readouterr().err


def _listing(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def _check_refused(code, err: str, name: str, root: Path, before: set[str]) -> None:
    assert code not in (0, None), f"accepted: {err}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert "Traceback" not in err
    assert name in lines[0], f"{name!r} not named in: {lines[0]}"
    assert any(w in lines[0] for w in ("accepted", "invalid", "expected", "must")), lines[0]
    assert _listing(root) == before, f"wrote {sorted(_listing(root) - before)}"


@pytest.fixture()
def sandbox(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SEEKDEEP_HOME", str(tmp_path / "home"))
    return tmp_path


@pytest.mark.parametrize("command,flag,kind,probe", _cases())
def test_numeric_flag_out_of_range_is_refused(command, flag, kind, probe, model_dir, sandbox, capsys):
    value = HUGE[kind] if probe == "huge" else probe
    argv = [command, *_required_args(command, model_dir), f"{flag}={value}"]
    if command == "launch":
        argv += ["--", "train", "--steps", "1"]
    before = _listing(sandbox)
    code, err = _run(argv, capsys)
    _check_refused(code, err, flag, sandbox, before)


def _bad_paths(root: Path, kind: str) -> dict[str, Path]:
    missing = root / "bad" / "missing"
    broken = root / "bad" / "broken-link"
    (root / "bad").mkdir(exist_ok=True)
    if not broken.is_symlink():
        broken.symlink_to(root / "bad" / "nowhere")
    paths = {"missing": missing, "broken-link": broken}
    if kind == "model":
        a_file = root / "bad" / "weights.bin"
        a_file.write_bytes(b"\0\1\2")
        empty = root / "bad" / "empty-dir"
        empty.mkdir(exist_ok=True)
        paths.update({"file-not-dir": a_file, "dir-without-config": empty})
    else:
        binary = root / "bad" / "blob.bin"
        binary.write_bytes(b"PK\0\0binary")
        fifo = root / "bad" / "fifo"
        if not fifo.exists():
            os.mkfifo(fifo)
        paths.update({"binary-file": binary, "not-a-regular-file": fifo})
    return paths


def _path_cases():
    cases = []
    for command, args in PATH_ARGS.items():
        for arg, kind in args:
            for case in (("missing", "broken-link", "file-not-dir", "dir-without-config") if kind == "model"
                         else ("missing", "broken-link", "binary-file", "not-a-regular-file")):
                cases.append(pytest.param(command, arg, kind, case, id=f"{command}-{arg.lstrip('-')}-{case}"))
    return cases


@pytest.mark.parametrize("command,arg,kind,case", _path_cases())
def test_bad_path_is_refused(command, arg, kind, case, model_dir, sandbox, capsys):
    bad = _bad_paths(sandbox, kind)[case]
    required = _required_args(command, model_dir)
    if arg.startswith("--"):
        argv = [command, *required, arg, str(bad)]
        name = arg
    else:  # the positional model argument replaces the valid one
        argv = [command, str(bad), *required[1:]]
        name = arg.upper()
    before = _listing(sandbox)
    code, err = _run(argv, capsys)
    _check_refused(code, err, name, sandbox, before)


def test_every_command_is_covered():
    """A new sub-command with path arguments must be added to PATH_ARGS (numeric flags are found
    by themselves)."""
    known = set(PATH_ARGS) | {"bench", "launch"}
    missing = [name for name in _subparsers() if name not in known]
    # commands without model / data paths are listed here explicitly as they are added
    assert not [m for m in missing if m not in NO_PATH_COMMANDS], f"add {missing} to PATH_ARGS or NO_PATH_COMMANDS"


NO_PATH_COMMANDS: set[str] = {"align", "vlm"}  # they train on embedded data only


def test_launch_refuses_bad_settings_before_torchrun(sandbox, capsys):
    cases = [
        (["launch", "--nproc", "0", "--", "train", "--steps", "1"], "--nproc"),
        (["launch", "--nnodes", "0", "--", "train"], "--nnodes"),
        (["launch", "--nnodes", "3:2", "--", "train"], "--nnodes"),
        (["launch", "--nnodes", "2", "--", "train"], "--rdzv-endpoint"),
        (["launch", "--nnodes", "2", "--rdzv-endpoint", "head:0", "--", "train"], "--rdzv-endpoint"),
        (["launch", "--nnodes", "2", "--rdzv-endpoint", "head:29400", "--rdzv-id", "a b", "--", "train"], "--rdzv-id"),
        (["launch", "--rdzv-backend", "zmq", "--", "train"], "--rdzv-backend"),
        (["launch", "--nproc", "1"], "command"),
        (["launch", "--", "nosuchcommand"], "nosuchcommand"),
        (["launch", "--", "train", "--steps", "0"], "--steps"),
        (["launch", "--nproc", "2", "--", "finetune"], "--nproc"),
        (["launch", "--nproc", "2", "--", "train"], "--parallel"),
    ]
    for argv, name in cases:
        before = _listing(sandbox)
        code, err = _run(argv, capsys)
        assert code != 0, argv
        assert name in err and "Traceback" not in err, (argv, err)
        assert _listing(sandbox) == before


def test_generate_temperature_reaches_the_config(model_dir, sandbox, capsys):
    code, err = _run(["generate", str(model_dir), "--temperature", "-2"], capsys)
    assert code == 2 and "--temperature" in err and "(0 = greedy)" in err
    # 0 is greedy in GenerationConfig itself: the same text as the library's greedy call
    code, _ = _run(["generate", str(model_dir), "--temperature", "0", "--max-new-tokens", "3", "--prompt", "ab"], capsys)
    assert code == 0


@pytest.mark.parametrize("make", [
    lambda: __import__("seekdeep.quantization", fromlist=["QuantConfig"]).QuantConfig(method="static", bits=3),
    lambda: __import__("seekdeep.quantization", fromlist=["QuantConfig"]).QuantConfig(method="static", observe_steps=0),
    lambda: __import__("seekdeep.pruning", fromlist=["PruneConfig"]).PruneConfig(ratio=float("nan")),
    lambda: __import__("seekdeep.pruning", fromlist=["PruneConfig"]).PruneConfig(ratio=1.0),
    lambda: __import__("seekdeep.peft", fromlist=["LoRAConfig"]).LoRAConfig(r=0),
    lambda: __import__("seekdeep.peft", fromlist=["LoRAConfig"]).LoRAConfig(r=8, lora_alpha=float("nan")),
    lambda: __import__("seekdeep.peft", fromlist=["LoRAConfig"]).LoRAConfig(r=8, lora_dropout=1.5),
    lambda: __import__("seekdeep.parallel", fromlist=["ParallelConfig"]).ParallelConfig(tp=0),
    lambda: __import__("seekdeep.recipes.train", fromlist=["TrainConfig"]).TrainConfig(lr=float("inf")),
    lambda: __import__("seekdeep.recipes.train", fromlist=["TrainConfig"]).TrainConfig(seq_len=10**12),
    lambda: __import__("seekdeep.serve.engine", fromlist=["EngineConfig"]).EngineConfig(max_num_seqs=0),
    lambda: __import__("seekdeep.serve.engine", fromlist=["EngineConfig"]).EngineConfig(kv_cache_memory="512"),
    lambda: __import__("seekdeep.serve.sampling", fromlist=["SamplingParams"]).SamplingParams(temperature=math.nan),
    lambda: __import__("seekdeep.generation", fromlist=["GenerationConfig"]).GenerationConfig(temperature=-1),
    lambda: __import__("seekdeep.generation", fromlist=["GenerationConfig"]).GenerationConfig(repetition_penalty=math.inf),
], ids=["quant-bits", "quant-observe", "prune-nan", "prune-1", "lora-r0", "lora-alpha-nan", "lora-dropout",
        "parallel-tp0", "train-lr-inf", "train-seq-huge", "engine-seqs0", "engine-kv-unitless", "sampling-temp-nan",
        "gen-temp-neg", "gen-rep-inf"])
def test_public_constructors_refuse_out_of_range_values(make):
    from seekdeep.errors import SeekdeepError

    with pytest.raises(SeekdeepError) as err:
        make()
    assert getattr(err.value, "field", None), f"error names no field: {err.value}"
    assert "accepted" in str(err.value) or "must" in str(err.value)


def _public_configs():
    """The library's public config constructors and the arguments each needs to be valid."""
    from seekdeep.distill import DistillConfig
    from seekdeep.generation import GenerationConfig
    from seekdeep.parallel import ParallelConfig
    from seekdeep.peft import LoRAConfig
    from seekdeep.peft.config import BottleneckConfig, PromptTuningConfig
    from seekdeep.pruning import PruneConfig
    from seekdeep.quantization import QuantConfig
    from seekdeep.recipes.compress import CompressConfig
    from seekdeep.recipes.distill import DistillRunConfig
    from seekdeep.recipes.finetune import FinetuneConfig
    from seekdeep.recipes.train import TrainConfig
    from seekdeep.serve.bench import BenchConfig
    from seekdeep.serve.engine import EngineConfig
    from seekdeep.serve.sampling import SamplingParams
    from seekdeep.serve.server import ServerConfig

    return [(QuantConfig, {}), (PruneConfig, {"ratio": 0.3}), (LoRAConfig, {}), (BottleneckConfig, {}),
            (PromptTuningConfig, {}), (ParallelConfig, {}), (TrainConfig, {}), (FinetuneConfig, {}),
            (DistillRunConfig, {}), (CompressConfig, {"quant": "int8"}), (EngineConfig, {}),
            (ServerConfig, {"model_dirs": ["m"]}), (SamplingParams, {}), (GenerationConfig, {}), (BenchConfig, {}),
            (DistillConfig, {})]


#: (class, field) -> probe values it accepts on purpose
CONFIG_ACCEPTS = {
    ("ParallelConfig", "dp_shard"): {-1},  # all ranks left over
    **{(cls, "max_time"): {"huge"} for cls in ("TrainConfig", "FinetuneConfig", "DistillRunConfig")},
    **{(cls, "grad_clip"): {"huge"} for cls in ("TrainConfig", "FinetuneConfig", "DistillRunConfig")},
}


def _config_cases():
    import dataclasses

    cases = []
    for cls, base in _public_configs():
        for f in dataclasses.fields(cls):
            kind = str(f.type)
            if not kind.startswith(("int", "float")):
                continue
            for probe in (-1, "nan", "huge"):
                if probe in CONFIG_ACCEPTS.get((cls.__name__, f.name), set()):
                    continue
                if probe == "nan" and kind.startswith("int"):
                    continue  # not an int at all: covered by the type checks
                value = {"nan": math.nan, "huge": 10**30 if kind.startswith("int") else 1e30}.get(probe, probe)
                cases.append(pytest.param(cls, base, f.name, value, id=f"{cls.__name__}.{f.name}={probe}"))
    return cases


@pytest.mark.parametrize("cls,base,name,value", _config_cases())
def test_every_numeric_config_field_refuses_out_of_range_values(cls, base, name, value):
    from seekdeep.errors import SeekdeepError

    with pytest.raises(SeekdeepError) as err:
        cls(**{**base, name: value})
    assert getattr(err.value, "field", None) == name or str(err.value).startswith(name), str(err.value)
