"""Iteration-level scheduler: decides, every step, which sequences run and how many of their
tokens are computed. It sees token ids and counts only (no tensors, no text, no HTTP).

Each step spends a token budget (``max_num_batched_tokens``): running sequences first, in
arrival order (a decoding sequence needs one token, a sequence still in prefill gets the next
chunk of its prompt), then waiting sequences are admitted while the budget, the sequence cap
(``max_num_seqs``) and free KV blocks allow. A long prompt is therefore prefilled in chunks
across several steps while other sequences keep decoding.

When a running sequence needs a block and none is free, the most recently admitted running
sequence is preempted: its blocks are freed and it goes back to the front of the queue with
``num_computed = 0``. When it is scheduled again its prompt *and* the tokens it already
produced are recomputed (preemption by recompute), so its output continues exactly where it
stopped.

Prefix caching (when the allocator has it on): a full block is registered under its content
hash once its tokens are computed (at the start of the next step, and when its sequence
finishes or is preempted, so a preempted sequence usually gets its own work back). A waiting
sequence is admitted with the longest cached run of its leading full blocks (never its last
token: its logits are needed) and only the rest is computed. A sequence whose next block is
being computed right now by a running one (``n > 1`` siblings, identical prompts arriving
together) waits one step and shares it instead of computing it twice.

Admission order (``policy``): ``fcfs`` admits in arrival order; ``predicted`` admits the
sequence with the least predicted work first (``predicted_output`` tokens still to produce,
from :class:`~seekdeep.serve.length_predictor.LengthPredictor`), minus ``aging`` tokens for
every step it has waited, so a long request overtaken by a stream of short ones still gets
in after at most ``max_model_len / aging`` steps. Preempted sequences go first under both.
"""

from __future__ import annotations

import enum
from collections import Counter, deque
from dataclasses import dataclass, field

