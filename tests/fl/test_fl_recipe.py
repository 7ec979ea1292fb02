"""`seekdeep fl` end to end: a real flower-superlink and flower-supernode processes on
127.0.0.1 (free ports), a tiny model, packed Paillier with 1024-bit keys to stay quick."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from seekdeep.fl.config import FLConfig

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SEEKDEEP_HOME", str(tmp_path_factory.getbasetemp() / "seekdeep-home"))


@pytest.fixture(autouse=True)
def _one_thread():
    """The evaluation and local-only training in this process: one thread (on a loaded 2-core
    machine two OpenMP threads wait on each other: 0.2 s of evaluation took 4-9 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def _received(federation, node: int) -> int:
    """How many train messages SuperNode ``node`` has pulled so far (its log says so)."""
    log = federation.log_dir / f"supernode-{node}.log"
    return log.read_text(errors="replace").count("Receiving: train message") if log.is_file() else 0


def test_lora_federation_dropout_resume_and_malformed_update(base, tmp_path):
    """One federated-LoRA run through real Flower processes (3 clients, packed Paillier):

    - round 1: client 0's SuperNode is stopped once it got the message (it leaves: the SuperLink
      answers for it at once); the round completes with the other two; the run finishes;
    - `--resume auto --rounds 3` extends the finished run (as `seekdeep train` does with a larger
      --steps): a fresh federation runs round 2, every fresh node gets round 1's aggregate from
      the server's checkpoint; client 2 sends one ciphertext too few in round 2: rejected
      (wrong-shape), the round goes on with the two others;
    - the SuperLink (and the ServerApp it runs) is then killed: the run stops with a message
      naming --resume, and `--resume auto` continues at round 3 (rounds 1-2's aggregates to
      each fresh node); a smaller --rounds than the rounds done is refused."""
    from seekdeep.errors import ConfigError
    from seekdeep.fl.federation import FederationError
    from seekdeep.recipes.fl import run_fl

    out = tmp_path / "run"
    # (a resumed run takes its settings, --rounds aside, from the saved config: local_only is set from the start)
    settings = dict(method="lora", lora="r=2,alpha=8,targets=q_proj,v_proj", lr=0.05, min_clients=1, local_only=True)
    left = []

    def drop_client_0(federation):
        if not left and _received(federation, 0):
            federation.kill("supernode-0", signal.SIGTERM)
            left.append(True)

    first = run_fl(_cfg(base, out, **settings, rounds=1), on_federation=drop_client_0)
    assert left and first["rounds"] == 1 and (out / "summary.json").is_file()

    def kill_the_server_after_round_2(federation):
        if (out / "rounds.jsonl").read_text().count("\n") >= 2:
            federation.kill("superlink")

    with pytest.raises(FederationError, match="--resume auto"):
        run_fl(_cfg(base, out, **settings, rounds=3, resume="auto"), on_federation=kill_the_server_after_round_2,
               node_faults={2: {"fault": "shape", "fault-round": 2}})
    assert not (out / "summary.json").exists()  # the extended run is unfinished until its last round
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["round-0001", "round-0002"]
    summary = run_fl(_cfg(base, out, **settings, rounds=3, resume="auto"))
    assert summary["resumed_after_round"] == 2 and summary["rounds"] == 3
    with pytest.raises(ConfigError, match="rounds"):
        run_fl(_cfg(base, out, **settings, rounds=2, resume="auto"))
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[0]["accepted"] == 2  # the dropped client did not hold the round back
    assert [r["reason"] for r in rounds[0]["rejected"]] == ["client-error"]
    assert "Node Unavailable" in rounds[0]["rejected"][0]["detail"]
    assert rounds[1]["accepted"] == 2 and [r["reason"] for r in rounds[1]["rejected"]] == ["wrong-shape"]
    assert rounds[2]["accepted"] == 3 and not rounds[2]["rejected"]
    assert rounds[0]["weights"] == rounds[1]["weights"] == [1, 1] and rounds[1]["weights_exact"]
    # uplink: one round's slots (19 bits at 1024-bit keys: 53 values per 256-byte ciphertext);
    # downlink after each restart: every aggregate so far to each fresh node
    values = summary["init"]["update_values"]
    aggregate = -(-values // 53) * 256
    assert rounds[0]["aggregate_bytes"] == rounds[1]["aggregate_bytes"] == aggregate
    assert rounds[0]["sent_bytes"] == [0, 0, 0]
    assert rounds[1]["sent_bytes"] == [aggregate] * 3 and rounds[2]["sent_bytes"] == [2 * aggregate] * 3
    # every process the run started is gone, children included
    assert not any(_alive(pid) for pid in json.loads((out / "processes.json").read_text()).values())
    # outputs
    assert (out / "summary.json").is_file() and (out / "loss.png").stat().st_size > 0
    assert (out / "final" / "adapter_model.safetensors").is_file()
    assert values < summary["init"]["model_parameters"] / 10  # adapters only
    assert len(summary["local_only"]) == 3
    # training went on from the previous rounds' model, not from scratch (lr is high enough that
    # a LoRA step on a random base shows)
    curve = [loss for _, loss in summary["global_loss_per_round"]]
    assert len(curve) == 4 and all(b != pytest.approx(a, abs=1e-4) for a, b in zip(curve, curve[1:]))
    # key custody: nothing the server side saw holds the private key's primes; the public modulus it did get
    private = json.loads((out / "keys" / "private.json").read_text())
    public_n = json.loads((out / "keys" / "public.json").read_text())["n"]
    app = (out / "app" / "pyproject.toml").read_text()
    assert "public.json" in app and "private" not in app
    for path in _server_side_files(out):
        data = path.read_bytes()
        assert private["p"].encode() not in data and private["q"].encode() not in data, path
    assert public_n not in app  # the server reads the key file named in the run config


def test_secaggplus_round_survives_a_dropout(base, tmp_path, monkeypatch):
    """--secure secaggplus (Flower's SecAgg+ workflow on the legacy strategy API), 3 clients,
    full model: client 0 leaves after it shared its keys (its pairwise masks are in the others'
    vectors), the unmask stage rebuilds them from the survivors' shares, and the global model
    is the mean of the two survivors' weights. A relative --output-dir, as `seekdeep fl` gets by
    default (the Flower processes run elsewhere)."""
    from seekdeep.fl.app.client import local_train
    from seekdeep.fl.app.common import flat_trainable, load_initial_model, model_layout, site_windows
    from seekdeep.recipes.fl import run_fl

    monkeypatch.chdir(tmp_path)
    out = Path("runs/fl")
    cfg = _cfg(base, out, method="full", secure="secaggplus", rounds=1, lr=3e-3, min_clients=2)
    left = []

    def drop_client_0_in_the_masked_vector_stage(federation):
        # SecAgg+ stages, one train message each: setup, share keys, collect masked vectors, unmask
        if not left and _received(federation, 0) >= 3:
            federation.kill("supernode-0", signal.SIGTERM)
            left.append(True)

    summary = run_fl(cfg, on_federation=drop_client_0_in_the_masked_vector_stage)
    assert left
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [(r["round"], r["accepted"]) for r in rounds] == [(1, 2)]
    survivors = sorted(int(k) for k in rounds[0]["loss_before_per_client"])
    assert survivors == [1, 2]
    assert not (out / "keys").exists()  # no Paillier keys on this path
    state = json.loads((out / "checkpoints" / "round-0001" / "state.json").read_text())
    assert state["secure"] == "secaggplus" and state["num_values"] == summary["init"]["update_values"]
    # the unmasked sum is the survivors' mean: their local training, redone here, matches it
    # within SecAgg+'s quantisation (the dropped client's weights would be ~1e-2 away)
    trained, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # as the ClientApps ran (one core each): the same float reductions
    for partition in survivors:
        model = load_initial_model(out / "init", "full")
        windows = site_windows(out / "data" / f"client-{partition}" / "train.bin", cfg, partition, 1)
        local_train(model, windows, cfg.local_steps, cfg.learning_rate, "full")
        trained.append(flat_trainable(model, "full", model_layout(model, "full")))
    torch.set_num_threads(threads)
    global_vector = np.load(out / "checkpoints" / "round-0001" / "global.npy")
    assert np.abs(global_vector - np.mean(trained, axis=0)).max() < 1e-4
    curve = [loss for _, loss in summary["global_loss_per_round"]]
    assert curve[1] < curve[0]  # the securely aggregated model is a trained one
    assert not any(_alive(pid) for pid in json.loads((out / "processes.json").read_text()).values())


def test_full_model_paillier_rounds_keep_the_client_optimizer(base, tmp_path):
    """--method full with packed Paillier through real Flower processes (2 clients, 2 rounds):
    every weight travels encrypted, and the global model is the initial model plus the mean of
    the clients' deltas -- their local training, redone here -- within one quantisation step
    (each delta is stochastically rounded to 16 bits before encryption) after round 1 (the
    checkpointed aggregate) and after round 2 (final/). Round 2's clients continue from the AdamW
    state they kept in their Flower node state after round 1 (each message runs in a fresh
    ClientApp process): redone with one optimizer per client it matches; with a fresh AdamW in
    round 2 it would not."""
    from seekdeep.auto import AutoModel
    from seekdeep.fl.app.client import local_train
    from seekdeep.fl.app.common import (GlobalState, flat_trainable, load_flat, load_initial_model, make_optimizer,
                                        model_layout, packing_spec, site_windows, trainable_params)
    from seekdeep.fl.app.server import read_aggregates
    from seekdeep.fl.keys import load_private_key
    from seekdeep.recipes.fl import run_fl

    out = tmp_path / "run"
    cfg = _cfg(base, out, method="full", num_clients=2, rounds=2, lr=3e-3)
    assert cfg.client_optimizer == "keep"  # the default
    summary = run_fl(cfg)
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [(r["round"], r["accepted"], r["rejected"]) for r in rounds] == [(1, 2, []), (2, 2, [])]
    assert [c["optimizer-step-start"] for r in rounds for c in r["clients"]] == [0, 0] + [cfg.local_steps] * 2
    assert all(c["client-optimizer"].startswith("kept") for c in rounds[1]["clients"])
    values = summary["init"]["update_values"]
    assert values == summary["init"]["model_parameters"]  # every weight, not an adapter
    spec = packing_spec(cfg)
    assert rounds[0]["aggregate_bytes"] == -(-values // spec.slots) * 256  # 1024-bit keys: 256-byte ciphertexts
    model = load_initial_model(out / "init", "full")
    layout = model_layout(model, "full")
    start = flat_trainable(model, "full", layout)
    # as the ClientApps ran (one torch thread each on this host's cores)
    models = [load_initial_model(out / "init", "full") for _ in range(2)]
    optimizers = [make_optimizer(list(trainable_params(m, "full").values()), cfg.learning_rate) for m in models]

    def local_round(partition: int, round_no: int, optimizer) -> np.ndarray:
        model = models[partition]
        local_train(model, site_windows(out / "data" / f"client-{partition}" / "train.bin", cfg, partition, round_no),
                    cfg.local_steps, cfg.learning_rate, "full", optimizer=optimizer)
        return flat_trainable(model, "full", layout)

    deltas = [local_round(i, 1, optimizers[i]) - start for i in range(2)]
    assert np.abs(deltas[0] - deltas[1]).max() > 100 * spec.step  # the clients' updates are told apart
    state, payload = read_aggregates(out)[0]
    round_1 = start + GlobalState.zeros(values, cfg).replay([(payload, int(state["total_weight"]))], cfg, values,
                                                            load_private_key(out / "keys" / "private.json")).delta
    assert np.abs(round_1 - (start + np.mean(deltas, axis=0))).max() <= spec.step + 1e-6
    kept, fresh = [], []
    for i in range(2):
        load_flat(models[i], "full", layout, round_1)
        kept.append(local_round(i, 2, optimizers[i]) - round_1)
        load_flat(models[i], "full", layout, round_1)
        fresh.append(local_round(i, 2, None) - round_1)
    final = flat_trainable(AutoModel.from_pretrained(out / "final"), "full", layout)
    assert np.abs(final - (round_1 + np.mean(kept, axis=0))).max() <= spec.step + 1e-6
    assert np.abs(final - (round_1 + np.mean(fresh, axis=0))).max() > 100 * spec.step
    assert not any(_alive(pid) for pid in json.loads((out / "processes.json").read_text()).values())
