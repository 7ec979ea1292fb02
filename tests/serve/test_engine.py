from __future__ import annotations

import asyncio

import pytest
import torch

from seekdeep.errors import ConfigError, GenerationError
from seekdeep.models.common import KVCache
from seekdeep.models.deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM
from seekdeep.serve.engine import AsyncEngine, Engine, EngineConfig, QueueFullError
from seekdeep.serve.kv_cache import BlockAllocator, NoFreeBlocksError
from seekdeep.serve.sampling import SamplingParams
from tiny_llama import tiny_llama

VOCAB = 256
GREEDY = SamplingParams(max_tokens=12, temperature=0)


def _llama(backend: str = "sdpa", **options):
    return tiny_llama(backend, vocab=VOCAB, **options)


@pytest.fixture(scope="module")
def model():
    return _llama()


def _prompts(lengths=(3, 40, 17, 9, 25, 33), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _alone(model, prompt, n=12):
    return model.generate(torch.tensor([prompt]), max_new_tokens=n)[0, len(prompt):].tolist()


@pytest.mark.parametrize("backend", ["eager", "sdpa", "gated"])
def test_greedy_outputs_in_a_full_batch_equal_each_request_alone(backend):
    model = _llama(backend)
    prompts = _prompts((1, 3, 40, 17, 9, 25, 33))  # a 1-token prompt decodes from an empty history
    # small blocks and a small token budget: prompts are chunked and share steps with decodes;
    # every request is in the running batch at once
    engine = Engine(model, EngineConfig(block_size=4, num_blocks=128, max_num_batched_tokens=16,
                                        max_num_seqs=len(prompts)))
    outputs = engine.generate(prompts, GREEDY)
    assert outputs == [_alone(model, p) for p in prompts]
    assert engine.allocator.num_used == 0


def test_chunked_prefill_gives_the_same_logits_and_tokens(model):
    prompt = _prompts((45,))[0]
    with torch.no_grad():
        full = model(torch.tensor([prompt])).logits[0, -1]
    results = []
    for budget in (5, 16, 512):
        engine = Engine(model, EngineConfig(block_size=4, num_blocks=64, max_num_batched_tokens=budget))
        engine.add_request("r", prompt, GREEDY)
        seq = engine.scheduler.get("r")
        steps = 0
        while seq.num_computed < len(prompt):
            batch = engine.scheduler.schedule()
            logits = engine.runner.execute(batch.items)
            seq.num_computed += batch.items[0][1]
            steps += 1
        assert steps == -(-len(prompt) // budget)
        torch.testing.assert_close(logits[0], full, atol=1e-4, rtol=1e-4)
        engine.abort("r")
        results.append(Engine(model, EngineConfig(block_size=4, num_blocks=64, max_num_batched_tokens=budget))
                       .generate([prompt], GREEDY)[0])
    assert results[0] == results[1] == results[2] == _alone(model, prompt)


def test_preemption_recomputes_and_gives_identical_outputs(model):
    prompts = _prompts()
    ample = Engine(model, EngineConfig(block_size=4, num_blocks=256, max_num_batched_tokens=64))
    tight = Engine(model, EngineConfig(block_size=4, num_blocks=24, max_num_batched_tokens=64))
    expected = ample.generate(prompts, GREEDY)
    assert ample.num_preemptions == 0
    assert tight.generate(prompts, GREEDY) == expected
    assert tight.num_preemptions > 0
    assert tight.allocator.num_used == 0


def test_cancellation_frees_blocks_of_running_and_waiting_requests(model):
    engine = Engine(model, EngineConfig(block_size=4, num_blocks=64, max_num_seqs=2))
    for i, p in enumerate(_prompts((10, 20, 5))):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=50, temperature=0))
    for _ in range(3):
        engine.step()
    assert engine.num_running == 2 and engine.num_waiting == 1
    used = engine.allocator.num_used
    held = len(engine.scheduler.get("r1").block_ids)
    assert engine.abort("r1")
    assert engine.allocator.num_used == used - held
    assert engine.abort("r2")  # still waiting
    assert not engine.abort("r2")
    engine.step()
    assert engine.abort("r0")
    assert engine.allocator.num_used == 0 and not engine.has_unfinished()


