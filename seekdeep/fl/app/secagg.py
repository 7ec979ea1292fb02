"""``--secure secaggplus``: Flower's own SecAgg+ (``secaggplus_mod`` on the clients,
``SecAggPlusWorkflow`` on the server), which runs on Flower's legacy strategy API.

Threat model differs from packed Paillier: SecAgg+ hides each client's update behind pairwise
masks that cancel in the sum, so the server learns the aggregate (the global model, in
plaintext) and nothing about any single update, and tolerates dropouts by reconstructing the
dropped clients' masks from secret shares (``reconstruction_threshold`` of them).

Clients send their trainable weights (adapter or full model); the workflow clips them to
``[-8, 8]``, quantises to 2**22 levels and computes the weighted mean. The server keeps the
plaintext global vector, checkpointed atomically every round like the Paillier path.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Context, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg, FedProx
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

from seekdeep.errors import ConfigError
from seekdeep.fl.app.common import RunSettings, flat_trainable, load_flat, load_initial_model, model_layout, site_windows

CLIPPING_RANGE = 8.0


class _Checkpointing:
    """Writes the global vector and the round's line after every aggregation."""

    def setup(self, settings: RunSettings, start_round: int) -> None:
        self.settings, self.start_round = settings, start_round
        self.t_start = time.perf_counter()

    def configure_fit(self, server_round, parameters, client_manager):
        self.t_start = time.perf_counter()
        self.round_no = self.start_round + server_round
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        from seekdeep.files import write_json_atomic
        from seekdeep.train import publish_dir

        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        round_no = self.start_round + server_round
        cfg = self.settings.cfg
        if parameters is None or len(results) < cfg.min_train_clients:
            message = (f"round {round_no}: {len(results)} SecAgg+ results, fewer than --min-clients "
                       f"{cfg.min_train_clients}; `seekdeep fl --resume auto` continues from round {round_no - 1}")
            write_json_atomic(self.settings.run_dir / "server-error.json", {"error": message})
            raise RuntimeError(message)
        vector = parameters_to_ndarrays(parameters)[0]
        state = {"round": round_no, "key_fingerprint": None,
                 "num_values": int(vector.size), "secure": "secaggplus"}

        def write(tmp: Path) -> None:
            np.save(tmp / "global.npy", vector, allow_pickle=False)
            write_json_atomic(tmp / "state.json", state)

        folder = self.settings.run_dir / "checkpoints"
        publish_dir(folder / f"round-{round_no:04d}", write)
        for old in sorted(folder.glob("round-*"))[:-2]:
            shutil.rmtree(old, ignore_errors=True)
        client_metrics = [dict(res.metrics) for _, res in results]
        losses = {int(m["partition-id"]): float(m["eval-loss"]) for m in client_metrics if "eval-loss" in m}
        info = {"round": round_no, "replies": len(results) + len(failures), "accepted": len(results),
                "rejected": [{"node": None, "reason": "failure", "detail": str(f)[-300:]} for f in failures],
                "weights": [int(res.num_examples) for _, res in results],
                "train_loss": float(np.mean([m["train-loss"] for m in client_metrics])) if client_metrics else None,
                "round_seconds": time.perf_counter() - self.t_start, "aggregate_bytes": int(vector.nbytes)}
        if losses:
            info["loss_before"] = float(np.mean(list(losses.values())))
            info["loss_before_per_client"] = {str(k): v for k, v in sorted(losses.items())}
        info["optimizer_step_start"] = {str(int(m["partition-id"])): int(m["optimizer-step-start"])
                                        for m in client_metrics if "optimizer-step-start" in m}
        with open(self.settings.run_dir / "rounds.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(info) + "\n")
        return parameters, metrics


class ThresholdedSecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, failing the run with a clear message (``server-error.json``)
    when too many clients dropped for the masks to be removed, instead of halting silently."""

    def __init__(self, run_dir: Path, strategy: "_Checkpointing", **kwargs):
        super().__init__(**kwargs)
        self.run_dir, self.strategy = Path(run_dir), strategy

    def _check_threshold(self, state) -> bool:
        if super()._check_threshold(state):
            return True
        from seekdeep.files import write_json_atomic

        fewest = min(len(state.nid_to_neighbours[n] & state.active_node_ids) for n in state.sampled_node_ids)
        round_no = getattr(self.strategy, "round_no", None)
        message = (f"round {round_no}: SecAgg+ cannot unmask the sum: {len(state.active_node_ids)} of "
                   f"{len(state.sampled_node_ids)} clients still active, a client has {fewest} active neighbours, fewer "
                   f"than the reconstruction threshold {state.threshold} (SecAgg+ tolerates "
                   f"{len(state.sampled_node_ids) - state.threshold} dropout(s) here); `seekdeep fl --resume auto` "
                   "continues from the last checkpointed round")
        write_json_atomic(self.run_dir / "server-error.json", {"error": message})
        raise RuntimeError(message)


class CheckpointingFedAvg(_Checkpointing, FedAvg):
    pass


class CheckpointingFedProx(_Checkpointing, FedProx):
    pass


server_app = ServerApp()


@server_app.main()
def main(grid, context: Context) -> None:
    from seekdeep.fl.app.server import latest_round_checkpoint, read_round_checkpoint

    settings = RunSettings.from_run_config(dict(context.run_config))
    cfg = settings.cfg
    model = load_initial_model(settings.init_dir, cfg.method)
    layout = model_layout(model, cfg.method)
    vector, start_round = flat_trainable(model, cfg.method, layout), 0
    if settings.resume and (latest := latest_round_checkpoint(settings.run_dir)) is not None:
        state, vector = read_round_checkpoint(latest)
        start_round = int(state["round"])
    remaining = cfg.rounds - start_round
    if remaining <= 0:
        return

    def fit_config(server_round: int) -> dict:
        return {"round": start_round + server_round, "total-rounds": cfg.rounds}  # the clients' lr schedule

    common = dict(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=cfg.min_train_clients,
                  min_available_clients=cfg.num_clients, on_fit_config_fn=fit_config,
                  initial_parameters=ndarrays_to_parameters([vector]))
    strategy = (CheckpointingFedProx(proximal_mu=cfg.proximal_mu, **common) if cfg.strategy == "fedprox"
                else CheckpointingFedAvg(**common))
    strategy.setup(settings, start_round)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=remaining, round_timeout=cfg.round_timeout),
                           strategy=strategy)
    # every client shares its mask seeds with the others; any 2 shares rebuild a dropped client's mask
    workflow = DefaultWorkflow(fit_workflow=ThresholdedSecAggPlus(
        settings.run_dir, strategy, num_shares=cfg.num_clients, reconstruction_threshold=max(2, cfg.min_train_clients),
        clipping_range=CLIPPING_RANGE, max_weight=float(cfg.local_steps * cfg.batch_size),
        timeout=cfg.round_timeout))
    workflow(grid, legacy)


class _SecAggClient(NumPyClient):
    def __init__(self, context: Context):
        self.context = context

    def fit(self, parameters, config):
        from seekdeep.data import TokenWindows
        from seekdeep.fl.app.client import site_round
        from seekdeep.train import mean_loss

        settings = RunSettings.from_run_config(dict(self.context.run_config))
        cfg = settings.cfg
        node = dict(self.context.node_config)
        if "torch-threads" in node:
            import torch

            torch.set_num_threads(max(1, int(node["torch-threads"])))
        partition = int(node.get("partition-id", 0))
        data_dir = Path(str(node["data-dir"]))
        model = load_initial_model(settings.init_dir, cfg.method)
        layout = model_layout(model, cfg.method)
        load_flat(model, cfg.method, layout, np.asarray(parameters[0], dtype=np.float64))
        heldout = TokenWindows(data_dir / "heldout.bin", cfg.seq_len, cfg.batch_size, shuffle=False)
        eval_loss = mean_loss(model, heldout.eval_batches(cfg.eval_batches))
        if "round" not in config or "total-rounds" not in config:
            raise ConfigError("round", f"the server's fit config lacks round / total-rounds (got {sorted(config)}); "
                              "server and clients must run the same seekdeep")
        round_no, total_rounds = int(config["round"]), int(config["total-rounds"])
        windows = site_windows(data_dir / "train.bin", cfg, partition, round_no)  # as the Paillier ClientApp
        mu = float(config.get("proximal_mu", 0.0))
        # the site's AdamW state lives in its node state, next to secaggplus_mod's own (as the Paillier ClientApp)
        train_loss, step_start, _ = site_round(model, windows, cfg, self.context, round_no, total_rounds, mu)
        weights = flat_trainable(model, cfg.method, layout).astype(np.float32)
        return [weights], cfg.local_steps * cfg.batch_size, {"train-loss": train_loss, "eval-loss": eval_loss,
                                                             "partition-id": partition,
                                                             "optimizer-step-start": step_start}


def client_fn(context: Context):
    return _SecAggClient(context).to_client()


client_app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])  # the same app as secagg_shim's