from seekdeep.errors import ConfigError
from seekdeep.serve.kv_cache import BlockAllocator, hash_block


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One generation request as the scheduler sees it."""

    seq_id: str
    prompt_ids: list[int]
    max_tokens: int
    token_ids: list[int] = field(default_factory=list)  # prompt + output so far
    num_computed: int = 0  # tokens whose keys/values are in the cache
    block_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_preemptions: int = 0
    # prefix caching: what the KV depends on besides the tokens (model, adapter, images)
    cache_salt: bytes = b""
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of the full blocks of token_ids
    num_cached_blocks: int = 0  # leading block_ids already hits or offered to the cache
    pending_end: int = 0  # blocks [num_cached_blocks, pending_end) are announced as being computed
    num_cached_tokens: int = 0  # prompt tokens found in the cache at the first admission
    # length-aware admission
    predicted_output: int = 0  # predicted output tokens (0: unknown, max_tokens is used)
    arrival_step: int = 0  # scheduler step at which it was added

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids) :]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed


POLICIES = ("fcfs", "predicted")


@dataclass
class SchedulerConfig:
    """``policy``: admission order, ``fcfs`` or ``predicted`` (see the module docstring);
    ``aging``: predicted tokens a waiting sequence is credited per step waited."""

    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    policy: str = "fcfs"
    aging: float = 1.0

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(name, f"must be a positive integer, got {value!r}")
        if self.policy not in POLICIES:
            raise ConfigError("policy", f"unknown {self.policy!r}; accepted: {', '.join(POLICIES)}")
        if isinstance(self.aging, bool) or not isinstance(self.aging, (int, float)) or not 0 < self.aging <= 1e6:
            raise ConfigError("aging", f"must be a number in (0, 1e6], got {self.aging!r}")


@dataclass
class ScheduledBatch:
    """What runs this step: ``(sequence, number of its tokens to compute)`` pairs."""

    items: list[tuple[Sequence, int]]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)

    def __bool__(self) -> bool:
        return bool(self.items)


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator):
        self.config = config
        self.allocator = allocator
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._by_id: dict[str, Sequence] = {}
        self._pending: Counter[bytes] = Counter()  # hashes of blocks running sequences are computing
        self.prefix_query_tokens = 0  # tokens looked up at admission
        self.num_steps = 0
        self.prefix_hit_tokens = 0  # of those, found in the cache

    @property
    def prefix_caching(self) -> bool:
        return self.allocator.prefix_caching

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0

    # -- queue
    def add(self, seq: Sequence) -> None:
        if seq.seq_id in self._by_id:
            raise ValueError(f"request id {seq.seq_id!r} is already scheduled")
        if seq.num_prompt < 1:
            raise ValueError("a sequence needs at least one prompt token")
        self._by_id[seq.seq_id] = seq
        seq.arrival_step = self.num_steps
        self.waiting.append(seq)

    def get(self, seq_id: str) -> Sequence | None:
        return self._by_id.get(seq_id)

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence (done or aborted) and free its blocks."""
        if self._by_id.pop(seq.seq_id, None) is None:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.FINISHED

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- prefix caching
    def _block_hash(self, seq: Sequence, idx: int) -> bytes:
        bs = self.allocator.block_size
        while len(seq.block_hashes) <= idx:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if i else b""
            seq.block_hashes.append(hash_block(parent, seq.token_ids[i * bs : (i + 1) * bs], b"" if i else seq.cache_salt))
        return seq.block_hashes[idx]

    def _cache_computed(self, seq: Sequence) -> None:
        """Register the sequence's full blocks whose tokens are all computed."""
        if not self.prefix_caching:
            return
        full = min(seq.num_computed // self.allocator.block_size, len(seq.block_ids))
        for i in range(seq.num_cached_blocks, full):
            h = self._block_hash(seq, i)
            self.allocator.register(seq.block_ids[i], h)
            if i < seq.pending_end:
                self._unpend(h)
        seq.num_cached_blocks = max(seq.num_cached_blocks, full)

    def _unpend(self, h: bytes) -> None:
        self._pending[h] -= 1
        if self._pending[h] <= 0:
            del self._pending[h]

    def _release(self, seq: Sequence) -> None:
        """Offer the computed blocks to the cache, withdraw announcements, drop the references."""
        self._cache_computed(seq)
        for i in range(seq.num_cached_blocks, seq.pending_end):
            self._unpend(seq.block_hashes[i])
        seq.pending_end = 0
        self.allocator.free(seq.block_ids)
        seq.block_ids = []
        seq.num_cached_blocks = 0

    def _lookup_prefix(self, seq: Sequence) -> tuple[list[int], bool]:
        """(cached blocks the sequence can start from, whether to wait for a block in flight)."""
        if not self.prefix_caching:
            return [], False
        hits = []
        for i in range((seq.num_tokens - 1) // self.allocator.block_size):  # the last token is always computed
            h = self._block_hash(seq, i)
            block = self.allocator.lookup(h)
            if block is None:
                return hits, h in self._pending
            hits.append(block)
        return hits, False

    def _admit(self, seq: Sequence, hits: list[int], budget: int) -> int | None:
        """Give a waiting sequence its cached prefix ``hits`` and the blocks for its first
        chunk; the number of tokens it computes this step, or None when memory is short."""
        bs = self.allocator.block_size
        num_hit = len(hits) * bs
        num_new = min(seq.num_tokens - num_hit, budget)
        need = self.allocator.blocks_for(num_hit + num_new) - len(hits)
        revived = sum(1 for b in hits if self.allocator.refcount(b) == 0)  # they leave the free pool
        if need > self.allocator.num_free - revived:
            return None
        for b in hits:
            self.allocator.acquire(b)
        seq.block_ids = hits + self.allocator.allocate(need)
        seq.num_computed = num_hit
        seq.num_cached_blocks = len(hits)
        if self.prefix_caching:
            self.prefix_query_tokens += seq.num_tokens
            self.prefix_hit_tokens += num_hit
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = num_hit
            seq.pending_end = seq.num_tokens // bs  # every full block of what it will compute
            for i in range(len(hits), seq.pending_end):
                self._pending[self._block_hash(seq, i)] += 1
        return num_new

    # -- one step
    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _grow(self, seq: Sequence, num_new: int) -> bool:
        need = self.allocator.blocks_for(seq.num_computed + num_new) - len(seq.block_ids)
        if need > self.allocator.num_free:
            return False
        if need > 0:
            seq.block_ids.extend(self.allocator.allocate(need))
        return True

    def schedule(self) -> ScheduledBatch:
        budget = self.config.max_num_batched_tokens
        items: list[tuple[Sequence, int]] = []
        preempted: list[Sequence] = []
        self.num_steps += 1
        for seq in self.running:  # what the last step computed becomes shareable
            self._cache_computed(seq)

        idx = 0
        while idx < len(self.running) and budget > 0:
            seq = self.running[idx]
            num_new = min(seq.num_uncomputed, budget)
            while not self._grow(seq, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # it preempted itself: every later sequence is gone as well
            items.append((seq, num_new))
            budget -= num_new
            idx += 1

        # Admit waiting sequences, unless this step had to preempt (memory is short).
        if preempted:
            return ScheduledBatch(items, preempted)
        admitted = []
        for seq in self.admission_order():
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            hits, wait = self._lookup_prefix(seq)
            if wait:
                continue  # its next block is being computed by a running sequence: share it next step
            num_new = self._admit(seq, hits, budget)
            if num_new is None:
                break  # out of blocks: later (smaller) requests must not overtake it for ever
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            admitted.append(seq)
            items.append((seq, num_new))
            budget -= num_new
        for seq in admitted:
            self.waiting.remove(seq)
        return ScheduledBatch(items, preempted)

    def priority(self, seq: Sequence) -> float:
        """``predicted`` policy: lower goes first (predicted tokens left minus the ageing credit)."""
        predicted = seq.predicted_output or seq.max_tokens
        left = max(1, predicted - seq.num_output)
        return left - self.config.aging * (self.num_steps - seq.arrival_step)

    def admission_order(self) -> list[Sequence]:
        if self.config.policy == "fcfs":
            return list(self.waiting)
        # stable sort: equal priorities keep arrival order; preempted sequences first
        return sorted(self.waiting, key=lambda s: (s.num_preemptions == 0, self.priority(s)))

    def blocks_needed(self, num_tokens: int) -> int:
        return self.allocator.blocks_for(num_tokens)
