"""``seekdeep profile``: latency / throughput vs batch size and input length, a table, a PNG."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from pathlib import Path

from seekdeep.errors import ConfigError


@dataclass
class ProfileConfig:
    """What ``seekdeep profile`` measures; every flag lands here unchanged and is checked here."""

    model: str
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    input_lengths: list[int] = field(default_factory=lambda: [128, 512])
    input_length: int | None = None  # recommend a batch size for it; None: the longest profiled
    new_tokens: int = 16
    latency_budget_ms: float | None = None
    repeats: int = 3
    warmup: int = 1
    output_dir: str = "runs/profile"
    dtype: str | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        from seekdeep.files import check_model_path
        from seekdeep.models.loading import parse_dtype
        from seekdeep.validate import check_device, check_float, check_int

        for name in ("batch_sizes", "input_lengths"):
            values = getattr(self, name)
            if not isinstance(values, (list, tuple)) or not values:
                raise ConfigError(name, f"got {values!r}; accepted: one or more integers")
            for value in values:
                check_int(name, value, 1, 1 << 16 if name == "batch_sizes" else 1 << 24)
        check_int("input_length", self.input_length, 1, 1 << 24, optional=True)
        check_int("new_tokens", self.new_tokens, 1, 1 << 20)
        check_float("latency_budget_ms", self.latency_budget_ms, 0, lo_open=True, optional=True)
        check_int("repeats", self.repeats, 1, 10**6)
        check_int("warmup", self.warmup, 0, 10**6)
        check_model_path("model", self.model)
        check_device("device", self.device)
        if self.dtype is not None:
            parse_dtype(self.dtype)
        out = Path(self.output_dir)
        if out.exists() and not out.is_dir():
            raise ConfigError("output_dir", f"{out} is a file; accepted: a directory")


def cmd_profile(args: argparse.Namespace) -> int:
    from seekdeep.auto import AutoModel
    from seekdeep.files import write_json_atomic
    from seekdeep.profiler.latency import LatencyProfiler, format_table, recommend
    from seekdeep.profiler.plot import plot_profile

    cfg = ProfileConfig(**{f.name: getattr(args, f.name) for f in fields(ProfileConfig)})
    model = AutoModel.from_pretrained(cfg.model, dtype=cfg.dtype, device=cfg.device)
    profiler = LatencyProfiler(model, new_tokens=cfg.new_tokens, repeats=cfg.repeats, warmup=cfg.warmup)
    measurements = profiler.profile(cfg.batch_sizes, cfg.input_lengths, cfg.latency_budget_ms)
    target = cfg.input_length or max(cfg.input_lengths)
    if target not in cfg.input_lengths:
        measurements += profiler.profile(cfg.batch_sizes, [target], cfg.latency_budget_ms)
    rec = recommend(measurements, target, cfg.latency_budget_ms)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_profile(measurements, out / "profile.png", rec)
    write_json_atomic(out / "profile.json", {"model": str(cfg.model), "recommendation": rec.to_dict(),
                                             "measurements": [m.to_dict() for m in measurements]})
    print(format_table(measurements, rec))
    print(f"\nrecommended batch size for input length {target}: {rec.batch_size} ({rec.reason})")
    print(f"wrote {out / 'profile.json'} and {png}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("profile", help="latency and throughput vs batch size / input length; recommends a batch size")
    p.add_argument("model", help="model directory (Hugging Face layout)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--input-lengths", type=int, nargs="+", default=[128, 512])
    p.add_argument("--input-length", type=int, default=None,
                   help="input length to recommend a batch size for (default: the longest profiled)")
    p.add_argument("--new-tokens", type=int, default=16, help="decode steps per measurement")
    p.add_argument("--latency-budget-ms", type=float, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--output-dir", default="runs/profile")
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_profile)
