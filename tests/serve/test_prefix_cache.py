"""Automatic prefix caching: shared KV blocks give a cold run's tokens, reference counts come
back to zero, LRU eviction under memory pressure, siblings and adapters."""

from __future__ import annotations

import pytest
import torch

from seekdeep.serve.engine import Engine, EngineConfig
from seekdeep.serve.kv_cache import BlockAllocator, hash_block
from seekdeep.serve.sampling import SamplingParams
from tiny_llama import tiny_llama

VOCAB = 256
GREEDY = SamplingParams(max_tokens=10, temperature=0)


def _llama(backend: str = "sdpa", **options):
    return tiny_llama(backend, vocab=VOCAB, **options)


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def model():
    return _llama()


@pytest.mark.parametrize("backend,budget", [("sdpa", 512), ("sdpa", 8), ("dsa", 512)])
def test_a_prefix_cache_hit_gives_the_tokens_of_a_cold_run(backend, budget):
    # dsa with topk 8 < the 37-token prefix: the shared blocks' paged index keys drive selection
    model = _llama(backend, **({"topk": 8} if backend == "dsa" else {}))
    system = _tokens(37, 0)
    prompts = [system + _tokens(n, s) for n, s in ((5, 1), (11, 2), (3, 3))] + [system[:20], system]
    cold = [Engine(model, EngineConfig(block_size=4, num_blocks=128, prefix_caching=False)).generate([p], GREEDY)[0]
            for p in prompts]
    engine = Engine(model, EngineConfig(block_size=4, num_blocks=128, max_num_batched_tokens=budget))
    warm = [engine.generate([p], GREEDY)[0] for p in prompts]  # one at a time: every later one hits
    assert warm == cold
    sched = engine.scheduler
    # 9 full blocks of the system prompt hit for prompts 2, 3 and 5; prompt 4 (20 tokens) hits 4
    # blocks, not 5: its last token is always computed
    assert sched.prefix_hit_tokens == 3 * 36 + 16
    assert sched.prefix_query_tokens == sum(len(p) for p in prompts)
    assert engine.allocator.num_used == 0 and engine.allocator.num_cached > 0
    engine.allocator.check()


def test_siblings_share_the_prompt_blocks_and_reference_counts_return_to_zero(model):
    prompt = _tokens(30, 4)
    engine = Engine(model, EngineConfig(block_size=4, num_blocks=64))
    params = [SamplingParams(max_tokens=6, temperature=0.8, seed=s) for s in range(3)]  # n = 3
    for i, p in enumerate(params):
        engine.add_request(f"c{i}", prompt, p)
    outs: dict[str, list[int]] = {}

    def collect(outputs):
        for o in outputs:
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)

    collect(engine.step())  # the first sibling prefills; the others wait for its blocks instead of recomputing them
    assert engine.num_running == 1 and engine.num_waiting == 2
    collect(engine.step())
    seqs = [engine.scheduler.get(f"c{i}") for i in range(3)]
    shared = seqs[0].block_ids[:7]  # 7 full blocks: 28 of the 30 prompt tokens
    assert all(s.block_ids[:7] == shared for s in seqs)
    assert all(engine.allocator.refcount(b) == 3 for b in shared)
    assert len({s.block_ids[7] for s in seqs}) == 3  # the partial last block is each sibling's own
    while engine.has_unfinished():
        collect(engine.step())
    alone = [Engine(model, EngineConfig(block_size=4, num_blocks=64, prefix_caching=False)).generate([prompt], p)[0]
             for p in params]
    assert [outs[f"c{i}"] for i in range(3)] == alone  # seeded samples do not depend on the sharing
    assert engine.scheduler.prefix_hit_tokens == 2 * 28
    assert engine.allocator.num_used == 0 and all(engine.allocator.refcount(b) == 0 for b in shared)
    engine.allocator.check()


def test_cancellation_and_preemption_leave_no_reference_behind(model):
    system = _tokens(24, 5)
    prompts = [system + _tokens(n, 10 + n) for n in (3, 9, 14, 6, 20, 2)]
    expected = Engine(model, EngineConfig(block_size=4, num_blocks=256, prefix_caching=False)).generate(prompts, GREEDY)
    # tight memory: sequences that share blocks are preempted, recomputed from their cached blocks
    tight = Engine(model, EngineConfig(block_size=4, num_blocks=26, max_num_batched_tokens=64))
    assert tight.generate(prompts, GREEDY) == expected
    assert tight.num_preemptions > 0 and tight.scheduler.prefix_hit_tokens > 0
    assert tight.allocator.num_used == 0
    tight.allocator.check()
    # aborts of running, waiting and block-sharing requests at every stage
    engine = Engine(model, EngineConfig(block_size=4, num_blocks=64, max_num_seqs=3, max_num_batched_tokens=16))
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=30, temperature=0))
    for step, victim in enumerate(["r1", "r4", None, "r0", None, "r5", "r2"]):
        engine.step()
        if victim is not None:
            assert engine.abort(victim)
        engine.allocator.check()
    engine.abort_all()
    assert engine.allocator.num_used == 0 and not engine.has_unfinished()
    engine.allocator.check()


