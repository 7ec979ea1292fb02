from __future__ import annotations

import pytest
import torch

from seekdeep.errors import ConfigError
from seekdeep.serve.detokenizer import IncrementalDetokenizer
from seekdeep.serve.embeddings import EmbeddingCache
from seekdeep.serve.router import ComplexityRouter
from seekdeep.serve.scheduler import Scheduler, SchedulerConfig, Sequence
from seekdeep.serve.kv_cache import BlockAllocator

WORDS = ["he", "llo", " wor", "ld", "!", " STOP", " after"]


def _decode(ids):
    return "".join(WORDS[i] for i in ids)


def test_detokenizer_streams_text_and_cuts_at_a_stop_string():
    detok = IncrementalDetokenizer(_decode, stop=[" STOP"])
    # " STOP" has 5 characters: the last 4 are held back while they could still begin it
    assert [detok.add([i]) for i in range(5)] == ["", "h", "ello", " w", "o"]
    assert not detok.stopped
    assert detok.add([5]) == "rld!"  # the rest of the text before the stop string
    assert detok.stopped and detok.stop_string == " STOP" and detok.text == "hello world!"
    assert detok.add([6]) == ""  # nothing after the stop


def test_detokenizer_release_is_exact_concatenation():
    detok = IncrementalDetokenizer(_decode, stop=["zz"])
    out = "".join(detok.add([i]) for i in (0, 1, 2, 3)) + detok.add([4], final=True)
    assert out == "hello world!" and not detok.stopped


def test_detokenizer_holds_back_an_incomplete_character():
    detok = IncrementalDetokenizer(lambda ids: "a" + ("é" if 2 in ids else ("\ufffd" if 1 in ids else "")))
    assert detok.add([0]) == "a"
    assert detok.add([1]) == ""  # half of a UTF-8 character
    assert detok.add([2]) == "é"


def test_embedding_cache_is_a_bounded_lru_with_hit_counts():
    cache = EmbeddingCache(max_entries=2)
    a, b, c = (cache.key("m", [i]) for i in range(3))
    assert cache.get(a) is None and cache.misses == 1
    cache.put(a, torch.zeros(2))
    cache.put(b, torch.ones(2))
    assert cache.get(a) is not None  # a is now the most recent
    cache.put(c, torch.ones(2))  # evicts b
    assert cache.get(b) is None and cache.get(a) is not None and len(cache) == 2
    assert (cache.hits, cache.misses) == (2, 2) and cache.hit_rate == 0.5
    with pytest.raises(ConfigError):
        EmbeddingCache(-1)


def test_router_sends_simple_requests_to_the_small_model():
    router = ComplexityRouter(["small", "large"], {"small": 100, "large": 1000}, threshold=64)
    assert router.route(10, 20) == "small"
    assert router.route(10, 60) == "large"
    router = ComplexityRouter(["small", "large"], {"small": 50, "large": 1000}, threshold=64)
    assert router.route(40, 20) == "large"  # under the threshold but over the small model's context
    with pytest.raises(ConfigError):
        ComplexityRouter([], {})


def test_scheduler_respects_token_budget_and_sequence_cap():
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=10, max_model_len=100),
                      BlockAllocator(64, 4))
    for i, n in enumerate((25, 3, 4)):
        sched.add(Sequence(f"s{i}", list(range(n)), max_tokens=5))
    batch = sched.schedule()
    assert [(s.seq_id, n) for s, n in batch.items] == [("s0", 10)]
    batch.items[0][0].num_computed += 10
    batch = sched.schedule()
    assert [(s.seq_id, n) for s, n in batch.items] == [("s0", 10)]  # budget spent on the running prompt
    batch.items[0][0].num_computed += 10
    batch = sched.schedule()
    assert [(s.seq_id, n) for s, n in batch.items] == [("s0", 5), ("s1", 3)]
    assert sched.num_running == 2 and sched.num_waiting == 1  # the cap holds s2 back
