"""What the ServerApp and the ClientApp share: the run settings, the initial model, the layout
of an update, the packing, and the key holders' view of the global model.

The global model is never held in plaintext by the server. It is ``init + delta``, where the
clients -- who share the key pair -- build ``delta`` from the sequence of round aggregates:
each round the server adds the accepted updates homomorphically into one aggregate (its slots
sized for one round: K clients' weights, so an update costs ~1.2x float32), keeps every
round's aggregate (checkpointed) and sends each client the ones it does not hold yet (one per
round in the steady state; all of them to a new or restarted client). Each client decrypts
them, applies the server optimizer (:class:`GlobalState`: FedAvg, or FedAvgM with
``server_lr`` / ``server_momentum``) in the same float64 order, and keeps the result in its
Flower node state for the next round.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seekdeep.errors import CheckpointError, ConfigError
from seekdeep.fl.aggregation import UpdateLayout
from seekdeep.fl.config import FLConfig
from seekdeep.fl.paillier import PackingSpec, weight_capacity

ADAPTER = "default"
#: keys of the Flower run config (written by the recipe into the app's pyproject)
RUN_CONFIG_KEYS = ("fl_config", "run_dir", "init_dir", "public_key_file", "resume")


@dataclass
class RunSettings:
    """The run config as the apps read it."""

    cfg: FLConfig
    run_dir: Path
    init_dir: Path
    public_key_file: str
    resume: bool

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> "RunSettings":
        missing = [k for k in RUN_CONFIG_KEYS if k not in run_config]
        if missing:
            raise ConfigError("run_config", f"missing keys {missing}; the app's pyproject is written by `seekdeep fl`")
        private = [k for k in run_config if "private" in k.lower()]
        if private:
            raise ConfigError("run_config", f"{private} in the server's run config: the aggregating server must not "
                              "receive the private key")
        try:
            data = json.loads(run_config["fl_config"])
        except (TypeError, json.JSONDecodeError) as exc:
            raise ConfigError("fl_config", f"not a JSON object ({exc})") from None
        return cls(FLConfig.from_dict(data), Path(run_config["run_dir"]), Path(run_config["init_dir"]),
                   str(run_config["public_key_file"]), bool(run_config["resume"]))


def packing_spec(cfg: FLConfig) -> PackingSpec:
    """One round's slots: weights summing to at most ``weight_capacity(num_clients)`` (the bits
    K clients of weight 1 need, plus one spare bit for unequal weights)."""
    return PackingSpec(bits=cfg.quant_bits, clip=cfg.clip, total_weight=weight_capacity(cfg.num_clients, cfg.quant_bits),
                       rounds=1, key_bits=cfg.key_bits)


def load_initial_model(init_dir: Path, method: str):
    """The public initial model every site starts from: the base (and for LoRA its adapter,
    saved once so that every client has the same A matrices), trainable parts unfrozen."""
    from seekdeep.auto import AutoModel

    if not (init_dir / "model" / "config.json").is_file():
        raise CheckpointError(f"{init_dir / 'model'}: no initial model (config.json); `seekdeep fl` writes it")
    model = AutoModel.from_pretrained(init_dir / "model")
    if method == "lora":
        model.load_adapter(init_dir / "adapter", adapter_name=ADAPTER, is_trainable=True)
    else:
        for param in model.parameters():
            param.requires_grad_(True)
    return model


def site_windows(path: Path, cfg: FLConfig, partition: int, round_no: int):
    """A site's training stream positioned at the start of round ``round_no``: one seeded
    permutation per epoch over all rounds (``seed + 1000 * partition``), so every window is
    read once per epoch, as a centralized run reads the pooled data, and a restarted client
    starts round ``round_no`` exactly where it would have."""
    from seekdeep.data import TokenWindows

    windows = TokenWindows(path, cfg.seq_len, cfg.batch_size, seed=cfg.seed + 1000 * partition)
    done = (round_no - 1) * cfg.local_steps * cfg.batch_size  # windows read by the earlier rounds
    windows.load_state_dict(dict(windows.state_dict(), epoch=done // windows.num_windows,
                                 cursor=done % windows.num_windows))
    return windows


def trainable_tensors(model, method: str) -> dict[str, torch.Tensor]:
    """The live tensors an update carries: the adapter's (LoRA) or every parameter (full)."""
    if method == "lora":
        from seekdeep.peft.io import adapter_tensors

        return adapter_tensors(model, ADAPTER)
    return dict(model.named_parameters())


