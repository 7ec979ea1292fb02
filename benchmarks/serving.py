"""Serving throughput: continuous batching vs sequential batch-1 and vs transformers' static batching.

Same machine, same run, same weights: a randomly initialised ``LlamaConfig.from_name("small")``
(vocab 32000), ``--requests`` prompts of ``--prompt-len`` random tokens, ``--new-tokens`` greedy
tokens each (eos ignored, so every system produces the same number of tokens).

* seekdeep continuous batching: all requests submitted at once to the engine (paged KV cache,
  chunked prefill, iteration-level scheduling), ``max_num_seqs = --concurrency``.
* anchor 1: sequential batch-1 serving through the same engine (one request at a time).
* anchor 2: Hugging Face transformers ``generate`` with static batches of ``--concurrency``
  on the same weights (saved by seekdeep, loaded with transformers).
* a variable-length workload (new tokens drawn from 16..``--new-tokens``), where static batches
  wait for their longest member while continuous batching refills the batch every step.
* the HTTP server (``seekdeep serve``) driven by ``seekdeep bench`` at the same concurrency:
  TTFT / TPOT / ITL percentiles, ratio against the bare engine.
* ``--parts profile``: where the CPU time of the fixed-length row goes on each side -- thread CPU
  seconds (not wall: the machine is shared) of the output projection, attention and MLP modules,
  the rest of the decoder, and everything outside the model (engine loop, sampling; for
  transformers ``generate``'s own loop), summed over interleaved repeats; plus torch.profiler's
  per-op self CPU time of one prefill and one decode step of each side.

Run: ``.venv/bin/python benchmarks/serving.py`` (``--device cuda`` on a GPU machine).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_capability_fields, device_name, emit  # noqa: E402
from serving_speculative import add_arguments as add_speculative_arguments, bench_speculative  # noqa: E402

from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM  # noqa: E402
from seekdeep.serve.engine import Engine, EngineConfig  # noqa: E402
from seekdeep.serve.sampling import SamplingParams  # noqa: E402


def run_engine(engine: Engine, prompts: list[list[int]], new_tokens: list[int]) -> tuple[float, int]:
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in new_tokens]
    engine.reset_prefix_cache()  # repeats reuse the prompts: each run computes them like transformers does
    start = time.perf_counter()
    outputs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    produced = sum(len(o) for o in outputs)
    assert produced == sum(new_tokens), "every request must produce exactly its new tokens"
    return elapsed, produced


def run_hf_static(hf_model, prompts: list[list[int]], new_tokens: list[int], batch: int, device: str) -> tuple[float, int]:
    produced = 0
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        ids = torch.tensor(prompts[i : i + batch], device=device)
        n = max(new_tokens[i : i + batch])  # a static batch runs until its longest request is done
        with torch.no_grad():
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                    do_sample=False, pad_token_id=0)
        produced += sum(new_tokens[i : i + batch])  # tokens a client asked for; the rest is waste
        assert out.shape[1] == ids.shape[1] + n
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, produced


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_server_bench(model_dir: Path, args) -> dict:
    import httpx

    from seekdeep.serve.bench import BenchConfig, run_bench

    port = free_port()
    cmd = [sys.executable, "-m", "seekdeep.cli", "serve", str(model_dir), "--port", str(port), "--log-level", "warning",
           "--max-num-seqs", str(args.concurrency), "--device", args.device,
           "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    log = open(model_dir.parent / "server.log", "w+")
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                if health.status_code == 200:
                    break
                if health.json().get("status") == "error":
                    raise RuntimeError(f"server failed to load the model: {health.json()}")
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"server did not start:\n{log.read()}")
            time.sleep(0.5)
        cfg = BenchConfig(url=f"http://127.0.0.1:{port}", num_requests=args.requests, max_concurrency=args.concurrency,
                          prompt_len=args.prompt_len, max_tokens=args.new_tokens)
        report = asyncio.run(run_bench(cfg))
        # embedding cache: the same 16 inputs twice; the second pass is answered from the cache
        rng = random.Random(1)
        inputs = [[rng.randrange(1000) for _ in range(args.prompt_len)] for _ in range(16)]
        passes = []
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:  # one keep-alive connection
            for _ in range(2):
                times = []
                for ids in inputs:
                    start = time.perf_counter()
                    client.post("/v1/embeddings", json={"model": model_dir.name, "input": ids}).raise_for_status()
                    times.append(time.perf_counter() - start)
                passes.append(statistics.median(times))
        report["embedding_latency_s"] = {"miss": passes[0], "hit": passes[1]}
        return report
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()


# ----------------------------------------------------------------------------- Poisson traces


def run_trace(engine: Engine, trace: list[tuple[float, list[int], SamplingParams]], tag: str,
              clock: str = "wall") -> dict[str, list[float]]:
    """Replay ``(arrival, prompt, params)`` against the engine (requests join at their arrival,
    the loop steps whenever work is queued). Per request: time to first token and end-to-end
    latency from its arrival, and its output length. ``clock="wall"``: arrivals and latencies
    in seconds, in real time; ``clock="steps"``: in engine steps (one step = one time unit),
    which takes the shared machine's drifting speed out of a comparison of orderings."""
    start = time.perf_counter()
    steps = 0
    arrival, first, done, produced = {}, {}, {}, {}
    i = 0
    while i < len(trace) or engine.has_unfinished():
        now = time.perf_counter() - start if clock == "wall" else steps
        while i < len(trace) and trace[i][0] <= now:
            rid = f"{tag}-{i}"
            engine.add_request(rid, trace[i][1], trace[i][2])
            arrival[rid] = trace[i][0]
            i += 1
        if not engine.has_unfinished():
            if clock == "wall":
                time.sleep(max(0.0, trace[i][0] - now))
            else:
                steps = math.ceil(trace[i][0])
            continue
        outputs = engine.step()
        steps += 1
        t = time.perf_counter() - start if clock == "wall" else steps
        for out in outputs:
            if out.new_token_ids and out.request_id not in first:
                first[out.request_id] = t
            if out.finished:
                done[out.request_id] = t
                produced[out.request_id] = out.num_output_tokens
    ids = list(arrival)
    return {"ttft": [first[r] - arrival[r] for r in ids], "latency": [done[r] - arrival[r] for r in ids],
            "output_tokens": [produced[r] for r in ids]}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]  # nearest rank


