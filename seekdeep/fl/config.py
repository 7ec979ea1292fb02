"""Configuration of a federated run (``seekdeep fl``). Imports neither the recipe nor Flower."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from seekdeep.errors import ConfigError
from seekdeep.files import check_model_path
from seekdeep.validate import MAX_BATCH, MAX_SEED, MAX_SEQ_LEN, check_float, check_int

METHODS = ("lora", "full")
STRATEGIES = ("fedavg", "fedprox")
SECURE = ("paillier", "secaggplus", "none")
SPLITS = ("package", "iid")
CLIENT_OPTIMIZERS = ("keep", "reset")
LR_SCHEDULES = ("constant", "cosine")


MAX_CLIENTS = 1024  # each client is a SuperNode process here


@dataclass
class FLConfig:
    """Every knob of a federated run; the defaults fit a 2-core CPU in a few minutes."""

    base: str | None = None  # model directory; None: lora -> finetune's default base, full -> a fresh tiny model
    method: str = "lora"  # lora: clients train and send adapter weights only; full: every weight
    lora: str = "r=8,alpha=16,targets=all-linear"
    strategy: str = "fedavg"
    proximal_mu: float = 0.01  # FedProx: weight of (mu / 2) * ||w - w_global||^2 in the local loss
    server_lr: float = 1.0  # the global step is server_lr * (mean client delta, or its momentum): 1 = FedAvg
    server_momentum: float = 0.0  # FedAvgM: v = momentum * v + mean delta; 0 = none
    secure: str = "paillier"  # paillier (packed, clients' shared key), secaggplus (Flower's SecAgg+), none
    split: str = "package"  # package: each client gets whole standard-library packages (non-IID); iid: modules dealt round-robin
    packages: str | None = None  # comma-separated packages to federate (default: a fixed set, see fl recipe)
    num_clients: int = 3
    min_clients: int | None = None  # fewest accepted updates that make a round (None: num_clients - 1, at least 1)
    rounds: int = 3
    local_steps: int = 20  # optimizer steps per client per round (local-only models train rounds * local_steps)
    batch_size: int = 8
    seq_len: int = 128
    lr: float | None = None  # None: 3e-3 for lora, 1e-3 for full
    # keep: each site's AdamW state carries over between rounds (in its Flower node state; a
    # restarted SuperNode starts afresh); reset: a fresh AdamW every round
    client_optimizer: str = "keep"
    # the clients' lr over the GLOBAL step index (round - 1) * local_steps + k of rounds * local_steps
    # (the round and the total come in the server's message, so a restarted site continues the curve):
    # constant, or cosine down to min_lr_ratio * lr; both after warmup_steps of linear warmup
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine only: the last step's lr is min_lr_ratio * lr
    quant_bits: int = 16
    clip: float = 0.1  # per-round update deltas are clipped to [-clip, clip] before quantisation
    key_bits: int = 2048
    eval_batches: int = 8
    local_only: bool = True  # also train each client's local-only model (the floor to compare against)
    round_timeout: float = 600.0  # seconds the server waits for a round's replies
    output_dir: str = "runs/fl"
    resume: str | None = None  # "auto": continue the run in output_dir from its last completed round
    overwrite: bool = False
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name, choices in (("method", METHODS), ("strategy", STRATEGIES), ("secure", SECURE), ("split", SPLITS),
                              ("client_optimizer", CLIENT_OPTIMIZERS), ("lr_schedule", LR_SCHEDULES)):
            if getattr(self, name) not in choices:
                raise ConfigError(name, f"unknown {getattr(self, name)!r}; accepted: {', '.join(choices)}")
        check_int("num_clients", self.num_clients, 1, MAX_CLIENTS)
        check_int("rounds", self.rounds, 1, 10**5)
        check_int("local_steps", self.local_steps)
        check_int("batch_size", self.batch_size, 1, MAX_BATCH)
        check_int("seq_len", self.seq_len, 8, MAX_SEQ_LEN)
        check_int("eval_batches", self.eval_batches)
        check_int("warmup_steps", self.warmup_steps, 0, self.rounds * self.local_steps)  # 0: none
        check_float("min_lr_ratio", self.min_lr_ratio, 0, 1)  # 0: cosine down to zero
        check_int("seed", self.seed, 0, MAX_SEED)
        check_int("quant_bits", self.quant_bits, 2, 32)
        if self.key_bits not in (1024, 2048, 3072, 4096):
            raise ConfigError("key_bits", f"must be 1024, 2048, 3072 or 4096, got {self.key_bits!r}")
        if self.min_clients is not None:
            check_int("min_clients", self.min_clients, 1, MAX_CLIENTS)
            if self.min_clients > self.num_clients:
                raise ConfigError("min_clients", f"{self.min_clients} exceeds num_clients={self.num_clients}")
        check_float("proximal_mu", self.proximal_mu, 0, 1e3)  # 0: FedAvg's local loss
        check_float("server_lr", self.server_lr, 0, 100, lo_open=True)
        check_float("server_momentum", self.server_momentum, 0, 1, hi_open=True)  # 0: plain FedAvg
        check_float("clip", self.clip, 0, 1e3, lo_open=True)
        check_float("round_timeout", self.round_timeout, 0, 7 * 86400, lo_open=True)
        check_float("lr", self.lr, 0, 10, lo_open=True, optional=True)
        check_model_path("base", self.base)
        if self.resume not in (None, "auto"):
            raise ConfigError("resume", f"accepted: 'auto' (continue the run in --output-dir), got {self.resume!r}")
        if self.secure == "secaggplus" and self.num_clients < 3:
            raise ConfigError("secure", "SecAgg+ needs at least 3 clients (its secret shares need a quorum)")
        if self.secure == "secaggplus" and (self.server_lr != 1.0 or self.server_momentum != 0.0):
            raise ConfigError("server_lr", "server_lr / server_momentum are applied by the key-holding clients "
                              "(--secure paillier or none); SecAgg+ runs Flower's legacy FedAvg / FedProx: leave them "
                              "at 1.0 / 0.0")
        if self.method == "lora":
            from seekdeep.peft.config import parse_lora_spec

            parse_lora_spec(self.lora)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (3e-3 if self.method == "lora" else 1e-3)

    @property
    def min_train_clients(self) -> int:
        return self.min_clients if self.min_clients is not None else max(1, self.num_clients - 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FLConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError("config", f"unknown keys {sorted(unknown)}")
        return cls(**data)