def test_eviction_under_memory_pressure_is_lru_and_stays_correct(model):
    # 16 usable blocks of 4 tokens; each request holds 6 (21 prompt + 3 new tokens)
    engine = Engine(model, EngineConfig(block_size=4, num_blocks=17))
    params = SamplingParams(max_tokens=3, temperature=0)
    a, b, c, d = (_tokens(21, s) for s in (20, 21, 22, 23))
    first = {p[0]: engine.generate([p], params)[0] for p in (a, b)}
    assert engine.allocator.num_cached == 10 and engine.allocator.num_evictions == 0
    engine.generate([a], params)  # a is now the most recently used
    engine.generate([c], params)
    engine.generate([d], params)  # needs blocks: the never-cached free ones, then the LRU prefix (b's)
    alloc = engine.allocator
    assert alloc.num_evictions > 0
    lookup = engine.scheduler._lookup_prefix
    from seekdeep.serve.scheduler import Sequence

    def cached_blocks(p):
        return len(lookup(Sequence("probe", p, 1, cache_salt=engine._cache_salt(None)))[0])

    # c took the 6 never-cached free blocks; d took the last one and evicted b's 5 (b was used
    # before a's second run), so b is gone and a, c, d are whole
    assert alloc.num_evictions == 5
    assert [cached_blocks(p) for p in (a, b, c, d)] == [5, 0, 5, 5]
    # an evicted prefix is recomputed and still gives its tokens
    assert engine.generate([b], params)[0] == first[b[0]]
    assert alloc.num_used == 0
    alloc.check()


def test_blocks_are_not_shared_across_adapters_or_images(model):
    from seekdeep.peft import LoRAConfig

    prompt = _tokens(33, 30)
    lora_model = _llama()
    engine = Engine(lora_model, EngineConfig(block_size=4, num_blocks=64))
    base_out = engine.generate([prompt], GREEDY)[0]
    lora_model.add_adapter(LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, p in lora_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a LoRA that changes the keys and values
    hits = engine.scheduler.prefix_hit_tokens
    lora_out = engine.generate([prompt], GREEDY)[0]
    assert engine.scheduler.prefix_hit_tokens == hits  # no hit: the adapter changed the salt
    cold = Engine(lora_model, EngineConfig(block_size=4, num_blocks=64, prefix_caching=False)).generate([prompt], GREEDY)
    assert lora_out == cold[0] and lora_out != base_out
    with lora_model.disable_adapters():
        assert engine.generate([prompt], GREEDY)[0] == base_out
        assert engine.scheduler.prefix_hit_tokens == hits + 32  # the base model's blocks come back
    # image requests: the salt covers the pixels (placeholder tokens are equal for every image)
    one, two = torch.zeros(1, 3, 8, 8), torch.ones(1, 3, 8, 8)
    assert engine._cache_salt(one) != engine._cache_salt(two) != engine._cache_salt(None)
    assert engine._cache_salt(one) == engine._cache_salt(one.clone())


def test_block_allocator_refcounts_lru_and_hash_chaining():
    alloc = BlockAllocator(5, 2, prefix_caching=True)
    h1 = hash_block(b"", [1, 2], b"model")
    h2 = hash_block(h1, [3, 4])
    assert h1 != hash_block(b"", [1, 2], b"other model") and h2 != hash_block(hash_block(b"", [9, 2]), [3, 4])
    blocks = alloc.allocate(2)
    assert alloc.register(blocks[0], h1) and alloc.register(blocks[1], h2)
    assert not alloc.register(alloc.allocate(1)[0], h1)  # same contents elsewhere: stays private
    alloc.acquire(blocks[0])
    assert alloc.refcount(blocks[0]) == 2
    alloc.free(blocks)
    assert alloc.refcount(blocks[0]) == 1 and alloc.num_free == 2  # the unregistered one + blocks[1]
    alloc.free([blocks[0]])
    assert alloc.lookup(h1) == blocks[0] and alloc.num_free == 3 and alloc.num_used == 1
    taken = alloc.allocate(2)  # the never-registered free block first, then the LRU cached one
    assert alloc.num_evictions == 1 and alloc.lookup(h2) is None and alloc.lookup(h1) == blocks[0]
    assert sorted(taken) != sorted(blocks) and alloc.num_free == 1
    with pytest.raises(RuntimeError, match="freed more often"):
        alloc.free([blocks[0]])  # evictable, no reference left to drop
    alloc.check()
    off = BlockAllocator(5, 2)
    assert not off.register(off.allocate(1)[0], h1) and off.lookup(h1) is None
