"""The contiguous KV cache: pre-allocated buffers that grow geometrically, equal to concatenation."""

import torch

from seekdeep.models.common import KVCache
from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM


def _chunks(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 3, n, 4, generator=g), torch.randn(2, 3, n, 5, generator=g)) for n in lengths]


def test_update_equals_concatenation_across_growth():
    cache = KVCache(2)
    chunks = _chunks([7, 1, 300, 1, 1, 40])
    ref_k, ref_v = [], []
    for k, v in chunks:
        ref_k.append(k)
        ref_v.append(v)
        for layer in range(2):
            got_k, got_v = cache.update(layer, k, v)
            assert torch.equal(got_k, torch.cat(ref_k, dim=2))
            assert torch.equal(got_v, torch.cat(ref_v, dim=2))
    assert cache.seq_len == 350
    buffer = cache.layers[0].k_buffer
    assert buffer.shape[2] >= 350 and buffer.shape[2] <= 350 + max(256, 350 // 4) + 300  # bounded slack


def test_single_token_appends_do_not_reallocate():
    cache = KVCache(1)
    (k, v), = _chunks([10])
    cache.update(0, k, v)
    storage = cache.layers[0].k_buffer.data_ptr()
    for k1, v1 in _chunks([1] * 100, seed=1):
        cache.update(0, k1, v1)
    assert cache.layers[0].k_buffer.data_ptr() == storage  # 110 slots fit the first allocation
    assert cache.layers[0].k.data_ptr() == storage  # the returned keys are a view, not a copy


def test_select_rows_keeps_rows_and_allows_appending():
    cache = KVCache(1)
    (k, v), (k2, v2) = _chunks([5, 1])
    cache.update(0, k, v)
    cache.select_rows(torch.tensor([1]))
    got_k, got_v = cache.update(0, k2[1:], v2[1:])
    assert torch.equal(got_k, torch.cat([k[1:], k2[1:]], dim=2))
    assert torch.equal(got_v, torch.cat([v[1:], v2[1:]], dim=2))


def test_incremental_decode_matches_full_forward():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (1, 300))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :10], use_cache=True)  # the first buffer holds 10 + 256 slots
        cache, steps = out.past_key_values, [out.logits]
        for t in range(10, 300):  # so decoding grows it once, at token 266
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    assert cache.layers[0].k_buffer.shape[2] > 266
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)
