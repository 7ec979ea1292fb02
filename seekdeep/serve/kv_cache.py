"""Paged KV cache: a block allocator, per-layer slot pools, and the per-forward view the
unmodified model code writes into.

Every request owns a list of fixed-size blocks; token ``p`` of a request lives in pool slot
``block_ids[p // block_size] * block_size + p % block_size``. Block 0 is a *null block*
that is never handed out: padding positions point at it.

The model's attention modules only know the contiguous cache protocol
(``cache.update(layer_idx, k, v) -> (k_all, v_all)``, ``cache.layers[i].backend_state``,
``cache.seq_len``). :class:`StepCache` speaks it for one batched forward: every row's tokens
are laid out *left-padded*, i.e. right-aligned to ``past_len + q_len`` key slots, and the
step's ``attention_mask`` marks the padding. ``update`` scatters the new keys/values into
the pools and gathers each row's full history back into a dense (B, H, K, D) tensor. Rows of
one forward must add the same number of tokens (the runner groups them), so a row's tokens
are always contiguous and left padding is the only padding.

Per-token backend state (the DSA indexer's ``index_k``, (B, T, Di)) is paged the same way:
before the forward each layer's ``backend_state`` receives the gathered past, after it the
new tail is scattered back.

Prefix caching (:class:`BlockAllocator`): a full block's slots hold keys, values *and* the
per-token backend state of its tokens, all of which depend only on the tokens up to the
block's end (attention is causal; the DSA indexer's ``index_k`` of a token is a projection of
that token's hidden state). A block registered under its chained content hash is therefore
shared as a whole, index state included, by every request whose prompt starts with the same
tokens under the same model. Backends whose state summarises *groups* of tokens (DSA block
mode) are refused by :func:`probe_layer_specs`, so nothing unshareable is ever paged.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from seekdeep.errors import ConfigError


class NoFreeBlocksError(RuntimeError):
    """The allocator cannot satisfy a request; the scheduler preempts and retries."""


def hash_block(parent: bytes, tokens, salt: bytes = b"") -> bytes:
    """Content hash of one full KV block, chained over every block before it.

    ``parent`` is the previous block's hash (``salt`` for the first block: the model, adapter,
    backend and image identity the keys and values depend on), so equal hashes mean equal
    token prefixes under the same model. 128-bit BLAKE2b: a collision would silently serve
    another prompt's keys, which Python's 64-bit ``hash`` makes too likely at scale."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(salt)
    h.update(array("q", tokens).tobytes())
    return h.digest()