def poisson_arrivals(n: int, rate: float, rng: random.Random) -> list[float]:
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def bench_prefix_cache(model, args, dev_name: str) -> None:
    """A shared ``--system-len``-token system prompt + a short user turn per request, Poisson
    arrivals: TTFT with the prefix cache vs without, same trace, interleaved repeats (each
    starts with an empty cache, so its first request is a miss)."""
    vocab = model.config.vocab_size
    rng = random.Random(3)
    system = [rng.randrange(vocab) for _ in range(args.system_len)]
    prompts = [system + [rng.randrange(vocab) for _ in range(rng.randint(16, 64))] for _ in range(args.trace_requests)]
    params = SamplingParams(max_tokens=args.trace_new_tokens, temperature=0, ignore_eos=True)
    cfg = dict(max_num_seqs=args.concurrency, max_num_batched_tokens=args.max_num_batched_tokens)
    engines = {"cached": Engine(model, EngineConfig(**cfg)), "cold": Engine(model, EngineConfig(**cfg, prefix_caching=False))}
    # rate: half of what the cache-less engine sustains (a 1K prefill per request), so the anchor is not overloaded
    start = time.perf_counter()
    engines["cold"].generate(prompts[:4], params)
    per_request = (time.perf_counter() - start) / 4
    rate = 0.5 / per_request
    trace_times = poisson_arrivals(len(prompts), rate, random.Random(4))
    trace = list(zip(trace_times, prompts, [params] * len(prompts)))
    runs = {k: {"p50": [], "p99": [], "hit_rate": []} for k in engines}
    for rep in range(args.repeats):
        for name, engine in engines.items():
            engine.reset_prefix_cache()
            q0, h0 = engine.scheduler.prefix_query_tokens, engine.scheduler.prefix_hit_tokens
            result = run_trace(engine, trace, f"prefix-{rep}")
            runs[name]["p50"].append(statistics.median(result["ttft"]))
            runs[name]["p99"].append(percentile(result["ttft"], 99))
            q, h = engine.scheduler.prefix_query_tokens - q0, engine.scheduler.prefix_hit_tokens - h0
            runs[name]["hit_rate"].append(h / q if q else 0.0)
    workload = dict(requests=len(prompts), system_prompt_tokens=args.system_len, user_tokens="uniform 16..64",
                    new_tokens=args.trace_new_tokens, arrival_rate_per_s=round(rate, 3), max_num_seqs=args.concurrency,
                    model="llama small (19.5M, vocab 32000)", dtype="float32", **cpu_capability_fields())
    for q in ("p50", "p99"):
        emit(f"serving_prefix_cache_ttft_{q}_s", statistics.median(runs["cached"][q]), "s", statistics.median(runs["cold"][q]),
             "the same engine and Poisson trace without prefix caching", dev_name, **workload,
             target_ratio=0.3 if q == "p50" else None, runs=[round(x, 4) for x in runs["cached"][q]],
             anchor_runs=[round(x, 4) for x in runs["cold"][q]],
             hit_rate=round(statistics.median(runs["cached"]["hit_rate"]), 4))


