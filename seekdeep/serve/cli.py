"""``seekdeep serve`` and ``seekdeep bench`` (plugged into :mod:`seekdeep.cli`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path


def cmd_serve(args: argparse.Namespace) -> int:
    from seekdeep.files import check_model_path
    from seekdeep.serve.engine import EngineConfig
    from seekdeep.serve.server import ServerConfig, run_server

    engine = EngineConfig(
        block_size=args.block_size,
        num_blocks=args.num_blocks,
        kv_cache_memory=args.kv_cache_memory,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        compile_decode={"auto": None, "on": True, "off": False}[args.compile_decode],
        prefix_caching=not args.no_prefix_cache,
        schedule=args.schedule,
    )
    config = ServerConfig(
        model_dirs=[str(Path(p)) for p in args.models],
        model_names=args.model_name,
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get("SEEKDEEP_API_KEY") or None,
        engine=engine,
        max_queue=args.max_queue,
        max_images=args.max_images,
        max_image_pixels=args.max_image_pixels,
        route_threshold=args.route_threshold,
        speculative=args.speculative,
        num_speculative_tokens=args.num_speculative_tokens,
        embedding_cache_size=args.embedding_cache_size,
        dtype=args.dtype,
        device=args.device,
        shutdown_timeout=args.shutdown_timeout,
    )
    for path in config.model_dirs:  # before the port is bound or any model loaded
        check_model_path("models", path)
    run_server(config, log_level=args.log_level)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from seekdeep.serve.bench import BenchConfig, format_table, run_bench

    cfg = BenchConfig(
        url=args.url, model=args.model, num_requests=None if args.duration else args.num_requests,
        duration=args.duration, qps=args.qps, max_concurrency=args.max_concurrency, prompt_len=args.prompt_len,
        max_tokens=args.max_tokens, ignore_eos=not args.stop_at_eos, temperature=args.temperature, seed=args.seed,
        api_key=args.api_key or os.environ.get("SEEKDEEP_API_KEY") or None, allow_remote=args.allow_remote,
    )
    report = asyncio.run(run_bench(cfg))
    print(format_table(report), file=sys.stderr)
    text = json.dumps(report)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    return 0 if report["completed"] else 1


def register(subparsers) -> None:
    serve = subparsers.add_parser("serve", help="OpenAI-compatible server (continuous batching, paged KV cache)")
    serve.add_argument("models", nargs="+", metavar="MODEL_DIR",
                       help="model directories, smallest first; model 'auto' routes between the first and the last")
    serve.add_argument("--model-name", action="append", default=None,
                       help="served id, once per MODEL_DIR in order (default: the directory name)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set SEEKDEEP_API_KEY)")
    serve.add_argument("--max-num-seqs", type=int, default=32, help="running batch size limit")
    serve.add_argument("--max-num-batched-tokens", type=int, default=2048,
                       help="token budget per step (prompt chunks + decodes)")
    serve.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    serve.add_argument("--kv-cache-memory", default="512MiB", help="KV-cache size per model with a unit, e.g. 512MiB or 2GiB")
    serve.add_argument("--num-blocks", type=int, default=None, help="KV-cache blocks (overrides --kv-cache-memory)")
    serve.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    serve.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    serve.add_argument("--max-images", type=int, default=8, help="images per chat request (vision-language models)")
    serve.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="largest decoded image, in pixels")
    serve.add_argument("--route-threshold", type=int, default=256,
                       help="for model 'auto': prompt + max tokens at most this go to the first model")
    serve.add_argument("--embedding-cache-size", type=int, default=1024, help="cached embeddings (0 disables)")
    serve.add_argument("--speculative", choices=("none", "draft", "ngram"), default="none",
                       help="speculative decoding: 'draft' = the first (compact) model drafts for the last (full) one, "
                       "'ngram' = prompt lookup; outputs keep the full model's greedy tokens / distribution")
    serve.add_argument("--num-speculative-tokens", type=int, default=4, help="draft tokens verified per step")
    serve.add_argument("--compile-decode", choices=("auto", "on", "off"), default="auto",
                       help="torch.compile + CUDA graphs for decode (auto: on when CUDA is used)")
    serve.add_argument("--no-prefix-cache", action="store_true",
                       help="do not share the KV blocks of common prompt prefixes between requests")
    serve.add_argument("--schedule", choices=("fcfs", "predicted"), default="fcfs",
                       help="admission order: arrival (fcfs) or shortest predicted output first with ageing; the "
                       "length predictor learns from finished requests and is saved in the model directory")
    serve.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16 or auto")
    serve.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, ...")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="seconds to drain requests on SIGTERM / Ctrl-C before aborting them")
    serve.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    serve.set_defaults(func=cmd_serve)

    bench = subparsers.add_parser("bench", help="load-test a running server on 127.0.0.1 (TTFT, TPOT, ITL, throughput)")
    bench.add_argument("--url", default="http://127.0.0.1:8000")
    bench.add_argument("--model", default=None, help="served model id (default: the first)")
    bench.add_argument("--num-requests", type=int, default=64)
    bench.add_argument("--duration", type=float, default=None, help="seconds to send for (instead of a count)")
    bench.add_argument("--qps", type=float, default=None, help="Poisson arrival rate (default: closed loop)")
    bench.add_argument("--max-concurrency", type=int, default=32)
    bench.add_argument("--prompt-len", type=int, default=128)
    bench.add_argument("--max-tokens", type=int, default=128)
    bench.add_argument("--temperature", type=float, default=0.0)
    bench.add_argument("--stop-at-eos", action="store_true", help="let requests end at eos (default: exactly --max-tokens)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--api-key", default=None)
    bench.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --url")
    bench.add_argument("--output", default=None, help="also write the JSON report here")
    bench.set_defaults(func=cmd_bench)
