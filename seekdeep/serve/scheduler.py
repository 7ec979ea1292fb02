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
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from seekdeep.errors import ConfigError
from seekdeep.serve.kv_cache import BlockAllocator


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


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(name, f"must be a positive integer, got {value!r}")


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

    # -- queue
    def add(self, seq: Sequence) -> None:
        if seq.seq_id in self._by_id:
            raise ValueError(f"request id {seq.seq_id!r} is already scheduled")
        if seq.num_prompt < 1:
            raise ValueError("a sequence needs at least one prompt token")
        self._by_id[seq.seq_id] = seq
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
        self.allocator.free(seq.block_ids)
        seq.block_ids = []
        seq.status = SequenceStatus.FINISHED

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step
    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.free(seq.block_ids)
        seq.block_ids = []
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
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            num_new = min(seq.num_uncomputed, budget)
            if not self._grow(seq, num_new):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            items.append((seq, num_new))
            budget -= num_new
        return ScheduledBatch(items, preempted)

    def blocks_needed(self, num_tokens: int) -> int:
        return self.allocator.blocks_for(num_tokens)