def bench_ragged_decode(model, args, dev_name: str) -> None:
    """Decode rows of very different history lengths (prompts of 16..--ragged-max-len tokens,
    all decoding together): one padded forward vs the runner's length buckets. Output tokens/s
    and the padding fraction of the key slots the decode forwards attended over."""
    rng = random.Random(7)
    vocab = model.config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(16, args.ragged_max_len))] for _ in range(args.concurrency)]
    new_tokens = [args.trace_new_tokens * 4] * len(prompts)
    cfg = dict(max_num_seqs=args.concurrency, max_num_batched_tokens=args.max_num_batched_tokens, prefix_caching=False)
    engines = {"buckets": Engine(model, EngineConfig(**cfg)), "padded": Engine(model, EngineConfig(**cfg, decode_buckets=1))}
    runs = {k: {"tps": [], "padding": []} for k in engines}
    for _ in range(args.repeats):
        for name, engine in engines.items():
            slots, real = engine.runner.decode_key_slots, engine.runner.decode_real_slots
            t, n = run_engine(engine, prompts, new_tokens)
            runs[name]["tps"].append(n / t)
            slots, real = engine.runner.decode_key_slots - slots, engine.runner.decode_real_slots - real
            runs[name]["padding"].append(1 - real / slots)
    padding = {k: round(statistics.median(v["padding"]), 4) for k, v in runs.items()}
    emit("serving_ragged_decode_length_buckets_tokens_per_s", statistics.median(runs["buckets"]["tps"]), "output tokens/s",
         statistics.median(runs["padded"]["tps"]), "the same engine, every decode row padded to the longest history",
         dev_name, requests=len(prompts), prompt_len=f"uniform 16..{args.ragged_max_len}", new_tokens=new_tokens[0],
         padding_fraction=padding["buckets"], anchor_padding_fraction=padding["padded"],
         runs=[round(x, 2) for x in runs["buckets"]["tps"]], anchor_runs=[round(x, 2) for x in runs["padded"]["tps"]],
         model="llama small (19.5M, vocab 32000)", **cpu_capability_fields())


def length_trace(model, n: int, rng: random.Random, max_tokens: int):
    """Requests of four tasks (a 16-token instruction each) whose outputs end at a stop token
    after a task-typical length (6, 20, 60 or 150 tokens, +-25%). The stop token is the token a
    seeded sampled continuation produces at that position, found by generating it once: every
    request then ends by itself (as at an eos), while max_tokens is the same for all."""
    vocab = model.config.vocab_size
    tasks = [([rng.randrange(vocab) for _ in range(16)], length) for length in (6, 20, 60, 150)]
    requests = []
    for i in range(n):
        instruction, length = tasks[rng.randrange(len(tasks))]
        prompt = instruction + [rng.randrange(vocab) for _ in range(rng.randint(8, 48))]
        target = max(2, round(length * rng.uniform(0.75, 1.25)))
        requests.append((prompt, target, 1000 + i))
    probe = Engine(model, EngineConfig(max_num_seqs=32, max_num_batched_tokens=4096, prefix_caching=False))
    continuations = probe.generate([p for p, _, _ in requests], [SamplingParams(max_tokens=max(t for _, t, _ in requests),
                                   temperature=1.0, seed=s, ignore_eos=True) for _, _, s in requests])
    out = []
    for (prompt, target, seed), cont in zip(requests, continuations):
        j = target - 1
        while j < len(cont) - 1 and cont[j] in cont[:j]:  # the first position at or after the target whose token is new
            j += 1
        out.append((prompt, SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, ignore_eos=True,
                                           stop_token_ids=[cont[j]]), j + 1))
    return out


