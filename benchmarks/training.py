"""Training throughput and memory: fp32 vs bf16 autocast (and fp16 with loss scaling), and
peak memory with vs without activation checkpointing.

CPU: peak RSS of a fresh subprocess per configuration (VmHWM), tokens/s over timed steps.
CUDA (when present): torch.cuda.max_memory_allocated, tokens/s, and model FLOPs utilisation
(6 * params * tokens + attention FLOPs, against the GPU's dense bf16 peak given by --peak-tflops).

Usage: python benchmarks/training.py [--preset small --seq-len 512 --batch-size 8 --steps 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, emit  # noqa: E402

CHILD = r"""
import json, sys, time
import torch
from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM
from seekdeep.train import PrecisionPolicy, param_groups
args = json.loads(sys.argv[1])
device = torch.device(args["device"])
def hwm_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
torch.manual_seed(0)
cfg = LlamaConfig.from_name(args["preset"], vocab_size=4096, max_position_embeddings=args["seq_len"],
                            attention_backend=args["backend"], attention_options={"topk": 64} if args["backend"] == "dsa" else {})
with torch.device(device):
    model = LlamaForCausalLM(cfg)
model.init_weights()
model.gradient_checkpointing = args["checkpointing"]
model.train()
policy = PrecisionPolicy(args["precision"], device.type)
scaler = policy.make_scaler()
opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4)
ids = torch.randint(0, 4096, (args["batch_size"], args["seq_len"]), device=device)
def step():
    with policy.autocast():
        out = model(ids, labels=ids)
    loss = out.loss + (out.aux_loss if out.aux_loss is not None else 0)
    scaler.scale(loss).backward()
    scaler.step(opt); scaler.update(); opt.zero_grad(set_to_none=True)
step()  # warm-up (allocates optimizer state)
if device.type == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
base = hwm_mb()
t0 = time.perf_counter()
for _ in range(args["steps"]):
    step()
if device.type == "cuda":
    torch.cuda.synchronize()
dt = (time.perf_counter() - t0) / args["steps"]
peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else hwm_mb()
n = sum(p.numel() for p in model.parameters())
print(json.dumps({"tokens_per_s": args["batch_size"] * args["seq_len"] / dt, "peak_mb": peak, "params": n,
                  "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size}))
"""


def run(**kw) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(kw)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--backend", default="sdpa")
    parser.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100 SXM: 989)")
    args = parser.parse_args()
    common = dict(preset=args.preset, seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps,
                  backend=args.backend, device=args.device)
    dev = device_name(args.device)
    fp32 = run(**common, precision="fp32", checkpointing=False)
    tag = f"{args.preset}_T{args.seq_len}_B{args.batch_size}_{args.backend}"
    for precision in ("bf16", "fp16"):
        other = run(**common, precision=precision, checkpointing=False)
        emit(f"train_tokens_per_s_{precision}_{tag}", other["tokens_per_s"], "tokens/s", fp32["tokens_per_s"], "fp32 (same run)",
             dev, params=fp32["params"])
    ckpt = run(**common, precision="fp32", checkpointing=True)
    emit(f"train_peak_memory_checkpointing_{tag}", ckpt["peak_mb"], "MiB", fp32["peak_mb"], "no activation checkpointing",
         dev, tokens_per_s=round(ckpt["tokens_per_s"], 1), tokens_per_s_without=round(fp32["tokens_per_s"], 1))
    if args.device.startswith("cuda"):
        bf16 = run(**common, precision="bf16", checkpointing=False)
        flops_per_token = 6 * bf16["params"] + 12 * bf16["layers"] * bf16["hidden"] * args.seq_len
        mfu = bf16["tokens_per_s"] * flops_per_token / (args.peak_tflops * 1e12)
        emit(f"train_mfu_bf16_{tag}", mfu, "fraction", 0.4, "nanoGPT-class MFU (~40%)", dev)


if __name__ == "__main__":
    main()
