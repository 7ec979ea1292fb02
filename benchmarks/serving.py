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

Run: ``.venv/bin/python benchmarks/serving.py`` (``--device cuda`` on a GPU machine).
"""

from __future__ import annotations

import argparse
import asyncio
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
from common import device_name, emit  # noqa: E402

from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM  # noqa: E402
from seekdeep.serve.engine import Engine, EngineConfig  # noqa: E402
from seekdeep.serve.sampling import SamplingParams  # noqa: E402


def run_engine(engine: Engine, prompts: list[list[int]], new_tokens: list[int]) -> tuple[float, int]:
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in new_tokens]
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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    dev_name = device_name(device)
    torch.manual_seed(0)
    cfg = LlamaConfig.from_name("small", vocab_size=32000, max_position_embeddings=512, eos_token_id=None,
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
                    max_num_batched_tokens=args.max_num_batched_tokens)

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

        # Interleaved repeats, median kept: the machine is shared, so load drifts during a run.
        runs: dict[str, list[float]] = {"cb": [], "seq": [], "hf": [], "cb_var": [], "hf_var": []}
        for _ in range(args.repeats):
            t, n = run_engine(engine, prompts, fixed)
            runs["cb"].append(n / t)
            t, n = run_hf_static(hf, prompts, fixed, args.concurrency, device)
            runs["hf"].append(n / t)
            seq_time, seq_tokens = 0.0, 0
            for p in prompts[: args.sequential_requests]:
                t, n = run_engine(seq_engine, [p], [args.new_tokens])
                seq_time, seq_tokens = seq_time + t, seq_tokens + n
            runs["seq"].append(seq_tokens / seq_time)
            t, n = run_engine(engine, prompts, variable)
            runs["cb_var"].append(n / t)
            t, n = run_hf_static(hf, prompts, variable, args.concurrency, device)
            runs["hf_var"].append(n / t)
        med = {k: statistics.median(v) for k, v in runs.items()}
        rounded = {k: [round(x, 2) for x in v] for k, v in runs.items()}
        cb_tps = med["cb"]
        emit("serving_continuous_vs_sequential_batch1_tokens_per_s", cb_tps, "output tokens/s", med["seq"],
             "same engine, one request at a time (batch 1)", dev_name, **workload,
             sequential_requests_timed=args.sequential_requests, target_ratio=8.0,
             decode_path=engine.runner.decode_path, runs=rounded["cb"], anchor_runs=rounded["seq"])
        emit("serving_continuous_vs_hf_static_batching_tokens_per_s", cb_tps, "output tokens/s", med["hf"],
             f"transformers {transformers.__version__} generate, static batches of {args.concurrency}", dev_name,
             **workload, target_ratio=1.0, runs=rounded["cb"], anchor_runs=rounded["hf"])
        emit("serving_variable_lengths_continuous_vs_hf_static_tokens_per_s", med["cb_var"],
             "useful output tokens/s", med["hf_var"],
             "transformers generate, static batches (wait for the longest request)", dev_name,
             **{**workload, "new_tokens": f"uniform 16..{args.new_tokens}"}, runs=rounded["cb_var"],
             anchor_runs=rounded["hf_var"])
        del hf

        if not args.skip_server:
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
