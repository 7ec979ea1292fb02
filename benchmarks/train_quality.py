"""Held-out perplexity of sparse / gated attention vs dense attention at an equal budget.

Trains the `seekdeep train` default (tiny llama on the standard library, same steps, data,
seed and schedule) once per variant and prints, for every variant but ``sdpa``, its held-out
perplexity against the dense (``sdpa``) run's. The issue's target for dsa is <= +2%.

Variants: ``sdpa`` (dense anchor), ``dsa`` (token-level top-k, ``--local-window`` recent keys
always kept), ``dsa-block`` (block mode, ``--block-size``), ``gated`` (dense + output gate).
A run whose ``summary.json`` already holds the same training config is reused (``--reuse``),
so variants can be trained in separate processes and reported together.

Usage:
    python benchmarks/train_quality.py [--variants sdpa,dsa] [--steps 700] [--topk 64]
    python benchmarks/train_quality.py --variants sdpa,dsa,dsa-block,gated --block-size 16 --reuse
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, fields
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, emit  # noqa: E402

from seekdeep.recipes.train import TrainConfig, train  # noqa: E402

VARIANTS = ("sdpa", "dsa", "dsa-block", "gated")
# Fields that do not change what is trained (so a run may be reused across them).
RUN_ONLY = {"output_dir", "progress", "resume", "device", "max_time"}
DSA_FIELDS = {"topk", "block_size", "local_window", "distance_bias", "dense_fraction", "indexer_warmup_steps", "indexer_loss_weight"}


def variant_config(variant: str, args) -> TrainConfig:
    backend = "dsa" if variant.startswith("dsa") else variant
    dsa = dict(topk=args.topk, local_window=args.local_window, dense_fraction=args.dense_fraction,
               indexer_warmup_steps=args.indexer_warmup_steps, indexer_loss_weight=args.indexer_loss_weight)
    if variant == "dsa-block":
        dsa["block_size"] = args.block_size
    else:
        dsa["distance_bias"] = args.distance_bias
    return TrainConfig(attention_backend=backend, steps=args.steps, seq_len=args.seq_len, seed=args.seed, progress=False,
                       output_dir=str(Path(args.out) / run_name(variant, args)), **(dsa if backend == "dsa" else {}))


def run_name(variant: str, args) -> str:
    """Folder name: the variant plus every dsa setting (and the seed) that differs from the recipe default."""
    seed = f"-seed{args.seed}" if args.seed != TrainConfig.seed else ""
    if not variant.startswith("dsa"):
        return variant + seed
    name = f"dsa-block{args.block_size}" if variant == "dsa-block" else "dsa"
    local_window = args.local_window if args.local_window is not None else max(1, args.topk // 2)
    for flag, value, default in (("k", args.topk, TrainConfig.topk), ("lw", local_window, max(1, args.topk // 2)),
                                 ("df", args.dense_fraction, TrainConfig.dense_fraction),
                                 ("iw", args.indexer_warmup_steps, TrainConfig.indexer_warmup_steps),
                                 ("ilw", args.indexer_loss_weight, TrainConfig.indexer_loss_weight),
                                 ("db", args.distance_bias if variant == "dsa" else None, TrainConfig.distance_bias)):
        if value != default:
            name += f"-{flag}{value}"
    return name + seed


def _identity(config: dict) -> dict:
    """The fields of a saved or wanted config that decide what is trained, normalised."""
    # A field missing from an older run's config had its default then; for local_window, the
    # query's own slot only (1), for distance_bias none (0). None means topk // 2 and seq_len.
    kept = {**{f.name: f.default for f in fields(TrainConfig)}, "local_window": 1, "distance_bias": 0, **config}
    kept = {k: v for k, v in kept.items() if k not in RUN_ONLY}
    if kept["attention_backend"] != "dsa":
        return {k: v for k, v in kept.items() if k not in DSA_FIELDS}
    if kept["local_window"] is None:
        kept["local_window"] = max(1, kept["topk"] // 2)
    if kept["distance_bias"] is None:
        kept["distance_bias"] = 0 if kept.get("block_size", 1) > 1 else kept["seq_len"]
    return kept


def reusable(cfg: TrainConfig) -> dict | None:
    """The finished run's summary when one exists for exactly this training config."""
    path = Path(cfg.output_dir) / "summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    if summary.get("stopped_early") or _identity(summary.get("config", {})) != _identity(asdict(cfg)):
        return None
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="sdpa,dsa")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--topk", type=int, default=TrainConfig.topk)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--local-window", type=int, default=TrainConfig.local_window)
    parser.add_argument("--dense-fraction", type=float, default=TrainConfig.dense_fraction)
    parser.add_argument("--indexer-warmup-steps", type=int, default=TrainConfig.indexer_warmup_steps)
    parser.add_argument("--indexer-loss-weight", type=float, default=TrainConfig.indexer_loss_weight)
    parser.add_argument("--distance-bias", type=int, default=TrainConfig.distance_bias,
                        help="token-mode dsa: learned indexer score per key distance (default: seq_len; 0: off)")
    parser.add_argument("--seq-len", type=int, default=TrainConfig.seq_len)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed,
                        help="one seed moves the dense run's perplexity by a few %%: compare several")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs with the same config")
    parser.add_argument("--out", default="runs/bench-quality")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; accepted: {', '.join(VARIANTS)}")
    results, folders = {}, {}
    for variant in variants:
        cfg = variant_config(variant, args)
        results[variant], folders[variant] = (args.reuse and reusable(cfg)) or train(cfg), cfg.output_dir
    dense = results.get("sdpa")
    dev = device_name()
    for variant, result in results.items():
        if variant == "sdpa":
            continue
        cfg = result["config"]
        extra = dict(steps=args.steps, seq_len=args.seq_len, seed=args.seed, train_seconds=round(result["train_seconds"], 1),
                     run=folders[variant])
        if cfg["attention_backend"] == "dsa":
            extra.update(topk=cfg["topk"], block_size=cfg.get("block_size", 1), local_window=_identity(cfg)["local_window"],
                         dense_fraction=cfg["dense_fraction"], indexer_loss_weight=cfg["indexer_loss_weight"],
                         density=round(cfg["topk"] / args.seq_len, 3))
        name = "heldout_ppl_dsa_vs_dense" if variant == "dsa" else f"heldout_ppl_{variant.replace('-', '_')}_vs_dense"
        if dense is not None:
            extra["train_seconds_dense"] = round(dense["train_seconds"], 1)
        emit(name, result["heldout_ppl"], "perplexity", dense and dense["heldout_ppl"], "sdpa (dense), same budget",
             dev, **extra)


if __name__ == "__main__":
    main()