def bench_length_scheduling(model, args, dev_name: str) -> None:
    """Shortest-predicted-first (the predictor trained on a warm-up trace's finished requests)
    vs FCFS admission under the same Poisson trace: mean and p99 end-to-end latency."""
    rng = random.Random(5)
    warmup = length_trace(model, args.trace_requests, rng, 256)
    measured = length_trace(model, args.trace_requests, rng, 256)
    cfg = dict(max_num_seqs=args.schedule_seqs, max_num_batched_tokens=args.max_num_batched_tokens, prefix_caching=False)
    engines = {"predicted": Engine(model, EngineConfig(**cfg, schedule="predicted")),
               "fcfs": Engine(model, EngineConfig(**cfg))}
    # the server's own history: the predicted engine learns from the warm-up requests it finishes
    engines["predicted"].generate([p for p, _, _ in warmup], [sp for _, sp, _ in warmup])
    # rate: 90% of what FCFS sustains on this trace when every request is queued at once
    start, steps = time.perf_counter(), engines["fcfs"].num_steps
    engines["fcfs"].generate([p for p, _, _ in measured], [sp for _, sp, _ in measured])
    rate = 0.9 * len(measured) / (time.perf_counter() - start)
    step_rate = 0.9 * len(measured) / (engines["fcfs"].num_steps - steps)
    times = poisson_arrivals(len(measured), 1.0, random.Random(6))  # unit rate, scaled per clock below
    runs = {k: {"mean": [], "p99": [], "tokens": []} for k in engines}
    step_runs = {k: {} for k in engines}
    for name, engine in engines.items():  # the step clock is deterministic: one run each
        result = run_trace(engine, [(t / step_rate, p, sp) for t, (p, sp, _) in zip(times, measured)], "steps", "steps")
        step_runs[name] = {"mean": statistics.mean(result["latency"]), "p99": percentile(result["latency"], 99)}
    trace = [(t / rate, p, sp) for t, (p, sp, _) in zip(times, measured)]
    for rep in range(args.repeats):
        for name, engine in engines.items():
            result = run_trace(engine, trace, f"sched-{rep}")
            runs[name]["mean"].append(statistics.mean(result["latency"]))
            runs[name]["p99"].append(percentile(result["latency"], 99))
            runs[name]["tokens"].append(sum(result["output_tokens"]))
    pred = engines["predicted"].length_predictor
    errors = [abs(pred.predict(p, 256) - n) / n for p, _, n in measured]
    workload = dict(requests=len(measured), tasks="4 instructions, outputs 6/20/60/150 tokens +-25% (stop token)",
                    arrival_rate_per_s=round(rate, 3), max_num_seqs=args.schedule_seqs,
                    predictor_observations=pred.count, predictor_median_relative_error=round(statistics.median(errors), 3),
                    output_tokens={k: runs[k]["tokens"] for k in runs}, model="llama small (19.5M, vocab 32000)",
                    **cpu_capability_fields())
    for stat in ("mean", "p99"):
        emit(f"serving_length_aware_vs_fcfs_latency_{stat}_s", statistics.median(runs["predicted"][stat]), "s",
             statistics.median(runs["fcfs"][stat]), "FCFS admission, same engine and Poisson trace", dev_name,
             **workload, runs=[round(x, 4) for x in runs["predicted"][stat]],
             anchor_runs=[round(x, 4) for x in runs["fcfs"][stat]])
        emit(f"serving_length_aware_vs_fcfs_latency_{stat}_steps", step_runs["predicted"][stat], "engine steps",
             step_runs["fcfs"][stat], "FCFS admission, same engine and trace, time counted in engine steps", dev_name,
             **{**workload, "arrival_rate_per_step": round(step_rate, 4)})


