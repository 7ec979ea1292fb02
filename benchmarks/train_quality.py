"""Held-out perplexity of dynamic sparse attention vs dense attention at an equal budget.

Trains the `seekdeep train` default (tiny llama on the standard library, same steps, data,
seed and schedule) twice: with `dsa` and with `sdpa`, and prints the perplexity ratio.
The seeds claim +2.1% perplexity for sparse attention; the target is <= +2%.

Usage: python benchmarks/train_quality.py [--steps 700] [--topk 64] [--out runs/bench-quality]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, emit  # noqa: E402

from seekdeep.recipes.train import TrainConfig, train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--topk", type=int, default=TrainConfig.topk)
    parser.add_argument("--seq-len", type=int, default=TrainConfig.seq_len)
    parser.add_argument("--out", default="runs/bench-quality")
    args = parser.parse_args()
    results = {}
    for backend in ("sdpa", "dsa"):
        cfg = TrainConfig(attention_backend=backend, steps=args.steps, topk=args.topk, seq_len=args.seq_len,
                          output_dir=f"{args.out}/{backend}", progress=False)
        results[backend] = train(cfg)
    dense, sparse = results["sdpa"], results["dsa"]
    dev = device_name()
    emit("heldout_ppl_dsa_vs_dense", sparse["heldout_ppl"], "perplexity", dense["heldout_ppl"], "sdpa (dense), same budget", dev,
         steps=args.steps, topk=args.topk, seq_len=args.seq_len, density=round(args.topk / args.seq_len, 3),
         train_seconds_dsa=round(sparse["train_seconds"], 1), train_seconds_dense=round(dense["train_seconds"], 1))


if __name__ == "__main__":
    main()
