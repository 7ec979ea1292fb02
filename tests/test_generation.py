from __future__ import annotations

import pytest
import torch

from seekdeep.errors import GenerationError
from seekdeep.generation import GenerationConfig, process_logits
from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig.from_name("tiny", vocab_size=64, max_position_embeddings=128, eos_token_id=None, bos_token_id=None))
    m.init_weights(std=0.3)  # peaky distributions so greedy paths differ between prompts
    return m.eval()


def _full_forward_greedy(model, ids, n):
    """Reference: recompute the whole sequence each step, no cache."""
    for _ in range(n):
        nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    return ids


def test_cached_greedy_equals_uncached(model):
    ids = torch.randint(0, 64, (1, 7))
    with torch.no_grad():
        ref = _full_forward_greedy(model, ids, 10)
    assert model.generate(ids, max_new_tokens=10).tolist() == ref.tolist()


@pytest.mark.parametrize("backend", ["eager", "sdpa", "dsa", "gated"])
def test_batched_prompts_of_different_lengths_match_single_runs(model, backend):
    torch.manual_seed(1)
    m = LlamaForCausalLM(LlamaConfig.from_name("tiny", vocab_size=64, max_position_embeddings=128, eos_token_id=None,
                                               attention_backend=backend, attention_options={"topk": 4} if backend == "dsa" else {}))
    m.init_weights(std=0.3)
    m.eval()
    prompts = [torch.randint(0, 64, (n,)) for n in (3, 9, 6)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):  # left padding
        ids[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    batched = m.generate(ids, attention_mask=mask, max_new_tokens=8)
    for row, p in enumerate(prompts):
        single = m.generate(p[None], max_new_tokens=8)
        assert batched[row, width:].tolist() == single[0, len(p):].tolist()


def test_stream_yields_what_generate_returns(model):
    ids = torch.randint(0, 64, (2, 5))
    steps = list(model.stream_generate(ids, max_new_tokens=6, do_sample=True, seed=3, top_k=10))
    assert len(steps) == 6
    full = model.generate(ids, max_new_tokens=6, do_sample=True, seed=3, top_k=10)
    assert torch.equal(full[:, 5:], torch.stack(steps, 1))


def test_seeded_sampling_is_reproducible_and_seed_matters(model):
    ids = torch.randint(0, 64, (1, 4))
    a = model.generate(ids, max_new_tokens=20, do_sample=True, seed=7, temperature=1.5)
    b = model.generate(ids, max_new_tokens=20, do_sample=True, seed=7, temperature=1.5)
    c = model.generate(ids, max_new_tokens=20, do_sample=True, seed=8, temperature=1.5)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_top_k_one_is_greedy(model):
    ids = torch.randint(0, 64, (1, 4))
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=True, top_k=1, seed=0), model.generate(ids, max_new_tokens=8))


def test_eos_stops_and_pads_finished_rows(model):
    ids = torch.randint(0, 64, (2, 4))
    free = model.generate(ids, max_new_tokens=6)
    eos = int(free[0, 5])  # row 0's second new token
    out = model.generate(ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=63)
    row0 = out[0, 4:].tolist()
    first = row0.index(eos)
    assert all(t == 63 for t in row0[first + 1:])
    if eos not in free[1, 4:].tolist():
        assert out[1, 4:].tolist() == free[1, 4:4 + out.shape[1] - 4].tolist()


class _CharTokenizer:
    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(97 + i % 26) for i in ids)


def test_stop_strings_end_generation(model):
    ids = torch.randint(0, 64, (1, 4))
    free = model.generate(ids, max_new_tokens=12)
    text = _CharTokenizer().decode(free[0, 4:].tolist())
    stop = text[3:5]
    out = model.generate(ids, max_new_tokens=12, stop_strings=[stop], tokenizer=_CharTokenizer())
    produced = _CharTokenizer().decode(out[0, 4:].tolist())
    assert produced.endswith(stop) and len(produced) <= 5
    with pytest.raises(GenerationError, match="stop_strings"):
        model.generate(ids, max_new_tokens=3, stop_strings=["x"])


def test_repetition_penalty_and_top_p_processing():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    seen = torch.tensor([[0, 1]])
    out = process_logits(logits, seen, GenerationConfig(repetition_penalty=2.0))
    assert out.tolist() == [[1.0, -2.0, 0.5, 0.0]]
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = process_logits(probs, seen, GenerationConfig(do_sample=True, top_p=0.75))
    assert torch.isfinite(kept).tolist() == [[True, True, False, False]]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=-1), "temperature"),  # 0 is greedy (as in the OpenAI API)
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(max_new_tokens=-2), "max_new_tokens"),
        (dict(max_new_tokens=1000), "max_new_tokens"),
        (dict(seed=-1), "seed"),
        (dict(num_beams=2), "num_beams"),
    ],
)
def test_bad_sampling_parameters_name_the_field(model, kwargs, field):
    with pytest.raises(GenerationError) as err:
        model.generate(torch.zeros(1, 3, dtype=torch.long), **kwargs)
    assert err.value.field == field


def test_bad_input_ids(model):
    with pytest.raises(GenerationError, match="input_ids"):
        model.generate(torch.zeros(3, dtype=torch.long))
    with pytest.raises(GenerationError, match=r"\[0, 64\)"):
        model.generate(torch.tensor([[1, 99]]))
