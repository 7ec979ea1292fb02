"""Packed Paillier (BatchCrypt-style): many quantised values per Paillier plaintext.

One Paillier encryption costs milliseconds and turns a value into a ciphertext twice the key
size (512 bytes at 2048 bits), so encrypting each float on its own is ~128x the bytes of
float32 and far too slow for a model. BatchCrypt's answer, followed here:

1. **clip** every value to ``[-clip, clip]`` and **quantise** it to ``bits`` bits with
   stochastic rounding (unbiased: the expected quantised value is the clipped value);
2. store it **offset-binary** (``0 .. 2**bits - 1``, no sign), so adding ciphertexts adds the
   slots with no borrow between them;
3. give every slot enough **headroom** for the largest possible sum: integer weights summing
   to at most ``total_weight`` (``rounds`` such sums for a one-process running total), so a
   slot holds up to ``rounds * total_weight * (2**bits - 1)`` and the sum can never carry into
   the next slot;
4. **pack** ``(key_bits - 1) // slot_bits`` slots into one plaintext (113 at 2048 bits,
   bits=16, three clients with weight 1: 18-bit slots; the Flower path's one spare bit for
   unequal weights, total weight up to 8: 19-bit slots, 107 per plaintext).

The bounds are checked before encryption (a value outside its slot raises), not hoped for. The
decoded weighted mean is within one quantisation step ``2 * clip / (2**bits - 1)`` of the mean
of the clipped values.

Encryption and decryption use ``phe`` (python-paillier, gmpy2-accelerated) raw operations;
the homomorphic weighted sum uses its ``EncryptedNumber`` arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from seekdeep.errors import ConfigError


class UpdateRejected(ValueError):
    """An update that cannot be aggregated; ``reason`` is one of ``REJECT_REASONS``."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


#: the reasons an update is refused, each named in the round's log
REJECT_REASONS = ("wrong-key", "wrong-keys", "wrong-shape", "non-finite", "out-of-range", "bad-ciphertext", "client-error",
                  "bad-metadata")


