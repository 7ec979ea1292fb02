"""``seekdeep profile``: latency / throughput vs batch size and input length, a table, a PNG."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_profile(args: argparse.Namespace) -> int:
    from seekdeep.auto import AutoModel
    from seekdeep.profiler.latency import LatencyProfiler, format_table, recommend
    from seekdeep.profiler.plot import plot_profile

    model = AutoModel.from_pretrained(args.model, dtype=args.dtype, device=args.device)
    profiler = LatencyProfiler(model, new_tokens=args.new_tokens, repeats=args.repeats, warmup=args.warmup)
    measurements = profiler.profile(args.batch_sizes, args.input_lengths, args.latency_budget_ms)
    target = args.input_length or max(args.input_lengths)
    if target not in args.input_lengths:
        measurements += profiler.profile(args.batch_sizes, [target], args.latency_budget_ms)
    rec = recommend(measurements, target, args.latency_budget_ms)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_profile(measurements, out / "profile.png", rec)
    (out / "profile.json").write_text(json.dumps({"model": str(args.model), "recommendation": rec.to_dict(),
                                                  "measurements": [m.to_dict() for m in measurements]}, indent=2))
    print(format_table(measurements, rec))
    print(f"\nrecommended batch size for input length {target}: {rec.batch_size} ({rec.reason})")
    print(f"wrote {out / 'profile.json'} and {png}")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def register(subparsers) -> None:
    p = subparsers.add_parser("profile", help="latency and throughput vs batch size / input length; recommends a batch size")
    p.add_argument("model", help="model directory (Hugging Face layout)")
    p.add_argument("--batch-sizes", type=_positive_int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--input-lengths", type=_positive_int, nargs="+", default=[128, 512])
    p.add_argument("--input-length", type=_positive_int, default=None,
                   help="input length to recommend a batch size for (default: the longest profiled)")
    p.add_argument("--new-tokens", type=_positive_int, default=16, help="decode steps per measurement")
    p.add_argument("--latency-budget-ms", type=float, default=None)
    p.add_argument("--repeats", type=_positive_int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--output-dir", default="runs/profile")
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_profile)
