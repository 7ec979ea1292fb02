"""Configuration of a federated run (``seekdeep fl``). Imports neither the recipe nor Flower."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from seekdeep.errors import ConfigError

METHODS = ("lora", "full")
STRATEGIES = ("fedavg", "fedprox")
SECURE = ("paillier", "secaggplus", "none")
SPLITS = ("package", "iid")


def _require_int(value: Any, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(name, f"must be an integer >= {minimum}, got {value!r}")


def _require_positive(value: Any, name: str, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ConfigError(name, f"must be a number {'>=' if allow_zero else '>'} 0, got {value!r}")


@dataclass
class FLConfig:
    """Every knob of a federated run; the defaults fit a 2-core CPU in a few minutes."""

    base: str | None = None  # model directory; None: lora -> finetune's default base, full -> a fresh tiny model
    method: str = "lora"  # lora: clients train and send adapter weights only; full: every weight
    lora: str = "r=8,alpha=16,targets=all-linear"
    strategy: str = "fedavg"
    proximal_mu: float = 0.01  # FedProx: weight of (mu / 2) * ||w - w_global||^2 in the local loss
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
        for name, choices in (("method", METHODS), ("strategy", STRATEGIES), ("secure", SECURE), ("split", SPLITS)):
            if getattr(self, name) not in choices:
                raise ConfigError(name, f"unknown {getattr(self, name)!r}; accepted: {', '.join(choices)}")
        for name, minimum in (("num_clients", 1), ("rounds", 1), ("local_steps", 1), ("batch_size", 1),
                              ("seq_len", 8), ("eval_batches", 1), ("seed", 0)):
            _require_int(getattr(self, name), name, minimum)
        _require_int(self.quant_bits, "quant_bits", 2)
        if self.quant_bits > 32:
            raise ConfigError("quant_bits", f"must be <= 32, got {self.quant_bits}")
        if self.key_bits not in (1024, 2048, 3072, 4096):
            raise ConfigError("key_bits", f"must be 1024, 2048, 3072 or 4096, got {self.key_bits!r}")
        if self.min_clients is not None:
            _require_int(self.min_clients, "min_clients", 1)
            if self.min_clients > self.num_clients:
                raise ConfigError("min_clients", f"{self.min_clients} exceeds num_clients={self.num_clients}")
        _require_positive(self.proximal_mu, "proximal_mu", allow_zero=True)
        _require_positive(self.clip, "clip")
        _require_positive(self.round_timeout, "round_timeout")
        if self.lr is not None:
            _require_positive(self.lr, "lr")
        if self.resume not in (None, "auto"):
            raise ConfigError("resume", f"accepted: 'auto' (continue the run in --output-dir), got {self.resume!r}")
        if self.secure == "secaggplus" and self.num_clients < 3:
            raise ConfigError("secure", "SecAgg+ needs at least 3 clients (its secret shares need a quorum)")
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