def _require_int(value: Any, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(name, f"must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class PackingSpec:
    """How values become slots and slots become plaintexts.

    bits: quantisation bits per value (r); clip: values are clipped to ``[-clip, clip]``;
    total_weight: the integer weights of one round sum to at most this (the slots' headroom);
    rounds: how many such sums one ciphertext may accumulate (1 on the Flower path, which keeps
    every round's aggregate apart); key_bits: the Paillier modulus size."""

    bits: int = 16
    clip: float = 1.0
    total_weight: int = 1
    rounds: int = 1
    key_bits: int = 2048

    def __post_init__(self) -> None:
        _require_int(self.bits, "bits", 2)
        if self.bits > 32:
            raise ConfigError("bits", f"must be <= 32 (slots are unpacked through uint64), got {self.bits}")
        _require_int(self.total_weight, "total_weight", 1)
        _require_int(self.rounds, "rounds", 1)
        _require_int(self.key_bits, "key_bits", 256)
        if isinstance(self.clip, bool) or not isinstance(self.clip, (int, float)) or not math.isfinite(self.clip) \
                or not self.clip > 0:
            raise ConfigError("clip", f"must be a finite number > 0, got {self.clip!r}")
        if self.slot_bits > 63:
            raise ConfigError("total_weight", f"slots of {self.slot_bits} bits (bits={self.bits}, total_weight="
                              f"{self.total_weight}, rounds={self.rounds}) do not fit uint64; lower one of them")
        if self.slots < 1:
            raise ConfigError("key_bits", f"{self.key_bits}-bit keys cannot hold one {self.slot_bits}-bit slot")

    @property
    def levels(self) -> int:
        """Largest quantised value of one update: 2**bits - 1."""
        return (1 << self.bits) - 1

    @property
    def max_slot(self) -> int:
        """The largest value a slot can reach after ``rounds`` weighted sums."""
        return self.rounds * self.total_weight * self.levels

    @property
    def slot_bits(self) -> int:
        """Bits per slot: exactly enough for ``max_slot`` (so no sum carries into the next slot)."""
        return self.max_slot.bit_length()

    @property
    def slots(self) -> int:
        """Values per plaintext; the packed integer stays below 2**(key_bits - 1) < n."""
        return (self.key_bits - 1) // self.slot_bits

    @property
    def step(self) -> float:
        """One quantisation step: the bound on the error of the decoded mean."""
        return 2.0 * self.clip / self.levels

    def num_ciphertexts(self, num_values: int) -> int:
        return -(-num_values // self.slots)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PackingSpec":
        known = {"bits", "clip", "total_weight", "rounds", "key_bits"}
        unknown = set(data) - known
        if unknown:
            raise ConfigError("packing", f"unknown keys {sorted(unknown)}; accepted: {sorted(known)}")
        return cls(**data)


# ----------------------------------------------------------------------------- quantise / pack


def quantize(values: np.ndarray, spec: PackingSpec, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """(N,) floats -> (N,) uint64 in ``[0, levels]`` by clipping and stochastic rounding; also
    returns how many values were clipped. Non-finite values raise (they have no slot)."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise UpdateRejected("non-finite", f"{bad} NaN/inf value(s) in the update")
    clipped = int((np.abs(values) > spec.clip).sum())
    scaled = (np.clip(values, -spec.clip, spec.clip) + spec.clip) / spec.step  # in [0, levels]
    low = np.floor(scaled)
    q = low + (rng.random(scaled.shape) < (scaled - low))
    q = np.clip(q, 0, spec.levels).astype(np.uint64)  # float rounding at the top edge only
    return q, clipped


def dequantize_sum(slot_sums: np.ndarray, spec: PackingSpec, total_weight: int, rounds: int) -> np.ndarray:
    """Slot sums of ``rounds`` rounds of weights summing to ``total_weight`` -> the sum over
    rounds of each round's weighted mean (float64)."""
    return slot_sums.astype(np.float64) * (spec.step / total_weight) - rounds * spec.clip


def pack(q: np.ndarray, spec: PackingSpec) -> list[int]:
    """(N,) slot values -> plaintext integers holding ``spec.slots`` slots each (slot i of a
    plaintext at bits ``[i * slot_bits, (i + 1) * slot_bits)``). Checks every slot bound."""
    q = np.asarray(q, dtype=np.uint64).reshape(-1)
    if q.size and int(q.max()) > spec.max_slot:
        raise UpdateRejected("out-of-range", f"slot value {int(q.max())} exceeds the packing bound {spec.max_slot}")
    s, b = spec.slots, spec.slot_bits
    n_ct = spec.num_ciphertexts(q.size)
    padded = np.zeros(n_ct * s, dtype=np.uint64)
    padded[:q.size] = q
    bits = ((padded[:, None] >> np.arange(b, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)  # (n_ct*s, b) LSB first
    bits = bits.reshape(n_ct, s * b)
    width = -(-s * b // 8) * 8
    if width != s * b:
        bits = np.pad(bits, ((0, 0), (0, width - s * b)))
    raw = np.packbits(bits, axis=1, bitorder="little")  # (n_ct, width / 8) little-endian bytes
    return [int.from_bytes(row.tobytes(), "little") for row in raw]


def unpack(plaintexts: Sequence[int], spec: PackingSpec, num_values: int, max_slot: int | None = None) -> np.ndarray:
    """Plaintext integers -> (num_values,) uint64 slot values. A plaintext with bits above its
    last slot, or a slot above ``max_slot``, raises: only an out-of-range (or foreign-key)
    ciphertext can produce one."""
    s, b = spec.slots, spec.slot_bits
    limit = 1 << (s * b)
    nbytes = -(-s * b // 8)
    rows = []
    for i, m in enumerate(plaintexts):
        if not 0 <= m < limit:
            raise UpdateRejected("out-of-range", f"plaintext {i} has bits above its {s} slots: an update was "
                                 "encoded out of range or under another key")
        rows.append(np.frombuffer(m.to_bytes(nbytes, "little"), dtype=np.uint8))
    if not rows:
        return np.zeros(0, dtype=np.uint64)
    bits = np.unpackbits(np.stack(rows), axis=1, bitorder="little")[:, :s * b].reshape(-1, b)  # (n_ct*s, b)
    weights = np.uint64(1) << np.arange(b, dtype=np.uint64)
    values = (bits.astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)[:num_values]
    bound = spec.max_slot if max_slot is None else max_slot
    if values.size and int(values.max()) > bound:
        raise UpdateRejected("out-of-range", f"slot sum {int(values.max())} exceeds {bound}: an update was encoded "
                             "out of range")
    return values


# ----------------------------------------------------------------------------- encrypt / sum / decrypt


def ciphertext_bytes(public_key) -> int:
    """Bytes of one serialised ciphertext: an integer below n**2."""
    return -(-(public_key.n * public_key.n).bit_length() // 8)


def encrypt(plaintexts: Sequence[int], public_key) -> np.ndarray:
    """Plaintext integers -> (n_ct, ciphertext_bytes) uint8 array (big-endian ciphertexts)."""
    width = ciphertext_bytes(public_key)
    out = np.empty((len(plaintexts), width), dtype=np.uint8)
    for i, m in enumerate(plaintexts):
        out[i] = np.frombuffer(public_key.raw_encrypt(m).to_bytes(width, "big"), dtype=np.uint8)
    return out


def ciphertext_ints(array: np.ndarray, public_key) -> list[int]:
    """(n_ct, width) uint8 -> ciphertext integers, each checked to lie in (0, n**2)."""
    array = np.asarray(array)
    width = ciphertext_bytes(public_key)
    if array.dtype != np.uint8 or array.ndim != 2 or array.shape[1] != width:
        raise UpdateRejected("bad-ciphertext", f"expected a (n, {width}) uint8 array, got {array.dtype} "
                             f"{tuple(array.shape)}")
    nsquare = public_key.nsquare
    ints = [int.from_bytes(row.tobytes(), "big") for row in array]
    for i, c in enumerate(ints):
        if not 0 < c < nsquare:
            raise UpdateRejected("bad-ciphertext", f"ciphertext {i} is not in (0, n^2)")
    return ints


def encode_update(values: np.ndarray, spec: PackingSpec, public_key, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Client side: floats -> encrypted packed array (and the number of clipped values)."""
    q, clipped = quantize(values, spec, rng)
    return encrypt(pack(q, spec), public_key), clipped


def weighted_sum(ciphertexts: Sequence[np.ndarray], weights: Sequence[int], public_key,
                 accumulator: np.ndarray | None = None) -> np.ndarray:
    """Server side: ``accumulator + sum_k weights[k] * ciphertexts[k]`` computed on ciphertexts
    only (Enc(a) * Enc(b) = Enc(a + b), Enc(a) ** w = Enc(w * a)). Needs the public key alone."""
    from phe import EncryptedNumber

    if len(ciphertexts) != len(weights) or not ciphertexts:
        raise ConfigError("weights", f"one integer weight per update is needed, got {len(weights)} for "
                          f"{len(ciphertexts)} updates")
    for w in weights:
        _require_int(w, "weights", 0)
    columns = [ciphertext_ints(c, public_key) for c in ciphertexts]
    if accumulator is not None and len(accumulator):
        columns.append(ciphertext_ints(accumulator, public_key))
        weights = [*weights, 1]
    lengths = {len(c) for c in columns}
    if len(lengths) != 1:
        raise UpdateRejected("wrong-shape", f"updates hold different numbers of ciphertexts: {sorted(lengths)}")
    width = ciphertext_bytes(public_key)
    out = np.empty((lengths.pop(), width), dtype=np.uint8)
    for i, cells in enumerate(zip(*columns)):
        total = None
        for c, w in zip(cells, weights):
            term = EncryptedNumber(public_key, c, 0) * int(w)
            total = term if total is None else total + term
        out[i] = np.frombuffer(total.ciphertext(be_secure=False).to_bytes(width, "big"), dtype=np.uint8)
    return out


def decrypt(array: np.ndarray, private_key) -> list[int]:
    """Key holder: (n_ct, width) uint8 ciphertexts -> plaintext integers."""
    return [private_key.raw_decrypt(c) for c in ciphertext_ints(array, private_key.public_key)]


def decode_sum(array: np.ndarray, spec: PackingSpec, private_key, num_values: int, total_weight: int,
               rounds: int = 1) -> np.ndarray:
    """Key holder: the encrypted slot sums of ``rounds`` rounds -> (num_values,) float64 sum of
    each round's weighted mean."""
    bound = rounds * total_weight * spec.levels
    slot_sums = unpack(decrypt(array, private_key), spec, num_values, max_slot=bound)
    return dequantize_sum(slot_sums, spec, total_weight, rounds)


def integer_weights(weights: Sequence[float], total: int) -> list[int]:
    """Non-negative weights -> integers summing exactly to ``total`` (largest remainder), which
    homomorphic scalar multiplication needs. Equal weights stay exactly equal when ``total`` is
    a multiple of their count."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or not w.size or not np.isfinite(w).all() or (w < 0).any() or not w.sum() > 0:
        raise ConfigError("weights", f"expected finite non-negative weights with a positive sum, got {list(weights)}")
    exact = w / w.sum() * total
    base = np.floor(exact).astype(np.int64)
    remainder = total - int(base.sum())
    order = np.argsort(-(exact - base), kind="stable")
    base[order[:remainder]] += 1
    return [int(x) for x in base]


def exact_integer_weights(weights: Sequence[float], limit: int = 1 << 16) -> list[int] | None:
    """The smallest integers proportional to ``weights`` (example counts, or any rationals with
    small denominators: the lcm of the denominators, then divided by the gcd) when they sum to
    at most ``limit``: homomorphic scalar weights that are exactly the requested ones. None
    otherwise."""
    from fractions import Fraction

    if not len(weights) or not all(isinstance(w, (int, float, np.integer, np.floating)) and math.isfinite(w) and w >= 0
                                   for w in weights):
        return None
    fractions = [Fraction(float(w)).limit_denominator(1 << 20) for w in weights]
    if any(float(f) != float(w) for f, w in zip(fractions, weights)):
        return None  # not a short rational: no small exact integers
    denominator = math.lcm(*(f.denominator for f in fractions))
    ints = [int(f * denominator) for f in fractions]
    divisor = math.gcd(*ints)
    if divisor == 0:
        return None
    ints = [w // divisor for w in ints]
    return ints if sum(ints) <= limit else None


def round_weights(weights: Sequence[float], capacity: int) -> tuple[list[int], bool]:
    """One round's integer weights, summing to at most ``capacity`` (the packing's headroom):
    the exact proportions when they fit (equal weights of any number of clients up to
    ``capacity``, example counts whose gcd-reduced sum fits), else the closest integers summing
    to ``capacity`` (largest remainder). Returns (weights, exact)."""
    _require_int(capacity, "capacity", 1)
    exact = exact_integer_weights(weights, limit=capacity)
    if exact is not None:
        return exact, True
    return integer_weights(weights, capacity), False


def weight_capacity(num_clients: int, bits: int, spare_bits: int = 1) -> int:
    """The largest total integer weight whose slot sum fits the bits ``num_clients`` clients of
    weight 1 need plus ``spare_bits``: K=3, 16 bits, one spare bit -> 19-bit slots, total 8."""
    _require_int(num_clients, "num_clients", 1)
    levels = (1 << bits) - 1
    slot_bits = (num_clients * levels).bit_length() + spare_bits
    return ((1 << slot_bits) - 1) // levels
