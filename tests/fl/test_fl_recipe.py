"""`seekdeep fl` end to end: a real flower-superlink and flower-supernode processes on
127.0.0.1 (free ports), a tiny model, packed Paillier with 1024-bit keys to stay quick."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from seekdeep.fl.config import FLConfig

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SEEKDEEP_HOME", str(tmp_path_factory.getbasetemp() / "seekdeep-home"))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from seekdeep.data import iter_documents, package_files
    from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM
    from seekdeep.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("fl-base")
    tokenizer = train_tokenizer(iter_documents(package_files("json") + package_files("html")), 512)
    config = LlamaConfig.from_name("tiny", vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=128, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id, attention_backend="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.init_weights()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _cfg(base, out, **overrides) -> FLConfig:
    settings = dict(base=str(base), packages="json,html,tomllib", rounds=2, local_steps=4, batch_size=2, seq_len=32,
                    eval_batches=2, key_bits=1024, output_dir=str(out), progress=False, local_only=False)
    settings.update(overrides)
    return FLConfig(**settings)


def _alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _server_side_files(out: Path) -> list[Path]:
    """What the aggregating side wrote or was given: the server's checkpoints and round log, the
    app's run config, the SuperLink's database and log."""
    files = [out / "rounds.jsonl", out / "app" / "pyproject.toml", out / "logs" / "superlink.log",
             out / "logs" / "flwr-run.log"]
    return files + [p for p in (out / "checkpoints").rglob("*") if p.is_file()]


def test_lora_federation_with_a_dropout_and_a_malformed_update(base, tmp_path):
    """3 clients, federated LoRA. Round 1: client 0's SuperNode is killed once its ClientApp
    got the message; the round completes with the other two. Round 2: client 2 sends one
    ciphertext too few; the server rejects it (wrong-shape) and aggregates client 1 alone."""
    from seekdeep.recipes.fl import run_fl

    out = tmp_path / "run"
    cfg = _cfg(base, out, method="lora", lora="r=2,alpha=8,targets=q_proj,v_proj", lr=0.05, min_clients=1,
               local_only=True)
    killed = []

    def drop_client_0(federation):
        log = federation.log_dir / "supernode-0.log"
        if not killed and log.is_file() and "Receiving: train message" in log.read_text(errors="replace"):
            federation.kill("supernode-0")
            killed.append(time.monotonic())

    summary = run_fl(cfg, node_faults={2: {"fault": "shape", "fault-round": 2}}, on_federation=drop_client_0)
    assert killed
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["accepted"] == 2  # the dropped client did not hold the round back
    assert rounds[1]["accepted"] == 1
    assert [r["reason"] for r in rounds[1]["rejected"]] == ["wrong-shape"]
    assert sum(rounds[1]["weights"]) == sum(rounds[0]["weights"])  # weights re-normalised over the survivors
    # every process the run started is gone, children included
    assert not any(_alive(pid) for pid in json.loads((out / "processes.json").read_text()).values())
    # outputs
    assert (out / "summary.json").is_file() and (out / "loss.png").stat().st_size > 0
    assert (out / "final" / "adapter_model.safetensors").is_file()
    assert summary["init"]["update_values"] < summary["init"]["model_parameters"] / 10  # adapters only
    assert len(summary["local_only"]) == 3
    # the global model moved (lr is high enough that a LoRA step on a random base shows)
    assert summary["global_loss_per_round"][-1][1] != pytest.approx(summary["global_loss_per_round"][0][1], abs=1e-4)
    # key custody: nothing the server side saw holds the private key's primes; the public modulus it did get
    private = json.loads((out / "keys" / "private.json").read_text())
    public_n = json.loads((out / "keys" / "public.json").read_text())["n"]
    app = (out / "app" / "pyproject.toml").read_text()
    assert "public.json" in app and "private" not in app
    for path in _server_side_files(out):
        data = path.read_bytes()
        assert private["p"].encode() not in data and private["q"].encode() not in data, path
    assert public_n not in app  # the server reads the key file named in the run config


def test_resume_after_the_server_is_killed(base, tmp_path):
    """The SuperLink (and the ServerApp it runs) is killed after round 1 is checkpointed: the
    run stops with a message naming --resume; `--resume auto` finishes rounds 2-3 from it."""
    from seekdeep.fl.federation import FederationError
    from seekdeep.recipes.fl import run_fl

    out = tmp_path / "run"
    cfg = _cfg(base, out, method="full", rounds=3, lr=3e-3)

    def kill_server_after_round_1(federation):
        if (out / "rounds.jsonl").is_file() and (out / "rounds.jsonl").read_text().count("\n") >= 1:
            federation.kill("superlink")

    with pytest.raises(FederationError, match="--resume auto"):
        run_fl(cfg, on_federation=kill_server_after_round_1)
    assert not (out / "summary.json").exists()
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["round-0001"]
    summary = run_fl(_cfg(base, out, method="full", rounds=3, resume="auto"))
    assert summary["resumed_after_round"] == 1 and summary["rounds"] == 3
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    state = json.loads((out / "checkpoints" / "round-0003" / "state.json").read_text())
    assert state["rounds_accumulated"] == 3
    # training went on from round 1's model, not from scratch: the loss keeps falling
    curve = [loss for _, loss in summary["global_loss_per_round"]]
    assert curve[-1] < curve[1] < curve[0]


def test_secaggplus_round(base, tmp_path, monkeypatch):
    """--secure secaggplus: Flower's SecAgg+ workflow on the legacy strategy API, one round; the
    global model it checkpoints (plaintext: SecAgg+ reveals the aggregate) is the one evaluated.
    A relative --output-dir, as `seekdeep fl` gets by default (the Flower processes run elsewhere)."""
    from seekdeep.recipes.fl import run_fl

    monkeypatch.chdir(tmp_path)
    out = Path("runs/fl")
    summary = run_fl(_cfg(base, out, method="full", secure="secaggplus", rounds=1, lr=3e-3))
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [(r["round"], r["accepted"]) for r in rounds] == [(1, 3)]
    assert not (out / "keys").exists()  # no Paillier keys on this path
    state = json.loads((out / "checkpoints" / "round-0001" / "state.json").read_text())
    assert state["secure"] == "secaggplus" and state["num_values"] == summary["init"]["update_values"]
    curve = [loss for _, loss in summary["global_loss_per_round"]]
    assert curve[1] < curve[0]  # the securely aggregated model is a trained one
    assert not any(_alive(pid) for pid in json.loads((out / "processes.json").read_text()).values())