def bench_profile(model, hf, engine: Engine, prompts: list[list[int]], args, dev_name: str, workload: dict) -> None:
    """The CPU-time split of the fixed-length throughput row, ours vs transformers (see the
    module docstring). Forward hooks read ``time.thread_time`` around the modules; the engine's
    lm_head goes through the runner's OutputHead, so ours is timed there."""
    from collections import defaultdict

    from seekdeep.serve.runner import OutputHead

    clock = time.thread_time
    acc: dict[str, float] = defaultdict(float)
    hooks = []

    def timed(module, key):
        def pre(m, _args):
            m._bench_t0 = clock()

        def post(m, _args, _out):
            acc[key] += clock() - m._bench_t0

        hooks.extend([module.register_forward_pre_hook(pre), module.register_forward_hook(post)])

    for side, m in (("seekdeep", model), ("transformers", hf)):
        timed(m.model, f"{side}.decoder")
        timed(m.lm_head, f"{side}.lm_head")
        for layer in m.model.layers:
            timed(layer.self_attn, f"{side}.attention")
            timed(layer.mlp, f"{side}.mlp")
    head_call = OutputHead.__call__

    def timed_head(self, hidden):
        t0 = clock()
        out = head_call(self, hidden)
        acc["seekdeep.lm_head"] += clock() - t0
        return out

    OutputHead.__call__ = timed_head
    fixed = [args.new_tokens] * len(prompts)
    total = defaultdict(float)
    try:
        for _ in range(args.repeats):
            for side, run in (("seekdeep", lambda: run_engine(engine, prompts, fixed)),
                              ("transformers", lambda: run_hf_static(hf, prompts, fixed, args.concurrency, args.device))):
                t0 = clock()
                run()
                total[side] += clock() - t0
    finally:
        OutputHead.__call__ = head_call
        for h in hooks:
            h.remove()
    parts = {}
    for side in ("seekdeep", "transformers"):
        decoder = acc[f"{side}.decoder"]
        parts[side] = {"lm_head": acc[f"{side}.lm_head"], "attention": acc[f"{side}.attention"], "mlp": acc[f"{side}.mlp"],
                       "decoder_rest": decoder - acc[f"{side}.attention"] - acc[f"{side}.mlp"],
                       "outside_model": total[side] - decoder - acc[f"{side}.lm_head"], "total": total[side]}
    for part in parts["seekdeep"]:
        emit(f"serving_profile_{part}_cpu_s", parts["seekdeep"][part], "thread CPU s", parts["transformers"][part],
             "transformers generate, static batches, same workload", dev_name, **workload, repeats=args.repeats,
             share_of_total=round(parts["seekdeep"][part] / total["seekdeep"], 4),
             anchor_share_of_total=round(parts["transformers"][part] / total["transformers"], 4))
    # per-op self CPU time of one prefill and one decode step of each side (torch.profiler)
    from torch.profiler import ProfilerActivity, profile

    def top_ops(fn, n=8) -> list:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:n]
        return [[e.key, round(e.self_cpu_time_total / 1e3, 2), e.count] for e in ops]

    from transformers import DynamicCache

    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    engine.reset_prefix_cache()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"profile-{i}", prompt, params)
    steps = min(8, args.new_tokens // 4)  # decode steps profiled (one is too noisy on a shared machine)
    ours = {"prefill": top_ops(engine.step)}
    for _ in range(args.new_tokens // 2):
        engine.step()
    ours["decode"] = top_ops(lambda: [engine.step() for _ in range(steps)])
    engine.abort_all()
    ids = torch.tensor(prompts, device=args.device)
    cache = DynamicCache(config=hf.config)
    theirs = {}
    with torch.no_grad():
        def hf_prefill():
            out = hf(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            return out.logits[:, -1].float().argmax(-1)

        theirs["prefill"] = top_ops(hf_prefill)
        step_ids = ids[:, -1:]
        for _ in range(args.new_tokens // 2):
            hf(step_ids, past_key_values=cache, use_cache=True)
        theirs["decode"] = top_ops(lambda: [hf(step_ids, past_key_values=cache, use_cache=True).logits[:, -1].float()
                                            .argmax(-1) for _ in range(steps)])
    for phase in ("prefill", "decode"):
        emit(f"serving_profile_{phase}_top_ops_ms", sum(x[1] for x in ours[phase]), "ms self CPU (top ops)",
             sum(x[1] for x in theirs[phase]), "transformers forward + argmax at the same step(s)", dev_name,
             requests=len(prompts), prompt_len=len(prompts[0]), steps=1 if phase == "prefill" else steps,
             ops=ours[phase], anchor_ops=theirs[phase])


def save_word_tokenizer(model_dir: Path, vocab_size: int) -> None:
    """A word-level tokenizer with one token per id (the benchmark sends token-id prompts; the
    server still needs a tokenizer to stream text back)."""
    import tokenizers
    from tokenizers import models, pre_tokenizers

    from seekdeep.tokenizer import Tokenizer

    vocab = {f"w{i}": i for i in range(vocab_size - 1)} | {"<unk>": vocab_size - 1}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    Tokenizer.from_tokenizers(tok, unk_token="<unk>").save_pretrained(model_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--sequential-requests", type=int, default=4,
                        help="requests timed for the batch-1 anchor (its rate is per request, so a few suffice)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=4096,
                        help="engine token budget per step (4096 = one wave of 32 x 128-token prompts)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per system; the median is reported")
    parser.add_argument("--skip-server", action="store_true")
    parser.add_argument("--parts", default="throughput,prefix,schedule,ragged,server",
                        help="comma-separated: throughput (vs transformers), prefix (TTFT with a shared system prompt), "
                        "schedule (length-aware vs FCFS), ragged (decode length buckets), server (HTTP); not in the "
                        "default set: speculative (drafter / n-gram vs the full model alone), profile (where the CPU "
                        "time of the throughput row goes, each side)")
    parser.add_argument("--system-len", type=int, default=1024, help="prefix part: shared system prompt tokens")
    parser.add_argument("--trace-requests", type=int, default=24, help="prefix / schedule parts: requests per trace")
    parser.add_argument("--trace-new-tokens", type=int, default=16, help="prefix part: tokens generated per request")
    parser.add_argument("--ragged-max-len", type=int, default=1024, help="ragged part: longest prompt")
    parser.add_argument("--schedule-seqs", type=int, default=4,
                        help="schedule part: max_num_seqs (small, so that requests queue and the order matters)")
    add_speculative_arguments(parser)
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    unknown = parts - {"throughput", "prefix", "schedule", "ragged", "server", "speculative", "profile"}
    if unknown:
        parser.error(f"--parts: unknown {sorted(unknown)}")
    if args.skip_server:
        parts.discard("server")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    dev_name = device_name(device)
    torch.manual_seed(0)
    cfg = LlamaConfig.from_name("small", vocab_size=32000, max_position_embeddings=2048, eos_token_id=None,
                                bos_token_id=None, pad_token_id=0, attention_backend="sdpa")
    model = LlamaForCausalLM(cfg)
    model.init_weights()
    model = model.to(device).eval()
    rng = random.Random(0)
    prompts = [[rng.randrange(cfg.vocab_size) for _ in range(args.prompt_len)] for _ in range(args.requests)]
    fixed = [args.new_tokens] * args.requests
    variable = [rng.randint(16, args.new_tokens) for _ in range(args.requests)]
    workload = dict(requests=args.requests, concurrency=args.concurrency, prompt_len=args.prompt_len,
                    new_tokens=args.new_tokens, model="llama small (19.5M, vocab 32000)", dtype="float32",
                    max_num_batched_tokens=args.max_num_batched_tokens, **cpu_capability_fields())
    if "prefix" in parts:
        bench_prefix_cache(model, args, dev_name)
    if "schedule" in parts:
        bench_length_scheduling(model, args, dev_name)
    if "ragged" in parts:
        bench_ragged_decode(model, args, dev_name)
    if "speculative" in parts:
        bench_speculative(args, dev_name)
    if not parts & {"throughput", "server", "profile"}:
        return

    budget = args.max_num_batched_tokens
    engine = Engine(model, EngineConfig(max_num_seqs=args.concurrency, max_num_batched_tokens=budget))
    seq_engine = Engine(model, EngineConfig(max_num_seqs=1, max_num_batched_tokens=budget))
    run_engine(engine, prompts[:2], [8, 8])  # warm-up

    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "small"
        model.save_pretrained(model_dir)
        save_word_tokenizer(model_dir, cfg.vocab_size)
        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                               attn_implementation="sdpa").to(device).eval()
        run_hf_static(hf, prompts[:2], [8, 8], 2, device)  # warm-up

        cb_tps = None
        if "throughput" in parts:
            # Interleaved repeats, median kept: the machine is shared, so load drifts during a run.
            # The order of seekdeep and transformers alternates between repeats (drift within a
            # repeat then favours neither), and each run's process CPU time is kept beside its wall
            # time: on a shared machine tokens per CPU second is the steadier comparison.
            runs: dict[str, list[float]] = {"cb": [], "seq": [], "hf": [], "cb_var": [], "hf_var": []}
            cpu: dict[str, list[float]] = {k: [] for k in runs}

            def timed(key, fn):
                c0 = time.process_time()
                t, n = fn()
                runs[key].append(n / t)
                cpu[key].append(n / (time.process_time() - c0))

            for rep in range(args.repeats):
                pairs = [("cb", lambda: run_engine(engine, prompts, fixed)),
                         ("hf", lambda: run_hf_static(hf, prompts, fixed, args.concurrency, device))]
                var_pairs = [("cb_var", lambda: run_engine(engine, prompts, variable)),
                             ("hf_var", lambda: run_hf_static(hf, prompts, variable, args.concurrency, device))]
                for key, fn in pairs[:: 1 if rep % 2 == 0 else -1]:
                    timed(key, fn)
                seq_time, seq_tokens = 0.0, 0
                for p in prompts[: args.sequential_requests]:
                    t, n = run_engine(seq_engine, [p], [args.new_tokens])
                    seq_time, seq_tokens = seq_time + t, seq_tokens + n
                runs["seq"].append(seq_tokens / seq_time)
                for key, fn in var_pairs[:: 1 if rep % 2 == 0 else -1]:
                    timed(key, fn)
            med = {k: statistics.median(v) for k, v in runs.items()}
            rounded = {k: [round(x, 2) for x in v] for k, v in runs.items()}
            cpu_med = {k: statistics.median(v) for k, v in cpu.items() if v}
            cpu_fields = {key: dict(tokens_per_cpu_s=round(cpu_med[key], 2), anchor_tokens_per_cpu_s=round(cpu_med[anchor], 2),
                                    cpu_ratio=round(cpu_med[key] / cpu_med[anchor], 4),
                                    cpu_runs=[round(x, 2) for x in cpu[key]], anchor_cpu_runs=[round(x, 2) for x in cpu[anchor]])
                          for key, anchor in (("cb", "hf"), ("cb_var", "hf_var"))}
            cb_tps = med["cb"]
            emit("serving_continuous_vs_sequential_batch1_tokens_per_s", cb_tps, "output tokens/s", med["seq"],
                 "same engine, one request at a time (batch 1)", dev_name, **workload,
                 sequential_requests_timed=args.sequential_requests, target_ratio=8.0,
                 decode_path=engine.runner.decode_path, runs=rounded["cb"], anchor_runs=rounded["seq"])
            emit("serving_continuous_vs_hf_static_batching_tokens_per_s", cb_tps, "output tokens/s", med["hf"],
                 f"transformers {transformers.__version__} generate, static batches of {args.concurrency}", dev_name,
                 **workload, target_ratio=1.1, runs=rounded["cb"], anchor_runs=rounded["hf"], **cpu_fields["cb"])
            emit("serving_variable_lengths_continuous_vs_hf_static_tokens_per_s", med["cb_var"],
                 "useful output tokens/s", med["hf_var"],
                 "transformers generate, static batches (wait for the longest request)", dev_name,
                 **{**workload, "new_tokens": f"uniform 16..{args.new_tokens}"}, target_ratio=1.3, runs=rounded["cb_var"],
                 anchor_runs=rounded["hf_var"], **cpu_fields["cb_var"])
        if "profile" in parts:
            bench_profile(model, hf, engine, prompts, args, dev_name, workload)
        del hf

        if "server" in parts:
            report = run_server_bench(model_dir, args)
            emit("serving_http_server_output_tokens_per_s", report["output_tokens_per_s"], "output tokens/s", cb_tps,
                 "the bare engine in-process (HTTP + SSE + detokenization overhead)", dev_name, **workload,
                 completed=report["completed"], ttft_ms=report["ttft_ms"], tpot_ms=report["tpot_ms"],
                 itl_ms=report["itl_ms"], request_throughput=report["request_throughput"])
            latency = report["embedding_latency_s"]
            emit("serving_embedding_cache_hit_latency_ms", latency["hit"] * 1e3, "median ms per /v1/embeddings request",
                 latency["miss"] * 1e3, "the same request answered by a forward pass (cache miss)", dev_name,
                 input_tokens=args.prompt_len, requests=16)


if __name__ == "__main__":
    main()
