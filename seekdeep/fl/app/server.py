"""The Flower ServerApp: FedAvg / FedProx whose aggregation runs on packed Paillier ciphertexts.

The server is given the public key only (``public_key_file`` in the run config;
``load_public_key`` refuses a file holding a private key, and a run config with a private-key
entry is refused too). It checks every update (:meth:`ServerAggregator.check`) and rejects
the malformed ones with a named reason, adds the accepted ones homomorphically with the
round's integer weights into that round's aggregate (still encrypted; slots sized for one
round), and checkpoints it atomically. Each train message carries the aggregates the
destination node does not hold yet (the key-holding clients keep the global model in their
node state, see :mod:`seekdeep.fl.app.common`). A round with fewer accepted updates than
``min_clients`` fails the run with a message saying so.

Outputs in ``run_dir``: ``rounds.jsonl`` (one line per round), ``checkpoints/round-NNNN/``
(``aggregate.npy`` + ``state.json``: every round's, all needed to rebuild the model), and
``server-error.json`` if a round fails.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx

from seekdeep.errors import CheckpointError
from seekdeep.fl.aggregation import ServerAggregator, UpdateLayout
from seekdeep.fl.app.common import RunSettings, packing_spec
from seekdeep.fl.paillier import UpdateRejected, round_weights
from seekdeep.files import read_json, write_json_atomic

app = ServerApp()
CHECKPOINTS = "checkpoints"


class RoundFailed(RuntimeError):
    """Too few updates were accepted in a round (per the strategy's minimum)."""


def latest_round_checkpoint(run_dir: Path) -> Path | None:
    folder = run_dir / CHECKPOINTS
    found = sorted(p for p in folder.glob("round-*") if (p / "state.json").is_file()) if folder.is_dir() else []
    return found[-1] if found else None


def read_round_checkpoint(path: Path, name: str = "global.npy") -> tuple[dict[str, Any], np.ndarray]:
    state = read_json(path / "state.json")
    try:
        payload = np.load(path / name, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / name}: unreadable ({exc})") from exc
    return state, payload


def read_aggregates(run_dir: Path) -> list[tuple[dict[str, Any], np.ndarray]]:
    """Every round's (state, aggregate) from ``checkpoints/``, rounds 1..R without a gap."""
    folder = run_dir / CHECKPOINTS
    found = sorted(p for p in folder.glob("round-*") if (p / "state.json").is_file()) if folder.is_dir() else []
    out = [read_round_checkpoint(p, "aggregate.npy") for p in found]
    rounds = [int(state["round"]) for state, _ in out]
    if rounds != list(range(1, len(rounds) + 1)):
        raise CheckpointError(f"{folder}: round checkpoints {rounds}; every round from 1 is needed to rebuild the model")
    return out


class _PackedSecure:
    """The part FedAvg and FedProx share: check, weigh and add the updates on ciphertexts."""

    def setup(self, aggregator: ServerAggregator, settings: RunSettings, start_round: int,
              aggregates: list[tuple[np.ndarray, int]]) -> None:
        self.aggregator, self.settings = aggregator, settings
        self.start_round = start_round
        self.aggregates = list(aggregates)  # (payload, total weight) per completed round
        self.node_holds: dict[int, int] = {}  # node -> how many aggregates its state holds (unknown: none)
        self.round_info: dict[str, Any] = {}
        self.started = time.perf_counter()

    def _round(self, server_round: int) -> int:
        return self.start_round + server_round

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        cfg = self.settings.cfg
        # the first round waits for every site; later ones go on with those still connected
        self.min_available_nodes = cfg.num_clients if server_round == 1 else cfg.min_train_clients
        config["round"] = self._round(server_round)
        config["total-rounds"] = cfg.rounds  # the clients' lr schedule runs over the whole run
        self.round_info = {"round": self._round(server_round), "t_start": time.perf_counter()}
        return super().configure_train(server_round, arrays, config, grid)

    def _construct_messages(self, record: RecordDict, node_ids: list[int], message_type: str) -> Iterable[Message]:
        """Train messages differ per node: each carries the aggregates that node lacks."""
        if message_type != MessageType.TRAIN:
            return super()._construct_messages(record, node_ids, message_type)
        messages, sent = [], []
        for node in node_ids:
            first = self.node_holds.get(node, 0)
            config = ConfigRecord({**dict(record[self.configrecord_key]), "first-aggregate": first})
            missing = self.aggregates[first:]
            if missing:
                config["aggregate-totals"] = [int(total) for _, total in missing]
            arrays = ArrayRecord({f"agg-{first + i:04d}": Array(payload) for i, (payload, _) in enumerate(missing)})
            messages.append(Message(content=RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config}),
                                    message_type=message_type, dst_node_id=node))
            sent.append(int(sum(payload.nbytes for payload, _ in missing)))
        self.round_info["sent_bytes"] = sent
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        accepted, weights, rejected, metrics = [], [], [], []
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            if msg.has_error():
                self.node_holds.pop(node, None)  # its state is unknown now: send it everything next time
                rejected.append({"node": node, "reason": "client-error", "detail": str(msg.error.reason)[-300:]})
                continue
            try:
                content = msg.content
                if "arrays" not in content or "update" not in content["arrays"] or "metrics" not in content:
                    raise UpdateRejected("bad-metadata", "the reply lacks arrays['update'] or metrics")
                if "holds-aggregates" in content["metrics"]:
                    self.node_holds[node] = int(content["metrics"]["holds-aggregates"])
                key_fp = str(content["config"]["key-fingerprint"]) if "config" in content else ""
                payload = self.aggregator.check(content["arrays"]["update"].numpy(), key_fp or None)
                weight = float(content["metrics"][self.weighted_by_key])
                if not np.isfinite(weight) or weight <= 0:
                    raise UpdateRejected("bad-metadata", f"{self.weighted_by_key} = {weight!r}")
            except UpdateRejected as exc:
                rejected.append({"node": node, "reason": exc.reason, "detail": exc.detail})
                log(WARNING, "round %s: rejected the update of node %s: %s", self._round(server_round), node, exc)
                continue
            accepted.append(payload)
            weights.append(weight)
            metrics.append({k: float(v) for k, v in content["metrics"].items() if isinstance(v, (int, float))})
            if "config" in content and "client-optimizer" in content["config"]:  # kept, fresh or dropped (why)
                metrics[-1]["client-optimizer"] = str(content["config"]["client-optimizer"])
        cfg = self.settings.cfg
        self.round_info.update(replies=len(replies), accepted=len(accepted), rejected=rejected, clients=metrics)
        if len(accepted) < cfg.min_train_clients:
            message = (f"round {self._round(server_round)}: {len(accepted)} of {len(replies)} updates accepted, fewer "
                       f"than --min-clients {cfg.min_train_clients}; rejected: "
                       f"{[(r['node'], r['reason']) for r in rejected]}. The global model of round "
                       f"{self._round(server_round) - 1} is checkpointed; `seekdeep fl --resume auto` continues from it")
            write_json_atomic(self.settings.run_dir / "server-error.json", {"error": message, **self.round_info,
                                                                           "t_start": None})
            raise RoundFailed(message)
        # exact proportions when they fit the slots' headroom, else the closest (recorded as such)
        int_weights, exact = round_weights(weights, self.aggregator.spec.total_weight)
        if not exact:
            log(WARNING, "round %s: weights %s rounded to %s (the packing holds a total weight of %s)",
                self._round(server_round), weights, int_weights, self.aggregator.spec.total_weight)
        t0 = time.perf_counter()
        summed = self.aggregator.accumulate(accepted, int_weights)
        self.round_info["aggregate_seconds"] = time.perf_counter() - t0
        self.aggregates.append((summed, sum(int_weights)))
        mean = {k: float(np.mean([m[k] for m in metrics])) for k in ("train-loss", "encode-seconds", "train-seconds")
                if all(k in m for m in metrics)}
        # the clients evaluated the global model they received (after the previous round)
        losses = {int(m["partition-id"]): m["eval-loss"] for m in metrics if "eval-loss" in m and "partition-id" in m}
        if losses:
            self.round_info["loss_before"] = float(np.mean(list(losses.values())))
            self.round_info["loss_before_per_client"] = {str(k): v for k, v in sorted(losses.items())}
        self.round_info.update(weights=int_weights, requested_weights=weights, weights_exact=exact,
                               **{k.replace("-", "_"): v for k, v in mean.items()})
        return ArrayRecord({"aggregate": Array(summed)}), MetricRecord({"accepted": len(accepted)})

    def checkpoint(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Called by Strategy.start before round 1 and after every round: write the round's
        aggregate (atomically: a folder renamed into place) and append the round's line."""
        if server_round == 0:
            return None
        from seekdeep.train import publish_dir

        round_no = self._round(server_round)
        payload, total = self.aggregates[-1]
        state = {"round": round_no, "total_weight": int(total), "weights": self.round_info.get("weights"),
                 "key_fingerprint": self.aggregator.key_fingerprint, "packing": self.aggregator.spec.to_dict(),
                 "num_values": self.aggregator.num_values}

        def write(tmp: Path) -> None:
            np.save(tmp / "aggregate.npy", payload, allow_pickle=False)
            write_json_atomic(tmp / "state.json", state)

        publish_dir(self.settings.run_dir / CHECKPOINTS / f"round-{round_no:04d}", write)
        info = dict(self.round_info)
        info["round_seconds"] = time.perf_counter() - info.pop("t_start", time.perf_counter())
        info["aggregate_bytes"] = int(payload.nbytes)
        with open(self.settings.run_dir / "rounds.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(info) + "\n")
        return None


class SecureFedAvg(_PackedSecure, FedAvg):
    """FedAvg (weighted by num-examples) over packed Paillier ciphertexts."""


class SecureFedProx(_PackedSecure, FedProx):
    """FedProx: FedAvg's aggregation; clients add the proximal term (``proximal-mu``)."""


def build_strategy(settings: RunSettings):
    """The strategy the ServerApp runs, from the run config alone (public key, layout, resume)."""
    from seekdeep.fl.keys import load_public_key

    cfg = settings.cfg
    public_key = load_public_key(settings.public_key_file, field="public_key_file") if cfg.secure == "paillier" else None
    layout = UpdateLayout.from_dict(read_json(settings.init_dir / "layout.json"))
    aggregator = ServerAggregator(packing_spec(cfg), layout.size, public_key)
    aggregates = []
    if settings.resume:
        for state, payload in read_aggregates(settings.run_dir):
            if state.get("key_fingerprint") != aggregator.key_fingerprint or state.get("num_values") != layout.size \
                    or state.get("packing") != aggregator.spec.to_dict():
                raise CheckpointError(f"round {state.get('round')}: written for another key, model or packing (key "
                                      f"{state.get('key_fingerprint')}, {state.get('num_values')} values); resume with "
                                      "the same keys and settings")
            aggregates.append((payload, int(state["total_weight"])))
    # fraction_evaluate=0: no evaluate messages; the clients evaluate inside the train message
    common = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=cfg.min_train_clients,
                  min_available_nodes=cfg.num_clients)
    if cfg.strategy == "fedprox":
        strategy = SecureFedProx(proximal_mu=cfg.proximal_mu, **common)
    else:
        strategy = SecureFedAvg(**common)
    strategy.setup(aggregator, settings, len(aggregates), aggregates)
    return strategy, ArrayRecord()


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = RunSettings.from_run_config(dict(context.run_config))
    strategy, initial = build_strategy(settings)
    remaining = settings.cfg.rounds - strategy.start_round
    log(INFO, "seekdeep fl: rounds %s..%s of %s, secure=%s", strategy.start_round + 1, settings.cfg.rounds,
        settings.cfg.rounds, settings.cfg.secure)
    if remaining > 0:
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=remaining, timeout=settings.cfg.round_timeout,
                       evaluate_fn=strategy.checkpoint)
