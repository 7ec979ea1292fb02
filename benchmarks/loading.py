"""Load time and peak RSS: seekdeep vs transformers on the same safetensors checkpoint.

Each load runs in a fresh subprocess so peak RSS (ru_maxrss) belongs to that load alone.
Usage: python benchmarks/loading.py [--hidden 1024 --layers 12]  (default ~ 400 MB fp32)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, emit  # noqa: E402

CHILD = r"""
import json, sys, time
import torch
def hwm_mb():  # VmHWM belongs to this process image (ru_maxrss would carry the parent's over exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
path, which = sys.argv[1], sys.argv[2]
if which == "seekdeep":
    import seekdeep
    base = hwm_mb()
    t0 = time.perf_counter(); model = seekdeep.AutoModel.from_pretrained(path)
else:
    import transformers
    base = hwm_mb()
    t0 = time.perf_counter(); model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
seconds = time.perf_counter() - t0
with torch.no_grad():
    logits = model(torch.arange(8)[None]).logits
print(json.dumps({"seconds": seconds, "peak_rss_mb": hwm_mb(), "import_rss_mb": base, "checksum": float(logits.double().sum())}))
"""


def load_in_child(path: Path, which: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), which], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        config = transformers.LlamaConfig(
            vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
            num_attention_heads=16, num_key_value_heads=8,
        )
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp)
        size_mb = sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors")) / 2**20
        results = {"seekdeep": [], "transformers": []}
        for _ in range(args.repeats):  # interleaved so file-cache warmth is shared fairly
            for which in results:
                results[which].append(load_in_child(Path(tmp), which))
        best = {k: min(v, key=lambda r: r["seconds"]) for k, v in results.items()}
        assert abs(best["seekdeep"]["checksum"] - best["transformers"]["checksum"]) < 1e-2 * max(1.0, abs(best["transformers"]["checksum"]))
        dev = device_name()
        emit("load_time_llama", best["seekdeep"]["seconds"], "s", best["transformers"]["seconds"], "transformers.from_pretrained", dev, checkpoint_mb=round(size_mb, 1))
        emit("load_peak_rss_llama", best["seekdeep"]["peak_rss_mb"], "MiB", best["transformers"]["peak_rss_mb"], "transformers.from_pretrained", dev, checkpoint_mb=round(size_mb, 1))
        emit("load_peak_rss_minus_import_llama", best["seekdeep"]["peak_rss_mb"] - best["seekdeep"]["import_rss_mb"], "MiB",
             best["transformers"]["peak_rss_mb"] - best["transformers"]["import_rss_mb"], "transformers.from_pretrained", dev, checkpoint_mb=round(size_mb, 1))


if __name__ == "__main__":
    main()
