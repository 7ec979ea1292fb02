"""Decode-step latency with the pre-allocated KV cache vs a cache that concatenates every step.

The anchor is the cache seekdeep had before (``torch.cat`` of the whole cache per token and
layer: O(context) copying per step); both run the same model and context in interleaved
rounds. Batch 1, greedy, median per-token time.

Usage: python benchmarks/kv_cache.py [--contexts 4096,16384,32768] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, emit  # noqa: E402

from seekdeep.models import common as model_common  # noqa: E402
from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM  # noqa: E402


def concatenating_update(self, layer_idx, k, v):
    """The anchor: grow the cache by concatenation."""
    layer = self.layers[layer_idx]
    layer.k = k if layer.k is None else torch.cat([layer.k, k], dim=2)
    layer.v = v if layer.v is None else torch.cat([layer.v, v], dim=2)
    return layer.k, layer.v


@torch.no_grad()
def per_token_ms(model, context: int, steps: int) -> float:
    out = model(torch.randint(0, model.config.vocab_size, (1, context)), use_cache=True, logits_to_keep=1)
    cache, token, times = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True), []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="4096,16384,32768")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",")]
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max(contexts) + args.steps)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    preallocated = model_common.KVCache.update
    for context in contexts:
        samples: dict[str, list[float]] = {"preallocated": [], "concatenating": []}
        for _ in range(args.rounds):  # interleaved, so machine load hits both alike
            for name, update in (("concatenating", concatenating_update), ("preallocated", preallocated)):
                model_common.KVCache.update = update
                try:
                    samples[name].append(per_token_ms(model, context, args.steps))
                finally:
                    model_common.KVCache.update = preallocated
        emit("kv_cache_decode_step", min(samples["preallocated"]), "ms/token", min(samples["concatenating"]),
             "cache grown by torch.cat every step", device_name(), context=context, layers=2, hidden=256)


if __name__ == "__main__":
    main()