class BlockAllocator:
    """KV-cache blocks ``1 .. num_blocks - 1`` (block 0 is the null block), reference counted.

    With ``prefix_caching`` a full block can be *registered* under the hash of its contents
    (:func:`hash_block`); a later request whose prompt starts with the same tokens takes a
    reference to it (:meth:`acquire`) instead of recomputing it. A block whose last reference
    goes stays registered but free, in LRU order; it is evicted (unregistered and handed out)
    only when no never-registered block is free. Shared blocks are never written: a request
    writes only into blocks past its cached prefix, which it holds alone.
    """

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False):
        if num_blocks < 2:
            raise ConfigError("num_blocks", f"need at least 2 (one is the null block), got {num_blocks}")
        if block_size < 1:
            raise ConfigError("block_size", f"must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        # LIFO: a just-freed (cache-warm) block is handed out first.
        self._free = list(range(num_blocks - 1, 0, -1))
        self._refs = [0] * num_blocks
        self._cached: dict[bytes, int] = {}  # content hash -> block
        self._hash_of: dict[int, bytes] = {}  # block -> its content hash
        self._evictable: OrderedDict[int, None] = OrderedDict()  # registered, unreferenced; oldest first
        self.num_evictions = 0

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: never-registered free ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks referenced by at least one request."""
        return self.num_usable - self.num_free

    @property
    def num_cached(self) -> int:
        """Registered blocks (referenced or not)."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks held by requests (0.0 .. 1.0); cached free blocks count as free."""
        return self.num_used / self.num_usable

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise NoFreeBlocksError(f"asked for {n} blocks, {self.num_free} free")
        take = min(n, len(self._free))
        taken = self._free[len(self._free) - take :][::-1] if take else []
        del self._free[len(self._free) - take :]
        while len(taken) < n:  # evict the least recently used cached blocks
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._hash_of.pop(block)]
            self.num_evictions += 1
            taken.append(block)
        for block in taken:
            self._refs[block] = 1
        return taken

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block. Freed in reverse so a sequence's tail, the part
        least likely to be shared, is evicted before its head."""
        for block in reversed(blocks):
            refs = self._refs[block] - 1
            if refs < 0:
                raise RuntimeError(f"block {block} freed more often than it was allocated")
            self._refs[block] = refs
            if refs == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    # -- prefix caching
    def lookup(self, block_hash: bytes) -> int | None:
        """The registered block holding these contents, or None."""
        return self._cached.get(block_hash)

    def acquire(self, block: int) -> None:
        """Take one more reference to a registered block (a prefix-cache hit)."""
        if self._refs[block] == 0:
            del self._evictable[block]
        self._refs[block] += 1

    def register(self, block: int, block_hash: bytes) -> bool:
        """Make a full, computed block findable by its contents. False when caching is off,
        the block is already registered, or another block already holds the same contents
        (this one then stays private and is recycled when freed)."""
        if not self.prefix_caching or block in self._hash_of or block_hash in self._cached:
            return False
        self._cached[block_hash] = block
        self._hash_of[block] = block_hash
        return True

    def reset_prefix_cache(self) -> int:
        """Unregister every unreferenced cached block (e.g. after the model's weights changed);
        returns how many were dropped. Blocks still in use stay registered until freed."""
        dropped = 0
        while self._evictable:
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._hash_of.pop(block)]
            self._free.append(block)
            dropped += 1
        return dropped

    def check(self) -> None:
        """Raise AssertionError unless every usable block is exactly one of: free, evictable,
        referenced (tests call this after soaks and cancellations)."""
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free) and not (free & evictable), "a block is on a free list twice"
        for block in range(1, self.num_blocks):
            refs = self._refs[block]
            assert refs >= 0, f"block {block} has {refs} references"
            assert (refs == 0) == (block in free or block in evictable), f"block {block}: {refs} refs, listed free: " \
                f"{block in free or block in evictable}"
            assert (block in evictable) <= (block in self._hash_of), f"evictable block {block} is not registered"
        assert all(self._cached[h] == b for b, h in self._hash_of.items()), "hash tables disagree"


@dataclass
class LayerSpec:
    """Per-token tensor shapes of one layer's cache, learned by probing the model."""

    k_shape: tuple[int, int]  # (Hkv, Dk)
    v_shape: tuple[int, int]  # (Hkv, Dv)
    dtype: torch.dtype
    states: dict[str, tuple[tuple[int, ...], torch.dtype]] = field(default_factory=dict)  # name -> (tail, dtype)

    def bytes_per_token(self) -> int:
        size = torch.empty((), dtype=self.dtype).element_size()
        total = (self.k_shape[0] * self.k_shape[1] + self.v_shape[0] * self.v_shape[1]) * size
        for tail, dtype in self.states.values():
            n = 1
            for d in tail:
                n *= d
            total += n * torch.empty((), dtype=dtype).element_size()
        return total


class _ProbeCache:
    """Contiguous cache used once to learn each layer's k / v / backend-state shapes."""

    def __init__(self, num_layers: int):
        from seekdeep.models.common import KVCache

        self.inner = KVCache(num_layers)

    @property
    def layers(self):
        return self.inner.layers

    @property
    def seq_len(self) -> int:
        return self.inner.seq_len

    def update(self, layer_idx, k, v):
        return self.inner.update(layer_idx, k, v)


@torch.no_grad()
def probe_layer_specs(model, device: torch.device) -> list[LayerSpec]:
    """Run the model on 3 tokens with a contiguous cache and read every layer's per-token shapes.

    Raises ConfigError if a backend keeps state that is not one entry per token (such state
    cannot be paged)."""
    num_layers = len(model.model.layers)
    probe = _ProbeCache(num_layers)
    ids = torch.zeros(1, 3, dtype=torch.long, device=device)
    model(ids, past_key_values=probe, use_cache=True, logits_to_keep=1)
    specs = []
    for idx, layer in enumerate(probe.layers):
        if layer.k is None:
            raise ConfigError("model", f"layer {idx} never wrote to the KV cache; the paged engine needs every layer cached")
        states = {}
        for name, value in layer.backend_state.items():
            if not isinstance(value, torch.Tensor):
                continue
            if value.dim() < 2 or value.shape[0] != 1 or value.shape[1] != 3:
                raise ConfigError(
                    "attention_backend",
                    f"layer {idx} keeps backend_state[{name!r}] of shape {tuple(value.shape)}; the paged KV cache "
                    "pages per-token state only, shaped (batch, tokens, ...)",
                )
            states[name] = (tuple(value.shape[2:]), value.dtype)
        specs.append(LayerSpec(tuple(layer.k.shape[1::2]), tuple(layer.v.shape[1::2]), layer.k.dtype, states))
    return specs


class PagedKVCache:
    """Slot pools for every layer: keys (Hkv, S, Dk), values (Hkv, S, Dv) and per-token
    backend state (S, ...), with ``S = num_blocks * block_size`` slots. Heads come first so a
    gather copies whole (tokens, D) runs per head, the layout attention reads fastest."""

    def __init__(self, specs: list[LayerSpec], num_blocks: int, block_size: int, device: torch.device):
        self.specs = specs
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.device = device
        slots = num_blocks * block_size
        # zeros, not empty: padding gathers the null block, and garbage there could be NaN,
        # which a zero attention weight does not cancel (0 * NaN = NaN).
        self.k = [torch.zeros(s.k_shape[0], slots, s.k_shape[1], dtype=s.dtype, device=device) for s in specs]
        self.v = [torch.zeros(s.v_shape[0], slots, s.v_shape[1], dtype=s.dtype, device=device) for s in specs]
        self.states = [
            {name: torch.zeros(slots, *tail, dtype=dt, device=device) for name, (tail, dt) in s.states.items()}
            for s in specs
        ]

    def pools(self) -> list[torch.Tensor]:
        out = self.k + self.v
        for layer in self.states:
            out.extend(layer.values())
        return out

    @staticmethod
    def blocks_that_fit(specs: list[LayerSpec], memory_bytes: int, block_size: int) -> int:
        per_block = sum(s.bytes_per_token() for s in specs) * block_size
        return max(2, memory_bytes // per_block)


class _StepLayer:
    __slots__ = ("backend_state",)

    def __init__(self, backend_state: dict):
        self.backend_state = backend_state


class StepCache:
    """The cache the model sees during one batched forward over paged storage.

    ``slot_index`` (B, K) holds the pool slot of every key position (0 = null slot for
    padding); the last ``q_len`` columns are this step's tokens. ``seq_len`` is
    ``K - q_len``, which is what the decoder adds the new tokens to.
    """

    def __init__(self, paged: PagedKVCache, slot_index: torch.Tensor, q_len: int):
        self.paged = paged
        self.slot_index = slot_index  # (B, K)
        self.q_len = q_len
        batch, k_len = slot_index.shape
        self.past_len = k_len - q_len
        self._flat = slot_index.reshape(-1)  # (B*K,)
        self._new = slot_index[:, self.past_len :].reshape(-1)  # (B*Tq,)
        past = slot_index[:, : self.past_len].reshape(-1)
        self.layers = []
        for states in paged.states:
            backend_state = {
                name: pool.index_select(0, past).view(batch, self.past_len, *pool.shape[1:])  # (B, Lpast, ...)
                for name, pool in states.items()
            }
            self.layers.append(_StepLayer(backend_state))

    @property
    def seq_len(self) -> int:
        return self.past_len

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k: (B, Hkv, Tq, Dk), v: (B, Hkv, Tq, Dv) -> every key / value of the rows, (B, Hkv, K, D)."""
        batch, heads, q_len, _ = k.shape
        k_pool, v_pool = self.paged.k[layer_idx], self.paged.v[layer_idx]  # (Hkv, S, D)
        k_pool.index_copy_(1, self._new, k.transpose(0, 1).reshape(heads, batch * q_len, -1).to(k_pool.dtype))
        v_pool.index_copy_(1, self._new, v.transpose(0, 1).reshape(heads, batch * q_len, -1).to(v_pool.dtype))
        if self.past_len == 0 and k.dtype == k_pool.dtype and v.dtype == v_pool.dtype:
            return k, v  # a first prefill chunk: the history is exactly this step's keys (no gather back)
        k_len = self.slot_index.shape[1]
        k_all = k_pool.index_select(1, self._flat).view(heads, batch, k_len, k_pool.shape[2]).transpose(0, 1)  # (B, Hkv, K, Dk)
        v_all = v_pool.index_select(1, self._flat).view(heads, batch, k_len, v_pool.shape[2]).transpose(0, 1)  # (B, Hkv, K, Dv)
        return k_all.to(k.dtype), v_all.to(v.dtype)

    def commit(self) -> None:
        """Scatter the per-token backend state the backends appended this step into the pools."""
        for layer_idx, states in enumerate(self.paged.states):
            backend_state = self.layers[layer_idx].backend_state
            for name, pool in states.items():
                value = backend_state.get(name)
                if value is None:
                    continue
                if value.shape[1] != self.past_len + self.q_len:
                    raise RuntimeError(
                        f"layer {layer_idx}: backend_state[{name!r}] has {value.shape[1]} entries after the step, "
                        f"expected {self.past_len + self.q_len} (one per cached token)"
                    )
                new = value[:, self.past_len :].reshape(-1, *pool.shape[1:])  # (B*Tq, ...)
                pool.index_copy_(0, self._new, new.to(pool.dtype))


class DecodeView:
    """A dense, left-padded copy of one decode batch's history with room to grow.

    Consecutive decode steps of the same sequences append one token per row at the same
    column, so the view is extended in place instead of gathering every row's history from
    the pools at every step. The pools stay the source of truth (every token is written there
    too); any change in the batch (a sequence joins, leaves or is preempted) rebuilds the view.
    """

    def __init__(self, paged: PagedKVCache, past_slots: torch.Tensor, capacity: int, seq_ids: list[str],
                 computed: list[int]):
        batch, past_len = past_slots.shape
        flat = past_slots.reshape(-1)
        self.seq_ids, self.computed, self.length, self.capacity = seq_ids, computed, past_len, capacity
        self.k, self.v, self.states = [], [], []
        for k_pool, v_pool, states in zip(paged.k, paged.v, paged.states):
            k = k_pool.new_zeros(batch, k_pool.shape[0], capacity, k_pool.shape[2])  # (B, Hkv, cap, Dk)
            v = v_pool.new_zeros(batch, v_pool.shape[0], capacity, v_pool.shape[2])  # (B, Hkv, cap, Dv)
            k[:, :, :past_len] = k_pool.index_select(1, flat).view(k_pool.shape[0], batch, past_len, k_pool.shape[2]).transpose(0, 1)
            v[:, :, :past_len] = v_pool.index_select(1, flat).view(v_pool.shape[0], batch, past_len, v_pool.shape[2]).transpose(0, 1)
            self.k.append(k)
            self.v.append(v)
            layer_states = {}
            for name, pool in states.items():
                buf = pool.new_zeros(batch, capacity, *pool.shape[1:])  # (B, cap, ...)
                buf[:, :past_len] = pool.index_select(0, flat).view(batch, past_len, *pool.shape[1:])
                layer_states[name] = buf
            self.states.append(layer_states)

    def fits(self, seq_ids: list[str], computed: list[int]) -> bool:
        return seq_ids == self.seq_ids and computed == self.computed and self.length < self.capacity


class DecodeViewCache:
    """The cache protocol over a :class:`DecodeView` for one decode step (one new token per row)."""

    def __init__(self, paged: PagedKVCache, view: DecodeView, new_slots: torch.Tensor):
        self.paged, self.view = paged, view
        self._new = new_slots  # (B,)
        self.past_len = view.length
        self.layers = [_StepLayer({name: buf[:, : self.past_len] for name, buf in states.items()})
                       for states in view.states]

    @property
    def seq_len(self) -> int:
        return self.past_len

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k: (B, Hkv, 1, Dk), v: (B, Hkv, 1, Dv) -> (B, Hkv, past + 1, D) views of the dense history."""
        col = self.past_len
        k_buf, v_buf = self.view.k[layer_idx], self.view.v[layer_idx]
        k_buf[:, :, col] = k[:, :, 0]
        v_buf[:, :, col] = v[:, :, 0]
        k_pool, v_pool = self.paged.k[layer_idx], self.paged.v[layer_idx]  # (Hkv, S, D)
        k_pool.index_copy_(1, self._new, k[:, :, 0].transpose(0, 1).to(k_pool.dtype))
        v_pool.index_copy_(1, self._new, v[:, :, 0].transpose(0, 1).to(v_pool.dtype))
        return k_buf[:, :, : col + 1], v_buf[:, :, : col + 1]

    def commit(self) -> None:
        col = self.past_len
        for layer_idx, states in enumerate(self.paged.states):
            backend_state = self.layers[layer_idx].backend_state
            for name, pool in states.items():
                value = backend_state.get(name)
                if value is None:
                    continue
                if value.shape[1] != col + 1:
                    raise RuntimeError(f"layer {layer_idx}: backend_state[{name!r}] has {value.shape[1]} entries after "
                                       f"a decode step, expected {col + 1}")
                new = value[:, col]  # (B, ...)
                self.view.states[layer_idx][name][:, col] = new
                pool.index_copy_(0, self._new, new.to(pool.dtype))
        self.view.length += 1
        self.view.computed = [c + 1 for c in self.view.computed]