def test_seeded_sampling_is_reproducible_whatever_the_batch(model):
    prompt = _prompts((11,))[0]
    params = SamplingParams(max_tokens=15, temperature=0.9, top_p=0.95, top_k=50, seed=7)
    alone = Engine(model, EngineConfig(block_size=4, num_blocks=128)).generate([prompt], params)[0]
    others = [SamplingParams(max_tokens=15, temperature=1.0) for _ in range(4)]
    batched = Engine(model, EngineConfig(block_size=4, num_blocks=128, max_num_batched_tokens=16)).generate(
        _prompts((30, 4, 19, 8), seed=3) + [prompt], others + [params])[-1]
    assert batched == alone
    other_seed = SamplingParams(max_tokens=15, temperature=0.9, top_p=0.95, top_k=50, seed=8)
    assert Engine(model, EngineConfig(num_blocks=64)).generate([prompt], other_seed)[0] != alone


def test_stop_token_ids_min_tokens_and_max_tokens(model):
    prompt = _prompts((6,))[0]
    free = _alone(model, prompt, 12)
    stop_at = free[4]
    first = free.index(stop_at)
    engine = Engine(model, EngineConfig(num_blocks=64))
    engine.add_request("a", prompt, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_at]))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert [t for o in outs for t in o.new_token_ids] == free[: first + 1]
    assert outs[-1].finished and outs[-1].finish_reason == "stop"
    # min_tokens suppresses the stop token until enough tokens were produced
    late = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_at],
                                                    min_tokens=first + 2))[0]
    assert len(late) >= first + 2 and stop_at not in late[: first + 2]
    engine.add_request("b", prompt, SamplingParams(max_tokens=3, temperature=0))
    outs = [o for step in iter(engine.step, []) for o in step]
    assert outs[-1].finish_reason == "length" and outs[-1].num_output_tokens == 3


def test_eos_from_the_model_config_ends_requests_unless_ignored():
    model = _llama()
    prompt = _prompts((6,))[0]
    free = _alone(model, prompt, 10)
    model.config.eos_token_id = free[2]
    try:
        engine = Engine(model, EngineConfig(num_blocks=64))
        assert engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0))[0] == free[:3]
        assert engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0] == free
    finally:
        model.config.eos_token_id = None


