"""The ServerApp's strategy, built from a run config exactly as the ServerApp builds it, fed
real Flower reply messages carrying real packed-Paillier updates (no processes)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from seekdeep.errors import ConfigError
from seekdeep.fl import paillier
from seekdeep.fl.aggregation import UpdateLayout
from seekdeep.fl.app.common import RunSettings, packing_spec
from seekdeep.fl.app.server import RoundFailed, build_strategy, empty_global
from seekdeep.fl.config import FLConfig
from seekdeep.fl.keys import fingerprint, generate_keypair, load_private_key

VALUES = 300


@pytest.fixture
def setup(tmp_path):
    import torch

    public, private = generate_keypair(tmp_path / "keys", key_bits=1024)
    init = tmp_path / "init"
    init.mkdir()
    layout = UpdateLayout.of({"w": torch.zeros(VALUES)})
    (init / "layout.json").write_text(json.dumps(layout.to_dict()))
    cfg = FLConfig(key_bits=1024, num_clients=3, min_clients=2, rounds=2, clip=0.5, output_dir=str(tmp_path))
    run_config = {"fl_config": json.dumps(cfg.to_dict()), "run_dir": str(tmp_path), "init_dir": str(init),
                  "public_key_file": str(public), "resume": False}
    return run_config, load_private_key(private), cfg


def _objects(root, depth=0, seen=None):
    """Every object reachable from ``root`` through attributes, dicts and lists."""
    seen = set() if seen is None else seen
    if id(root) in seen or depth > 6:
        return
    seen.add(id(root))
    yield root
    children = []
    if isinstance(root, dict):
        children = list(root.values())
    elif isinstance(root, (list, tuple, set)):
        children = list(root)
    elif hasattr(root, "__dict__"):
        children = list(vars(root).values())
    for child in children:
        yield from _objects(child, depth + 1, seen)


def test_the_server_strategy_holds_the_public_key_only(setup, tmp_path):
    from phe import PaillierPrivateKey, PaillierPublicKey

    run_config, private_key, _ = setup
    strategy, initial = build_strategy(RunSettings.from_run_config(run_config))
    held = list(_objects(strategy))
    assert any(isinstance(o, PaillierPublicKey) for o in held)
    assert not any(isinstance(o, PaillierPrivateKey) for o in held)
    assert not any(isinstance(o, int) and o in (private_key.p, private_key.q) for o in held)
    assert initial["global"].numpy().shape[0] == 0  # nothing aggregated yet
    # what the ServerApp refuses to receive
    with pytest.raises(ConfigError, match="private key"):
        RunSettings.from_run_config({**run_config, "private_key_file": str(tmp_path / "keys" / "private.json")})
    with pytest.raises(ConfigError, match="private key"):
        build_strategy(RunSettings.from_run_config({**run_config,
                                                    "public_key_file": str(tmp_path / "keys" / "private.json")}))
    with pytest.raises(ConfigError, match="does not exist"):
        build_strategy(RunSettings.from_run_config({**run_config, "public_key_file": str(tmp_path / "none.json")}))


def _reply(node: int, payload: np.ndarray, key_fp: str, num_examples: float = 16.0) -> Message:
    sent = Message(content=RecordDict({"config": ConfigRecord({"round": 1})}), dst_node_id=node, message_type="train")
    content = RecordDict({"arrays": ArrayRecord({"update": Array(payload)}),
                          "metrics": MetricRecord({"num-examples": num_examples, "train-loss": 1.0, "eval-loss": 2.0,
                                                   "partition-id": node, "encode-seconds": 0.1,
                                                   "train-seconds": 0.1}),
                          "config": ConfigRecord({"key-fingerprint": key_fp})})
    return Message(content=content, reply_to=sent)


def test_malformed_updates_are_rejected_and_the_round_goes_on(setup):
    run_config, private_key, cfg = setup
    strategy, initial = build_strategy(RunSettings.from_run_config(run_config))
    strategy.checkpoint(0, initial)  # what Strategy.start does before round 1
    strategy.round_info = {"round": 1}
    spec = packing_spec(cfg)
    public_key = private_key.public_key
    key_fp = fingerprint(public_key)
    rng = np.random.default_rng(0)
    deltas = [rng.uniform(-0.5, 0.5, VALUES) for _ in range(2)]
    good = [paillier.encode_update(d, spec, public_key, rng)[0] for d in deltas]
    replies = [_reply(1, good[0], key_fp), _reply(2, good[1], key_fp), _reply(3, good[0][:-1], key_fp),
               _reply(4, good[0], "f" * 16), _reply(5, good[0], key_fp, num_examples=float("nan"))]
    arrays, _ = strategy.aggregate_train(1, replies)
    reasons = sorted((r["node"], r["reason"]) for r in strategy.round_info["rejected"])
    assert reasons == [(3, "wrong-shape"), (4, "wrong-key"), (5, "bad-metadata")]
    assert strategy.round_info["accepted"] == 2 and strategy.rounds_accumulated == 1
    # the key holder decodes the running sum: the mean of the two accepted deltas
    mean = paillier.decode_sum(arrays["global"].numpy(), spec, private_key, VALUES, spec.total_weight, 1)
    assert np.abs(mean - np.mean(deltas, axis=0)).max() <= spec.step


def test_too_few_updates_fail_the_round_with_a_clear_message(setup, tmp_path):
    run_config, private_key, cfg = setup
    strategy, initial = build_strategy(RunSettings.from_run_config(run_config))
    strategy.checkpoint(0, initial)
    strategy.round_info = {"round": 1}
    spec = packing_spec(cfg)
    good = paillier.encode_update(np.zeros(VALUES), spec, private_key.public_key, np.random.default_rng(0))[0]
    with pytest.raises(RoundFailed, match="fewer than --min-clients 2"):
        strategy.aggregate_train(1, [_reply(1, good, fingerprint(private_key.public_key)), _reply(2, good, "0" * 16)])
    assert "wrong-key" in json.loads((tmp_path / "server-error.json").read_text())["error"]
    assert empty_global(strategy.aggregator).shape == (0, paillier.ciphertext_bytes(private_key.public_key))
