"""The ServerApp's strategy, built from a run config exactly as the ServerApp builds it, fed
real Flower reply messages carrying real packed-Paillier updates (no processes); the key
holders' GlobalState; SecAgg+'s threshold message."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from seekdeep.errors import ConfigError
from seekdeep.fl import paillier
from seekdeep.fl.aggregation import UpdateLayout
from seekdeep.fl.app.common import GlobalState, RunSettings, decode_aggregate, packing_spec
from seekdeep.fl.app.server import RoundFailed, build_strategy
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
    assert len(initial) == 0 and strategy.aggregates == []  # nothing aggregated yet
    # what the ServerApp refuses to receive
    with pytest.raises(ConfigError, match="private key"):
        RunSettings.from_run_config({**run_config, "private_key_file": str(tmp_path / "keys" / "private.json")})
    with pytest.raises(ConfigError, match="private key"):
        build_strategy(RunSettings.from_run_config({**run_config,
                                                    "public_key_file": str(tmp_path / "keys" / "private.json")}))
    with pytest.raises(ConfigError, match="does not exist"):
        build_strategy(RunSettings.from_run_config({**run_config, "public_key_file": str(tmp_path / "none.json")}))


def _reply(node: int, payload: np.ndarray, key_fp: str, num_examples: float = 16.0, holds: int = 0) -> Message:
    sent = Message(content=RecordDict({"config": ConfigRecord({"round": 1})}), dst_node_id=node, message_type="train")
    content = RecordDict({"arrays": ArrayRecord({"update": Array(payload)}),
                          "metrics": MetricRecord({"num-examples": num_examples, "train-loss": 1.0, "eval-loss": 2.0,
                                                   "partition-id": node, "encode-seconds": 0.1,
                                                   "train-seconds": 0.1, "holds-aggregates": holds}),
                          "config": ConfigRecord({"key-fingerprint": key_fp})})
    return Message(content=content, reply_to=sent)


def _strategy(run_config):
    strategy, initial = build_strategy(RunSettings.from_run_config(run_config))
    strategy.checkpoint(0, initial)  # what Strategy.start does before round 1
    strategy.round_info = {"round": 1}
    return strategy


def test_malformed_updates_are_rejected_and_the_round_goes_on(setup):
    run_config, private_key, cfg = setup
    strategy = _strategy(run_config)
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
    assert strategy.round_info["accepted"] == 2 and len(strategy.aggregates) == 1
    # the key holder decodes the round's aggregate: the mean of the two accepted deltas
    assert strategy.round_info["weights"] == [1, 1] and strategy.round_info["weights_exact"]
    mean = decode_aggregate(arrays["aggregate"].numpy(), 2, cfg, VALUES, private_key)
    assert np.abs(mean - np.mean(deltas, axis=0)).max() <= spec.step


def test_unequal_weights_are_exact_and_each_node_gets_the_aggregates_it_lacks(setup):
    run_config, private_key, cfg = setup
    strategy = _strategy(run_config)
    spec = packing_spec(cfg)
    assert spec.total_weight == 8 and spec.slot_bits == 19  # 3 clients + one spare bit
    key_fp = fingerprint(private_key.public_key)
    rng = np.random.default_rng(1)
    deltas = [rng.uniform(-0.5, 0.5, VALUES) for _ in range(3)]
    deltas[2][:10] = 0.5  # every client at the bound: no carry at the largest weighted sum
    deltas[0][:10] = deltas[1][:10] = 0.5
    good = [paillier.encode_update(d, spec, private_key.public_key, rng)[0] for d in deltas]
    counts = [16.0, 24.0, 8.0]  # example counts: 2 : 3 : 1
    arrays, _ = strategy.aggregate_train(1, [_reply(n + 1, good[n], key_fp, counts[n]) for n in range(3)])
    assert strategy.round_info["weights"] == [2, 3, 1] and strategy.round_info["weights_exact"]
    mean = decode_aggregate(arrays["aggregate"].numpy(), 6, cfg, VALUES, private_key)
    exact = np.average(deltas, axis=0, weights=counts)
    assert np.abs(mean - exact).max() <= spec.step
    np.testing.assert_allclose(mean[:10], 0.5, atol=1e-12)
    # counts whose proportions need more headroom than the slots have are rounded, and say so
    strategy.round_info = {"round": 2}
    strategy.aggregate_train(2, [_reply(n + 1, good[n], key_fp, c, holds=1) for n, c in enumerate((16.0, 24.0, 40.0))])
    assert not strategy.round_info["weights_exact"] and sum(strategy.round_info["weights"]) == 8
    # round 3's messages: the nodes that replied hold one aggregate and get the second only; a
    # node the server has not heard from (new, or restarted) gets both, from the first
    messages = strategy._construct_messages(RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord({"round": 3})}),
                                            [1, 9], "train")
    got = {m.metadata.dst_node_id: m.content for m in messages}
    assert got[1]["config"]["first-aggregate"] == 1 and list(got[1]["arrays"]) == ["agg-0001"]
    assert got[9]["config"]["first-aggregate"] == 0 and list(got[9]["arrays"]) == ["agg-0000", "agg-0001"]
    assert list(got[9]["config"]["aggregate-totals"]) == [6, 8]


def test_catching_up_equals_following_every_round():
    """A client that gets all aggregates at once (new or restarted) rebuilds exactly the model
    of one that applied them round by round, with the server optimizer (FedAvgM) too."""
    cfg = FLConfig(secure="none", server_lr=1.5, server_momentum=0.9, output_dir="unused")
    rng = np.random.default_rng(2)
    aggregates = [(rng.normal(0, 0.01, 50) * t, t) for t in (3, 2, 3)]  # plaintext weighted sums, totals
    steady = GlobalState.zeros(50, cfg)
    for aggregate in aggregates:
        steady.replay([aggregate], cfg, 50)
    caught_up = GlobalState.zeros(50, cfg).replay(aggregates, cfg, 50)
    assert caught_up.aggregates == steady.aggregates == 3
    np.testing.assert_array_equal(caught_up.delta, steady.delta)
    means = [a / t for a, t in aggregates]
    v1, v2 = means[0], 0.9 * means[0] + means[1]
    v3 = 0.9 * v2 + means[2]
    np.testing.assert_allclose(steady.delta, 1.5 * (v1 + v2 + v3))
    with pytest.raises(ConfigError, match="server_lr"):
        FLConfig(secure="secaggplus", server_momentum=0.9, output_dir="unused")


def test_too_few_updates_fail_the_round_with_a_clear_message(setup, tmp_path):
    run_config, private_key, cfg = setup
    strategy = _strategy(run_config)
    spec = packing_spec(cfg)
    good = paillier.encode_update(np.zeros(VALUES), spec, private_key.public_key, np.random.default_rng(0))[0]
    with pytest.raises(RoundFailed, match="fewer than --min-clients 2"):
        strategy.aggregate_train(1, [_reply(1, good, fingerprint(private_key.public_key)), _reply(2, good, "0" * 16)])
    assert "wrong-key" in json.loads((tmp_path / "server-error.json").read_text())["error"]


def test_secaggplus_below_its_threshold_fails_with_a_clear_message(tmp_path):
    from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

    from seekdeep.fl.app.secagg import ThresholdedSecAggPlus

    workflow = ThresholdedSecAggPlus(tmp_path, None, num_shares=3, reconstruction_threshold=2)
    state = WorkflowState()
    state.sampled_node_ids = {1, 2, 3}
    state.nid_to_neighbours = {n: {1, 2, 3} for n in (1, 2, 3)}
    state.threshold = 2
    state.active_node_ids = {1, 2}  # one dropout: tolerated
    assert workflow._check_threshold(state)
    state.active_node_ids = {1}  # two: the masks cannot be removed
    with pytest.raises(RuntimeError, match="fewer than the reconstruction threshold 2"):
        workflow._check_threshold(state)
    assert "tolerates 1 dropout" in json.loads((tmp_path / "server-error.json").read_text())["error"]
