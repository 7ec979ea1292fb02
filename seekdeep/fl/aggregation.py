"""Secure aggregation of model updates: ``SecureAggregation.aggregate`` in one process, and the
pieces the Flower apps run on each side.

The roles are kept apart even in one process, because the Flower apps run the same functions
on different machines:

- a **client** flattens its update (:class:`UpdateLayout`), clips, quantises, packs and
  encrypts it with the shared public key (:func:`seekdeep.fl.paillier.encode_update`);
- the **server** checks every update it receives (:meth:`ServerAggregator.check`: key
  fingerprint, ciphertext count and range; for plaintext updates also finiteness and range)
  and adds the accepted ones homomorphically with integer weights
  (:meth:`ServerAggregator.accumulate`). It holds the public key only;
- a **key holder** (every client shares the key pair) decrypts the sum and divides by the
  total weight (:func:`seekdeep.fl.paillier.decode_sum`).
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from seekdeep.errors import ConfigError
from seekdeep.fl import paillier
from seekdeep.fl.paillier import PackingSpec, UpdateRejected

ENCRYPTIONS = ("paillier", "none")


@dataclass(frozen=True)
class UpdateLayout:
    """Names, shapes and dtypes of the floating-point tensors an update carries, in a fixed
    order: the contract every client's update is checked against."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor]) -> "UpdateLayout":
        names = tuple(sorted(k for k, v in tensors.items() if torch.is_floating_point(v)))
        if not names:
            raise ConfigError("updates", "an update holds no floating-point tensors to average")
        return cls(names, tuple(tuple(tensors[k].shape) for k in names), tuple(str(tensors[k].dtype) for k in names))

    @property
    def size(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def check(self, tensors: dict[str, Any]) -> None:
        """Raise :class:`UpdateRejected` unless ``tensors`` has exactly these names and shapes."""
        got = {k for k, v in tensors.items() if not torch.is_tensor(v) or torch.is_floating_point(v)}
        missing, extra = sorted(set(self.names) - got), sorted(got - set(self.names))
        if missing or extra:
            raise UpdateRejected("wrong-keys", f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                                 f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
        for name, shape in zip(self.names, self.shapes):
            if tuple(tensors[name].shape) != shape:
                raise UpdateRejected("wrong-shape", f"{name} has shape {tuple(tensors[name].shape)}, expected {shape}")

    def flatten(self, tensors: dict[str, torch.Tensor]) -> np.ndarray:
        """The tensors as one (size,) float64 vector, in layout order (checked first)."""
        self.check(tensors)
        if not self.names:
            return np.zeros(0)
        return np.concatenate([tensors[k].detach().to("cpu", torch.float64).reshape(-1).numpy() for k in self.names])

    def unflatten(self, vector: np.ndarray) -> dict[str, torch.Tensor]:
        vector = np.asarray(vector, dtype=np.float64)
        if vector.shape != (self.size,):
            raise UpdateRejected("wrong-shape", f"vector of {vector.shape}, expected ({self.size},)")
        out, offset = {}, 0
        for name, shape, dtype in zip(self.names, self.shapes, self.dtypes):
            n = math.prod(shape)
            out[name] = torch.from_numpy(vector[offset:offset + n].copy()).reshape(shape).to(getattr(torch, dtype.split(".")[-1]))
            offset += n
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes], "dtypes": list(self.dtypes)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "UpdateLayout":
        try:
            return cls(tuple(data["names"]), tuple(tuple(int(d) for d in s) for s in data["shapes"]),
                       tuple(data["dtypes"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError("layout", f"expected names / shapes / dtypes lists ({exc})") from None


class ServerAggregator:
    """What the aggregating server runs: checks each update, then sums the accepted ones.

    With ``public_key`` (Paillier) it only ever sees ciphertexts; it has no way to decrypt
    (there is no private key argument, and :func:`seekdeep.fl.keys.load_public_key` refuses
    key files holding one). With ``public_key=None`` updates are plaintext vectors whose
    finiteness and range (``|x| <= clip``) it checks itself."""

    def __init__(self, spec: PackingSpec, num_values: int, public_key=None):
        from seekdeep.fl.keys import fingerprint

        if public_key is not None and hasattr(public_key, "p"):
            raise ConfigError("public_key", "the server was handed a private key; it takes the public key only")
        self.spec, self.num_values, self.public_key = spec, num_values, public_key
        self.key_fingerprint = fingerprint(public_key) if public_key is not None else None
        if public_key is not None and public_key.n.bit_length() != spec.key_bits:
            raise ConfigError("key_bits", f"the packing expects {spec.key_bits}-bit keys, the public key has "
                              f"{public_key.n.bit_length()} bits")

    @property
    def num_ciphertexts(self) -> int:
        return self.spec.num_ciphertexts(self.num_values)

    def check(self, payload: np.ndarray, key_fingerprint: str | None) -> np.ndarray:
        """The update, checked; raises :class:`UpdateRejected` naming the reason."""
        payload = np.asarray(payload)
        if self.public_key is None:
            if key_fingerprint:
                raise UpdateRejected("wrong-key", "an encrypted update reached a plaintext aggregation")
            if payload.shape != (self.num_values,):
                raise UpdateRejected("wrong-shape", f"{payload.shape} values, expected ({self.num_values},)")
            if not np.issubdtype(payload.dtype, np.floating):
                raise UpdateRejected("wrong-shape", f"dtype {payload.dtype}, expected floating point")
            if not np.isfinite(payload).all():
                raise UpdateRejected("non-finite", f"{int((~np.isfinite(payload)).sum())} NaN/inf value(s)")
            worst = float(np.abs(payload).max()) if payload.size else 0.0
            if worst > self.spec.clip:
                raise UpdateRejected("out-of-range", f"|value| {worst:.4g} exceeds the clip bound {self.spec.clip}")
            return payload.astype(np.float64)
        if key_fingerprint != self.key_fingerprint:
            raise UpdateRejected("wrong-key", f"encrypted under key {key_fingerprint!r}, the federation's is "
                                 f"{self.key_fingerprint!r}")
        width = paillier.ciphertext_bytes(self.public_key)
        if payload.dtype != np.uint8 or payload.shape != (self.num_ciphertexts, width):
            raise UpdateRejected("wrong-shape", f"{payload.dtype} {tuple(payload.shape)}, expected uint8 "
                                 f"({self.num_ciphertexts}, {width}) ciphertexts")
        paillier.ciphertext_ints(payload, self.public_key)  # each in (0, n^2)
        return payload

    def accumulate(self, updates: Sequence[np.ndarray], weights: Sequence[int],
                   accumulator: np.ndarray | None = None) -> np.ndarray:
        """``accumulator + sum_k weights[k] * updates[k]``: ciphertext slot sums (Paillier) or
        the same integer-weighted sum of plaintext vectors (divide by ``sum(weights)`` to get the
        mean). The weights may sum to at most ``spec.total_weight``, the slots' headroom; with an
        accumulator the one-process running total holds ``spec.rounds`` such sums."""
        if not 0 < sum(weights) <= self.spec.total_weight:
            raise ConfigError("weights", f"integer weights sum to {sum(weights)}, the packing holds a total weight of "
                              f"1..{self.spec.total_weight}")
        if self.public_key is not None:
            return paillier.weighted_sum(updates, weights, self.public_key, accumulator)
        total = np.zeros(self.num_values) if accumulator is None or not len(accumulator) else accumulator.copy()
        for update, w in zip(updates, weights):
            total += w * update
        return total


# ----------------------------------------------------------------------------- the seed's call


def _as_tensors(update: Any, adapter_name: str | None, index: int) -> dict[str, torch.Tensor]:
    from seekdeep.peft.io import adapter_tensors, read_adapter_weights

    if isinstance(update, nn.Module):
        if adapter_name is not None:
            return {k: v.detach() for k, v in adapter_tensors(update, adapter_name).items()}
        return update.state_dict()
    if isinstance(update, (str, os.PathLike)):
        path = Path(update)
        if not (path / "adapter_model.safetensors").is_file():
            raise ConfigError("updates", f"updates[{index}] = {path} is not a peft adapter directory "
                              "(no adapter_model.safetensors); accepted: state dicts, models, adapter directories")
        return read_adapter_weights(path)
    if isinstance(update, dict) and all(torch.is_tensor(v) for v in update.values()):
        return update
    raise ConfigError("updates", f"updates[{index}] is a {type(update).__name__}; accepted: a state dict "
                      "(name -> tensor), an nn.Module, or a peft adapter directory")


class SecureAggregation:
    """Weighted averaging of model updates, optionally under packed Paillier encryption."""

    @staticmethod
    def aggregate(updates: Sequence[Any], weights: Sequence[float] | None = None, encryption: str = "paillier", *,
                  bits: int = 16, clip: float | None = None, key_bits: int = 2048, private_key=None,
                  adapter_name: str | None = None, seed: int = 0):
        """The weighted average of ``updates``.

        updates: state dicts, models (``adapter_name``: average that adapter's weights only)
        or peft adapter directories, all with the same tensor names and shapes. weights: one
        non-negative number per update (None: equal); whole numbers (example counts) and short
        rationals are used exactly (the smallest proportional integers, slots sized for their
        sum), other weights are rounded to integers summing to 4096.
        encryption: "paillier" (each update is clipped to ``clip`` -- default: the largest
        |value| of any update --, quantised to ``bits`` bits, packed and encrypted by its
        "client"; the sum is computed on ciphertexts and decrypted once) or "none".
        private_key: the clients' shared key (None: a fresh ``key_bits`` key pair).

        Returns the same kind as the first update: a state dict, a copy of the first model
        with the averaged weights loaded, or a state dict of adapter tensors."""
        if encryption not in ENCRYPTIONS:
            raise ConfigError("encryption", f"unknown {encryption!r}; accepted: {', '.join(ENCRYPTIONS)}")
        if isinstance(updates, (str, os.PathLike, dict, nn.Module)) or not len(updates):
            raise ConfigError("updates", "expected a non-empty list of updates")
        if weights is not None and len(weights) != len(updates):
            raise ConfigError("weights", f"{len(weights)} weights for {len(updates)} updates")
        tensors = [_as_tensors(u, adapter_name, i) for i, u in enumerate(updates)]
        layout = UpdateLayout.of(tensors[0])
        vectors = []
        for i, t in enumerate(tensors):
            try:
                vectors.append(layout.flatten(t))
            except UpdateRejected as exc:
                raise ConfigError("updates", f"updates[{i}] does not match updates[0]: {exc}") from None
            if not np.isfinite(vectors[-1]).all():
                raise ConfigError("updates", f"updates[{i}] holds NaN/inf values")
        raw = [1.0] * len(updates) if weights is None else [float(w) for w in weights]
        int_weights = paillier.exact_integer_weights(raw)
        if int_weights is None:
            int_weights = paillier.integer_weights(raw, 4096)
        total = sum(int_weights)
        if clip is None:
            clip = max(float(np.abs(v).max()) for v in vectors) or 1.0
        spec = PackingSpec(bits=bits, clip=clip, total_weight=total, rounds=1,
                           key_bits=key_bits if private_key is None else private_key.public_key.n.bit_length())
        if encryption == "none":
            server = ServerAggregator(spec, layout.size)
            summed = server.accumulate([np.clip(v, -clip, clip) for v in vectors], int_weights)
            mean = summed / total
        else:
            if private_key is None:
                from phe import generate_paillier_keypair

                _, private_key = generate_paillier_keypair(n_length=key_bits)
            public_key = private_key.public_key
            rng = np.random.default_rng(seed)
            encrypted = [paillier.encode_update(v, spec, public_key, rng)[0] for v in vectors]  # each client
            server = ServerAggregator(spec, layout.size, public_key)
            from seekdeep.fl.keys import fingerprint

            checked = [server.check(e, fingerprint(public_key)) for e in encrypted]
            summed = server.accumulate(checked, int_weights)
            mean = paillier.decode_sum(summed, spec, private_key, layout.size, total)  # the key holder
        averaged = layout.unflatten(mean)
        return _like(updates[0], tensors[0], averaged, adapter_name)


def _like(first: Any, first_tensors: dict[str, torch.Tensor], averaged: dict[str, torch.Tensor],
          adapter_name: str | None):
    # non-floating entries (integer buffers) are taken from the first update
    merged = {k: (averaged[k] if k in averaged else v) for k, v in first_tensors.items()}
    if isinstance(first, nn.Module):
        model = copy.deepcopy(first)
        if adapter_name is not None:
            from seekdeep.peft.io import copy_into_adapter

            copy_into_adapter(model, adapter_name, merged, "SecureAggregation.aggregate")
        else:
            model.load_state_dict(merged)
        return model
    return merged