def trainable_params(model, method: str) -> dict[str, torch.Tensor]:
    """The tensors local training updates, by name, in the order its optimizer holds them."""
    return {name: p for name, p in trainable_tensors(model, method).items() if p.requires_grad}


def make_optimizer(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)


def scheduled_lr(cfg: FLConfig, step: int, total_steps: int, warmup_steps: int | None = None) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of a run of ``total_steps`` under
    ``cfg``'s schedule: :func:`seekdeep.train.schedule.warmup_cosine` from ``cfg.learning_rate``
    down to ``min_lr_ratio`` of it (cosine) or to itself (constant), after ``warmup_steps``
    (default ``cfg.warmup_steps``). A client's step is its global index (:func:`client_lr_at`);
    the benchmark's centralized and local-only runs use the same function over their own steps."""
    from seekdeep.train.schedule import warmup_cosine

    peak = cfg.learning_rate
    floor = peak * cfg.min_lr_ratio if cfg.lr_schedule == "cosine" else peak
    return warmup_cosine(step, cfg.warmup_steps if warmup_steps is None else warmup_steps, total_steps, peak, floor)


def client_lr_at(cfg: FLConfig, round_no: int, total_rounds: int):
    """``lr_at(k)``: the learning rate of local step ``k`` of round ``round_no`` (1-based) of
    ``total_rounds`` -- the global schedule at step ``(round_no - 1) * local_steps + k`` of
    ``total_rounds * local_steps``, so every round continues one curve (as a centralized run of
    that many steps would follow it) and a restarted site picks it up where the round is."""
    from seekdeep.validate import check_int

    check_int("total-rounds", total_rounds, 1, 10**5)
    check_int("round", round_no, 1, total_rounds)
    offset, total = (round_no - 1) * cfg.local_steps, total_rounds * cfg.local_steps
    return lambda k: scheduled_lr(cfg, offset + k, total)


OPTIMIZER_KEY = "seekdeep-fl-optimizer"  # a site's local AdamW state in its Flower node state (context.state)
MOMENTS = ("exp_avg", "exp_avg_sq")


def keep_client_optimizer(node_state, optimizer: torch.optim.Optimizer, named: dict[str, torch.Tensor],
                          method: str) -> None:
    """Store ``optimizer``'s AdamW state (built by :func:`make_optimizer` over ``named.values()``)
    in the node state (a Flower ``RecordDict``: the SuperNode keeps it between the messages of
    a run, though every message runs in a fresh ClientApp process), keyed by tensor name."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    arrays, steps = {}, []
    for name, param in named.items():
        kept = optimizer.state.get(param, {})
        steps.append(int(kept["step"]) if "step" in kept else 0)
        for moment in MOMENTS if kept else ():
            arrays[f"{name}:{moment}"] = Array(np.ascontiguousarray(kept[moment].detach().cpu().numpy()))
    node_state[OPTIMIZER_KEY] = ArrayRecord(arrays)
    node_state[OPTIMIZER_KEY + "-info"] = ConfigRecord({"method": method, "names": list(named), "steps": steps})


def restore_client_optimizer(node_state, optimizer: torch.optim.Optimizer, named: dict[str, torch.Tensor],
                             method: str) -> tuple[int, str]:
    """Load the AdamW state this site kept after its last round (:func:`keep_client_optimizer`)
    into the fresh ``optimizer`` over ``named.values()``. The state is used only if it belongs
    to these very tensors (same method -- adapter or full model --, names and shapes); else it
    is dropped and the reason returned. Returns ``(step, note)``: the AdamW step count training
    continues from (0: a fresh optimizer) and what happened, for the round's log."""
    if OPTIMIZER_KEY not in node_state or OPTIMIZER_KEY + "-info" not in node_state:
        return 0, "fresh: no optimizer state kept on this node yet"
    arrays, info = node_state[OPTIMIZER_KEY], node_state[OPTIMIZER_KEY + "-info"]
    names, steps = [str(n) for n in info["names"]], [int(s) for s in info["steps"]]
    if str(info["method"]) != method or names != list(named) or len(steps) != len(names):
        return 0, (f"dropped: the kept state is for {info['method']} ({len(names)} tensors), this round trains "
                   f"{method} ({len(named)} tensors)")
    state = {}
    for index, (name, step) in enumerate(zip(names, steps)):
        if step == 0:  # a tensor that got no gradient yet has no AdamW state
            continue
        moments = {m: arrays[f"{name}:{m}"].numpy() if f"{name}:{m}" in arrays else None for m in MOMENTS}
        bad = [m for m, v in moments.items() if v is None or tuple(v.shape) != tuple(named[name].shape)]
        if bad:
            found = ", ".join(f"{m} {'missing' if moments[m] is None else tuple(moments[m].shape)}" for m in bad)
            return 0, f"dropped: {name} is {tuple(named[name].shape)}, its kept state has {found}"
        state[index] = {"step": torch.tensor(float(step)), **{m: torch.from_numpy(v.copy()) for m, v in moments.items()}}
    saved = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
    step = max(steps, default=0)
    return step, f"kept: AdamW continues from step {step}"


