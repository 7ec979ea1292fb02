"""What the ServerApp and the ClientApp share: the run settings, the initial model, the layout
of an update, the packing, and the decoding of the global model.

The global model is never held in plaintext by the server. It is ``init + sum over rounds of
each round's weighted mean delta``; the server keeps that sum as one vector of Paillier
ciphertexts (a running homomorphic sum, so its size does not grow with the rounds) and sends it
to the clients, who decrypt it with the key pair they share and add it to the public initial
model (``init_dir``, the same files on every site).
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
from seekdeep.fl.paillier import PackingSpec, round_weight_total

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
    """Slots with room for ``cfg.rounds`` rounds of weights summing to lcm(1..num_clients)."""
    return PackingSpec(bits=cfg.quant_bits, clip=cfg.clip, total_weight=round_weight_total(cfg.num_clients),
                       rounds=cfg.rounds, key_bits=cfg.key_bits)


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


def trainable_tensors(model, method: str) -> dict[str, torch.Tensor]:
    """The live tensors an update carries: the adapter's (LoRA) or every parameter (full)."""
    if method == "lora":
        from seekdeep.peft.io import adapter_tensors

        return adapter_tensors(model, ADAPTER)
    return dict(model.named_parameters())


def model_layout(model, method: str) -> UpdateLayout:
    return UpdateLayout.of({k: v.detach() for k, v in trainable_tensors(model, method).items()})


def flat_trainable(model, method: str, layout: UpdateLayout) -> np.ndarray:
    return layout.flatten({k: v.detach() for k, v in trainable_tensors(model, method).items()})


@torch.no_grad()
def load_flat(model, method: str, layout: UpdateLayout, vector: np.ndarray) -> None:
    live = trainable_tensors(model, method)
    for name, tensor in layout.unflatten(vector).items():
        live[name].copy_(tensor.to(live[name].dtype))


def decode_global_delta(payload: np.ndarray, rounds_accumulated: int, cfg: FLConfig, layout: UpdateLayout,
                        private_key=None) -> np.ndarray:
    """The running sum the server sent -> the float delta to add to the initial model."""
    from seekdeep.fl.paillier import decode_sum

    if rounds_accumulated == 0 or payload.size == 0:
        return np.zeros(layout.size)
    spec = packing_spec(cfg)
    if cfg.secure == "paillier":
        if private_key is None:
            raise ConfigError("key_file", "decoding the encrypted global model needs the clients' private key")
        return decode_sum(payload, spec, private_key, layout.size, spec.total_weight, rounds_accumulated)
    return np.asarray(payload, dtype=np.float64) / spec.total_weight