def test_dsa_backend_decodes_sparsely_with_paged_index_keys():
    model = _llama("dsa", topk=8)
    prompts = _prompts((3, 40, 17, 25))
    engine = Engine(model, EngineConfig(block_size=4, num_blocks=128, max_num_batched_tokens=512, max_num_seqs=8))
    assert "index_k" in engine.kv_cache.states[0]
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, GREEDY)
    for _ in range(6):
        engine.step()
    # the paged keys, values and index keys of a running sequence equal a contiguous cache's
    seq = engine.scheduler.get("1")
    tokens = seq.token_ids[: seq.num_computed]
    cache = KVCache(len(model.model.layers))
    with torch.no_grad():
        model(torch.tensor([tokens]), past_key_values=cache, use_cache=True)
    slots = torch.tensor([seq.block_ids[p // 4] * 4 + p % 4 for p in range(len(tokens))])
    for layer in range(len(model.model.layers)):
        torch.testing.assert_close(engine.kv_cache.k[layer][:, slots], cache.layers[layer].k[0],
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(engine.kv_cache.states[layer]["index_k"][slots],
                                   cache.layers[layer].backend_state["index_k"][0], atol=1e-4, rtol=1e-4)
    engine.abort_all()
    assert Engine(model, EngineConfig(block_size=4, num_blocks=128)).generate(prompts, GREEDY) == \
        [_alone(model, p) for p in prompts]


def test_mla_model_with_different_key_and_value_dims():
    torch.manual_seed(0)
    cfg = DeepseekV3Config.from_name("tiny", vocab_size=VOCAB, max_position_embeddings=128, eos_token_id=None,
                                     bos_token_id=None)
    model = DeepseekV3ForCausalLM(cfg)
    model.init_weights(std=0.3)
    model.eval()
    prompts = _prompts((5, 21, 12))
    engine = Engine(model, EngineConfig(block_size=4, num_blocks=64, max_num_batched_tokens=16))
    assert engine.kv_cache.k[0].shape[-1] != engine.kv_cache.v[0].shape[-1]
    assert engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0)) == \
        [_alone(model, p, 8) for p in prompts]


def test_static_decode_layout_and_dynamo_trace_match_the_eager_path(model):
    """The CUDA-graph decode path (bucketed static shapes, torch.compile) gives the eager tokens."""
    prompts = _prompts((3, 40, 17, 9, 25))
    eager = Engine(model, EngineConfig(block_size=4, num_blocks=128))
    assert eager.runner.decode_path == "eager"
    expected = eager.generate(prompts, GREEDY)
    static = Engine(model, EngineConfig(block_size=4, num_blocks=128, static_decode=True))
    assert static.runner.decode_path == "static"
    assert static.generate(prompts, GREEDY) == expected
    # the same function torch.compile wraps on CUDA, traced by dynamo (backend "eager": no codegen on CPU)
    torch._dynamo.reset()
    compiled = Engine(model, EngineConfig(block_size=4, num_blocks=128, compile_decode=True, compile_backend="eager"))
    assert compiled.runner.decode_path == "compiled"
    assert compiled.generate(prompts[:2], GREEDY) == expected[:2]
    assert compiled.runner.decode_path == "compiled"  # no fallback happened


def test_invalid_requests_raise_typed_errors_naming_the_field(model):
    engine = Engine(model, EngineConfig(num_blocks=64))
    with pytest.raises(GenerationError, match="prompt"):
        engine.add_request("a", [], GREEDY)
    with pytest.raises(GenerationError, match="prompt"):
        engine.add_request("a", [VOCAB], GREEDY)
    with pytest.raises(GenerationError, match="prompt"):
        engine.add_request("a", [1] * 256, GREEDY)
    with pytest.raises(GenerationError, match="max_tokens"):
        engine.add_request("a", [1] * 250, SamplingParams(max_tokens=10))
    with pytest.raises(GenerationError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(GenerationError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ConfigError, match="max_model_len"):
        Engine(model, EngineConfig(max_model_len=10_000))
    engine.add_request("a", [1, 2], GREEDY)
    with pytest.raises(GenerationError, match="request_id"):
        engine.add_request("a", [1, 2], GREEDY)


def test_block_allocator_reserves_the_null_block():
    alloc = BlockAllocator(5, 16)
    blocks = alloc.allocate(4)
    assert 0 not in blocks and sorted(blocks) == [1, 2, 3, 4] and alloc.usage == 1.0
    with pytest.raises(NoFreeBlocksError):
        alloc.allocate(1)
    alloc.free(blocks[:2])
    assert alloc.num_free == 2 and alloc.blocks_for(17) == 2


def test_async_engine_streams_and_frees_blocks_when_the_consumer_leaves(model):
    prompts = _prompts((7, 13))
    expected = [_alone(model, p, 12) for p in prompts]

    async def main():
        engine = AsyncEngine(Engine(model, EngineConfig(block_size=4, num_blocks=64)))
        engine.start()
        try:
            async def collect(i):
                tokens = []
                async for out in engine.generate(f"r{i}", prompts[i], GREEDY):
                    tokens += out.new_token_ids
                return tokens

            assert await asyncio.gather(collect(0), collect(1)) == expected
            gen = engine.generate("leave", prompts[0], SamplingParams(max_tokens=100, temperature=0))
            await gen.__anext__()
            assert engine.kv_cache_usage > 0
            await gen.aclose()  # what a client disconnect does
            for _ in range(100):
                if engine.kv_cache_usage == 0 and not engine.engine.has_unfinished():
                    break
                await asyncio.sleep(0.02)
            assert engine.kv_cache_usage == 0
            vector = await engine.embed(prompts[0])
            with torch.no_grad():
                hidden = model(torch.tensor([prompts[0]])).hidden_states[0]
            torch.testing.assert_close(vector, hidden.mean(0))
            with pytest.raises(GenerationError):
                await engine.generate("bad", [], GREEDY).__anext__()
        finally:
            engine.shutdown(drain=False)

    asyncio.run(main())


def test_async_engine_queue_limit():
    async def main():
        model = _llama()
        engine = AsyncEngine(Engine(model, EngineConfig(num_blocks=64, max_num_seqs=1)), max_waiting=1)
        engine.start()
        try:
            long = SamplingParams(max_tokens=60, temperature=0)
            first = engine.generate("a", [1, 2, 3], long)
            await first.__anext__()
            second = engine.generate("b", [1, 2, 3], long)
            task = asyncio.ensure_future(second.__anext__())
            await asyncio.sleep(0.05)
            with pytest.raises(QueueFullError):
                await engine.generate("c", [1, 2, 3], long).__anext__()
            await first.aclose()
            await task
            await second.aclose()
        finally:
            engine.shutdown(drain=False)

    asyncio.run(main())


def test_dsa_distance_bias_serves_like_generate():
    model = _llama("dsa", topk=8, local_window=2, distance_bias=64)
    with torch.no_grad():
        for layer in model.model.layers:  # a bias that changes which keys are picked
            layer.self_attn.inner.index_distance.normal_(std=3.0, generator=torch.Generator().manual_seed(5))
    prompts = _prompts((3, 40, 17, 25))
    assert Engine(model, EngineConfig(block_size=4, num_blocks=128)).generate(prompts, GREEDY) == \
        [_alone(model, p) for p in prompts]


def test_ragged_decode_batches_split_by_length_and_keep_the_tokens(model):
    # 8 short and 8 long histories decoding together: one forward pads every row to the longest
    prompts = _prompts((3, 5, 4, 6, 2, 7, 5, 3, 120, 110, 125, 118, 121, 115, 124, 119), seed=4)
    whole = Engine(model, EngineConfig(block_size=4, num_blocks=256, max_num_batched_tokens=2048, decode_buckets=1))
    split = Engine(model, EngineConfig(block_size=4, num_blocks=256, max_num_batched_tokens=2048))
    expected = whole.generate(prompts, GREEDY)
    assert split.generate(prompts, GREEDY) == expected == [_alone(model, p) for p in prompts]
    assert whole.runner.decode_padding_fraction > 0.4  # the short rows' slots were mostly padding
    assert split.runner.decode_padding_fraction < 0.1
    assert split.runner.decode_real_slots == whole.runner.decode_real_slots  # the same real work


def test_transposed_output_head_is_bitwise_the_module_and_follows_weight_updates():
    from seekdeep.serve.runner import OutputHead

    model = _llama()
    head = OutputHead(model)
    assert head.active  # CPU, CausalLM's forward, a plain bias-free head
    x = torch.randn(40, model.config.hidden_size)
    for _ in range(2):  # the first call at a shape decides, the second uses the decision
        for rows in (1, 3, 4, 9, 40):
            assert torch.equal(head(x[:rows]), model.lm_head(x[:rows]))
    assert set(head.exact) == {(rows, torch.get_num_threads()) for rows in (1, 3, 4, 9, 40)}
    assert head.num_fast == sum(head.exact.values())
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.5)  # in place (tied to the embedding): the copy must be refreshed
    assert torch.equal(head(x), model.lm_head(x))
    assert not OutputHead(model, enabled=False).active
    model.lm_head.bias = torch.nn.Parameter(torch.ones(VOCAB))  # not a plain bias-free head any more
    assert not head.usable()


def test_engine_tokens_and_logits_are_the_same_with_and_without_the_transposed_head(model):
    prompts = _prompts((3, 40, 17, 9, 25, 33, 2, 11), seed=6)
    params = [SamplingParams(max_tokens=n, temperature=0) for n in (12, 3, 20, 7, 12, 1, 15, 9)]
    engines = [Engine(model, EngineConfig(block_size=4, num_blocks=256, max_num_batched_tokens=64, max_num_seqs=8,
                                          transposed_head=on)) for on in (True, False)]
    assert engines[1].runner.head.active is False
    fast, plain = (e.generate(prompts, params) for e in engines)
    assert fast == plain == [_alone(model, p, n.max_tokens) for p, n in zip(prompts, params)]
    # one prefill forward of all 8 prompts: the logits themselves are bitwise equal
    seqs = []
    for e in engines:
        for i, p in enumerate(prompts):
            e.add_request(f"x{i}", p, GREEDY)
        batch = e.scheduler.schedule()
        seqs.append(e.runner.execute(batch.items))
        e.abort_all()
    assert torch.equal(seqs[0], seqs[1])
    with pytest.raises(ConfigError, match="transposed_head"):
        EngineConfig(transposed_head=1)
