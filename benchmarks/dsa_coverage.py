"""How much of dense attention's mass a trained ``dsa`` model's selection keeps, per layer.

The explain package's selection view (``seekdeep.explain.selection``) on the held-out side of the
main job's own corpus split: for each held-out module long enough, its first ``--lengths`` tokens,
and per layer the mean over queries of the dense attention mass on the keys the indexer kept.
The anchor is dense attention itself (coverage 1.0: nothing dropped).

    python benchmarks/dsa_coverage.py runs/train/final --lengths 160,256
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_capability_fields, device_name, emit  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a dsa model directory (e.g. runs/train/final)")
    parser.add_argument("--lengths", default="160,256", help="comma-separated input lengths in tokens")
    parser.add_argument("--inputs", type=int, default=16, help="held-out modules at most")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from seekdeep.auto import AutoModel, AutoTokenizer
    from seekdeep.data.corpus import default_corpus
    from seekdeep.explain.selection import selection_view

    model = AutoModel.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    texts = [path.read_text(encoding="utf-8") for path in default_corpus().heldout_files]
    device = device_name()
    for length in (int(n) for n in args.lengths.split(",")):
        encoded = [ids[:length] for ids in (tokenizer.encode(t) for t in texts) if len(ids) >= length][:args.inputs]
        if not encoded:
            print(f"no held-out module has {length} tokens", file=sys.stderr)
            continue
        views = [selection_view(model, tokenizer, tokenizer.decode(ids)).coverage for ids in encoded]
        for layer in range(len(views[0])):
            values = [v[layer] for v in views if v[layer] is not None]
            if not values:
                continue  # a dense layer
            emit(f"dsa_dense_mass_coverage.layer{layer}.len{length}", statistics.mean(values), "fraction", 1.0,
                 "dense attention (covers all)", device, spread=round(statistics.pstdev(values), 4),
                 inputs=len(values), model=args.model, **cpu_capability_fields())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
