"""Length-aware scheduling: the output-length predictor (learning, persistence) and the
``predicted`` admission order (shortest first, ageing so nothing starves)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from seekdeep.errors import ConfigError
from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM
from seekdeep.serve.engine import Engine, EngineConfig
from seekdeep.serve.kv_cache import BlockAllocator
from seekdeep.serve.length_predictor import LengthPredictor
from seekdeep.serve.sampling import SamplingParams
from seekdeep.serve.scheduler import Scheduler, SchedulerConfig, Sequence


def _run(sched: Scheduler, steps: int, arrivals=None) -> list[tuple[int, str]]:
    """Drive the scheduler like the engine does; a sequence ends after ``predicted_output``
    tokens. Returns (step, seq_id) of every admission."""
    admitted, seen = [], set()
    for step in range(steps):
        for seq in (arrivals(step) if arrivals else []):
            sched.add(seq)
        batch = sched.schedule()
        for seq, n in batch.items:
            if seq.seq_id not in seen:
                seen.add(seq.seq_id)
                admitted.append((step, seq.seq_id))
            seq.num_computed += n
            if seq.num_computed == seq.num_tokens:
                seq.token_ids.append(1)
                if seq.num_output >= seq.predicted_output:
                    sched.finish(seq)
    return admitted


def _seq(seq_id: str, predicted: int, prompt: int = 4) -> Sequence:
    return Sequence(seq_id, [3] * prompt, max_tokens=1000, predicted_output=predicted)


def test_predicted_policy_admits_the_shortest_first_and_fcfs_in_arrival_order():
    order = {}
    for policy in ("fcfs", "predicted"):
        sched = Scheduler(SchedulerConfig(max_num_seqs=1, policy=policy, aging=0.01), BlockAllocator(64, 4))
        for seq_id, predicted in (("a", 30), ("b", 3), ("c", 12), ("d", 3)):
            sched.add(_seq(seq_id, predicted))
        order[policy] = [seq_id for _, seq_id in _run(sched, 200)]
    assert order["fcfs"] == ["a", "b", "c", "d"]
    assert order["predicted"] == ["b", "d", "c", "a"]  # ties keep arrival order
    with pytest.raises(ConfigError, match="policy"):
        SchedulerConfig(policy="sjf")
    with pytest.raises(ConfigError, match="schedule_aging"):
        EngineConfig(schedule="predicted", schedule_aging=float("nan"))


def test_ageing_lets_a_long_request_in_despite_a_stream_of_short_ones():
    def arrivals(step):  # a short request every step, forever
        return [_seq(f"short{step}", 2)]

    results = {}
    for aging in (1.0, 0.25):
        sched = Scheduler(SchedulerConfig(max_num_seqs=1, policy="predicted", aging=aging), BlockAllocator(256, 4))
        sched.add(_seq("long", 40))
        admitted = _run(sched, 600, arrivals)
        at = next(i for i, (_, seq_id) in enumerate(admitted) if seq_id == "long")
        before = [int(seq_id[5:]) for _, seq_id in admitted[:at]]
        # ageing is the same for everyone, so the long request (40 predicted tokens) is overtaken
        # only by short ones (2) that arrived less than (40 - 2) / aging steps after it
        assert before and max(before) <= (40 - 2) / aging
        results[aging] = admitted[at][0]
    assert results[1.0] < results[0.25]


def test_predictor_learns_lengths_from_the_prompt_and_round_trips(tmp_path, caplog):
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "model" / "length_predictor.json"
    path.parent.mkdir()
    pred = LengthPredictor(path=path, save_every=16)
    kinds = {7: 6, 9: 90}  # a prompt's first token decides its task and so its output length
    assert pred.predict([7, 1, 2], 256) == pred.predict([9, 1, 2], 256) == 64  # cold start: the default

    def prompt(first):
        return [first] + torch.randint(20, 500, (int(torch.randint(5, 40, (1,), generator=g)),), generator=g).tolist()

    for i in range(64):
        first = (7, 9)[i % 2]
        pred.observe(prompt(first), 256, kinds[first] + int(torch.randint(-2, 3, (1,), generator=g)))
    held_out = {first: sorted(pred.predict(prompt(first), 256) for _ in range(21)) for first in kinds}
    assert held_out[7][10] <= 15 and held_out[9][10] >= 45, held_out  # medians of unseen prompts
    short, long = pred.predict([7, 33, 44, 55], 256), pred.predict([9, 33, 44, 55], 256)
    assert pred.predict([9, 33, 44, 55], 20) == 20  # never more than max_tokens
    # saved every 16 observations, atomically (no temp file left), and loaded back identical
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["length_predictor.json"]
    loaded = LengthPredictor.load(path)
    assert loaded.count == 64 and loaded.predict([7, 33, 44, 55], 256) == short
    assert loaded.predict([9, 33, 44, 55], 256) == long
    # a corrupt file is logged and replaced by a cold predictor, not a crash
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING):
        cold = LengthPredictor.load(path)
    assert cold.count == 0 and cold.predict([9, 1], 256) == 64 and "ignoring the length predictor" in caplog.text
    path.write_text(json.dumps({**pred.to_dict(), "xty": [0.0]}))
    assert LengthPredictor.load(path).count == 0
    with pytest.raises(ConfigError, match="default"):
        LengthPredictor(default=0)


def test_engine_with_predicted_schedule_learns_and_keeps_greedy_outputs():
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig.from_name("tiny", vocab_size=256, max_position_embeddings=256,
                                                   eos_token_id=None, bos_token_id=None, attention_backend="sdpa"))
    model.init_weights(std=0.3)
    model.eval()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 30, 12, 8, 21, 3)]
    params = [SamplingParams(max_tokens=n, temperature=0) for n in (20, 3, 12, 2, 7, 15)]
    fcfs = Engine(model, EngineConfig(block_size=4, num_blocks=128, max_num_seqs=2))
    predicted = Engine(model, EngineConfig(block_size=4, num_blocks=128, max_num_seqs=2, schedule="predicted"))
    assert predicted.generate(prompts, params) == fcfs.generate(prompts, params)
    assert predicted.length_predictor.count == len(prompts)  # learnt from every finished request


def test_shortest_predicted_first_lowers_mean_latency_in_engine_steps():
    """Poisson arrivals at 90% load of four task lengths, exact predictions, 4 batch slots:
    latency counted in scheduler steps (no timing), the same trace under both policies."""
    import random
    import statistics

    def mean_latency(policy: str, seed: int) -> float:
        rng = random.Random(seed)
        lengths = [max(2, round(rng.choice((6, 20, 60, 150)) * rng.uniform(0.75, 1.25))) for _ in range(200)]
        rate = 0.9 * 4 / statistics.mean(lengths)  # requests per step
        arrivals, t = [], 0.0
        for _ in lengths:
            t += rng.expovariate(rate)
            arrivals.append(t)
        sched = Scheduler(SchedulerConfig(max_num_seqs=4, policy=policy, max_model_len=4096), BlockAllocator(20000, 16))
        latency, step, i, index = [], 0, 0, {}
        while i < len(lengths) or sched.has_unfinished():
            while i < len(lengths) and arrivals[i] <= step:
                seq = Sequence(f"s{i}", [1] * 32, max_tokens=1000, predicted_output=lengths[i])
                index[seq.seq_id] = i
                sched.add(seq)
                i += 1
            batch = sched.schedule()
            step += 1
            for seq, n in batch.items:
                seq.num_computed += n
                if seq.num_computed == seq.num_tokens:
                    seq.token_ids.append(1)
                    if seq.num_output >= lengths[index[seq.seq_id]]:
                        sched.finish(seq)
                        latency.append(step - arrivals[index[seq.seq_id]])
        assert len(latency) == len(lengths)  # nothing starved
        return statistics.mean(latency)

    for seed in (0, 1):
        assert mean_latency("predicted", seed) < 0.92 * mean_latency("fcfs", seed)