def model_layout(model, method: str) -> UpdateLayout:
    return UpdateLayout.of({k: v.detach() for k, v in trainable_tensors(model, method).items()})


def flat_trainable(model, method: str, layout: UpdateLayout) -> np.ndarray:
    return layout.flatten({k: v.detach() for k, v in trainable_tensors(model, method).items()})


@torch.no_grad()
def load_flat(model, method: str, layout: UpdateLayout, vector: np.ndarray) -> None:
    live = trainable_tensors(model, method)
    for name, tensor in layout.unflatten(vector).items():
        live[name].copy_(tensor.to(live[name].dtype))


def decode_aggregate(payload: np.ndarray, total: int, cfg: FLConfig, size: int, private_key=None) -> np.ndarray:
    """One round's aggregate -> that round's weighted mean delta (float64, ``(size,)``).
    ``total``: the round's integer weights summed (public; recorded by the server)."""
    from seekdeep.fl.paillier import decode_sum

    if cfg.secure == "paillier":
        if private_key is None:
            raise ConfigError("key_file", "decoding the encrypted aggregates needs the clients' private key")
        return decode_sum(payload, packing_spec(cfg), private_key, size, int(total), 1)
    mean = np.asarray(payload, dtype=np.float64) / int(total)
    if mean.shape != (size,):
        raise ConfigError("aggregate", f"plaintext aggregate of shape {mean.shape}, expected ({size},)")
    return mean


@dataclass
class GlobalState:
    """The key holders' view: the global model's delta from the public initial model, the
    server optimizer's velocity (FedAvgM) and how many round aggregates went into them."""

    delta: np.ndarray
    velocity: np.ndarray | None
    aggregates: int = 0

    @classmethod
    def zeros(cls, size: int, cfg: FLConfig) -> "GlobalState":
        return cls(np.zeros(size), np.zeros(size) if cfg.server_momentum > 0 else None, 0)

    def apply(self, mean: np.ndarray, cfg: FLConfig) -> None:
        """One round's server step on the mean client delta: FedAvg adds it (``server_lr`` 1,
        no momentum); FedAvgM keeps ``v = momentum * v + mean`` and adds ``server_lr * v``."""
        step = mean
        if self.velocity is not None:
            self.velocity = cfg.server_momentum * self.velocity + mean
            step = self.velocity
        self.delta = self.delta + cfg.server_lr * step
        self.aggregates += 1

    def replay(self, aggregates, cfg: FLConfig, size: int, private_key=None) -> "GlobalState":
        """Apply ``(payload, total)`` aggregates in order."""
        for payload, total in aggregates:
            self.apply(decode_aggregate(payload, total, cfg, size, private_key), cfg)
        return self
