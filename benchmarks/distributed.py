"""Distributed training on CPU gloo (2 processes): gradient-compression hooks and layouts.

    python benchmarks/distributed.py            # starts torchrun itself (2 processes)
    python benchmarks/distributed.py --gpu      # one GPU: FSDP2 + compile + bf16 vs eager (needs CUDA)

Per DDP communication hook ("allreduce" is torch's plain hook = DDP's own all-reduce, the
anchor): bytes each rank sends per step (ring model, counted at the collective calls), step
time, and the final training loss against the uncompressed run (a small llama learning
arithmetic progressions). Per layout (DDP, FSDP2, TP, PP): step time against one process on
the same global batch. One JSON line per result (benchmarks/common.py).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, emit  # noqa: E402

HOOKS = ("allreduce", "bf16", "powersgd", "int4")
LAYOUTS = ("dp_replicate=2", "dp_shard=2", "tp=2", "pp=2")
VOCAB, SEQ, BATCH = 512, 128, 8


def make_model():
    from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_name("tiny", vocab_size=VOCAB, max_position_embeddings=SEQ, tie_word_embeddings=True,
                                   attention_backend="sdpa")
    return LlamaForCausalLM(config)


def reference_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = make_model()
    model.init_weights()
    return model.state_dict()


def batches(n: int) -> list[torch.Tensor]:
    """Rows are arithmetic progressions mod VOCAB: learnable, so the loss gap means something."""
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        a = torch.randint(0, VOCAB, (BATCH, 1), generator=g)
        b = torch.randint(1, 8, (BATCH, 1), generator=g)
        out.append((a + b * torch.arange(SEQ)) % VOCAB)
    return out


def train(pm_or_model, steps: int, counter=None) -> tuple[list[float], list[float]]:
    """Returns (global losses, step seconds)."""
    from seekdeep.parallel.optim import PartsOptimizer

    parts = pm_or_model.parts if hasattr(pm_or_model, "parts") else [pm_or_model]
    opt = PartsOptimizer(parts, lambda part: torch.optim.AdamW(part.parameters(), lr=3e-3, foreach=False))
    losses, times = [], []
    for batch in batches(steps):
        t0 = time.perf_counter()
        if hasattr(pm_or_model, "forward_backward"):
            loss = pm_or_model.forward_backward(pm_or_model.local_batch(batch))
            pm_or_model.clip_grad_norm_(1.0)
        else:
            loss = pm_or_model(batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(pm_or_model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
        losses.append(pm_or_model.global_mean(loss.detach()) if hasattr(pm_or_model, "global_mean") else float(loss.detach()))
    return losses, times


def worker(out: Path, steps: int) -> None:
    import torch.distributed as dist

    from seekdeep.parallel import ParallelConfig, build_mesh, init_distributed, parallelize
    from seekdeep.parallel.compression import CollectiveCounter

    init_distributed()
    results: dict = {"hooks": {}, "layouts": {}}

    def build(spec: str):
        config = ParallelConfig.from_string(spec)
        mesh = build_mesh(config)
        with torch.device("meta"):
            model = make_model()
        return parallelize(model, mesh, config).materialize(reference_state())

    for hook in HOOKS:
        pm = build(f"dp_replicate=2,compression={hook}")
        with CollectiveCounter() as counter:
            losses, times = train(pm, steps)
        results["hooks"][hook] = {"losses": losses, "times": times, "bytes": counter.bytes_sent / steps}
    for spec in LAYOUTS:
        losses, times = train(build(spec), min(steps, 20))
        results["layouts"][spec] = {"losses": losses, "times": times}
    if dist.get_rank() == 0:
        out.write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cpu(steps: int) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
               __file__, "--worker", str(out), "--steps", str(steps)]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
        results = json.loads(out.read_text())
    device = f"cpu gloo, 2 processes x 1 thread ({os.cpu_count()} cores)"
    tail = max(1, steps // 10)
    final = {h: statistics.mean(r["losses"][-tail:]) for h, r in results["hooks"].items()}
    anchor = results["hooks"]["allreduce"]
    for hook, r in results["hooks"].items():
        emit(f"ddp_hook_{hook}_bytes_per_step", r["bytes"], "bytes/rank", anchor["bytes"], "ddp allreduce (fp32)", device,
             model_params=sum(p.numel() for p in make_model().parameters()))
        emit(f"ddp_hook_{hook}_step_time", statistics.median(r["times"][2:]), "s", statistics.median(anchor["times"][2:]),
             "ddp allreduce (fp32)", device)
        emit(f"ddp_hook_{hook}_final_loss", final[hook], "nats/token", final["allreduce"], "ddp allreduce (fp32)", device,
             steps=steps, loss_gap_pct=round(100 * (final[hook] / final["allreduce"] - 1), 3))
    # one process, same global batch, for the layouts
    torch.manual_seed(0)
    torch.set_num_threads(1)
    single = make_model()
    single.load_state_dict(reference_state())
    _, single_times = train(single, min(steps, 20))
    for spec, r in results["layouts"].items():
        emit(f"layout_{spec}_step_time", statistics.median(r["times"][2:]), "s", statistics.median(single_times[2:]),
             "one process (1 thread)", device, global_batch=BATCH, seq_len=SEQ)


def run_gpu(steps: int) -> None:
    """One GPU: FSDP2 (world of 1) + per-block compile + bf16 against plain eager fp32/bf16-autocast."""
    if not torch.cuda.is_available():
        print(json.dumps({"name": "gpu_fsdp_compile_bf16_step", "skipped": "no CUDA device"}))
        return
    import torch.distributed as dist

    from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM
    from seekdeep.parallel.fsdp import apply_fsdp

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cuda", (1,), mesh_dim_names=("dp_shard",))
    config = LlamaConfig.from_name("125m", vocab_size=32000, max_position_embeddings=2048, attention_backend="sdpa")
    batch = torch.randint(0, 32000, (8, 2048), device="cuda")
    n_params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    flops_per_step = 6 * n_params * batch.numel()
    peak = 989e12 if "H100" in torch.cuda.get_device_name(0) else 1979e12 / 2

    def timed(model, autocast: bool) -> float:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        times = []
        for _ in range(steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
                loss = model(batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[3:])

    torch.manual_seed(0)
    eager = LlamaForCausalLM(config).cuda()
    eager_t = timed(eager, autocast=True)
    del eager
    model = LlamaForCausalLM(config).cuda()
    for layer in model.model.layers:
        layer.compile()
    apply_fsdp(model, mesh, precision="bf16")
    fast_t = timed(model, autocast=False)
    dev = device_name("cuda")
    emit("gpu_eager_bf16_step", eager_t, "s", None, "", dev, mfu=round(flops_per_step / eager_t / peak, 4))
    emit("gpu_fsdp2_compile_bf16_step", fast_t, "s", eager_t, "eager + bf16 autocast", dev,
         mfu=round(flops_per_step / fast_t / peak, 4))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker), args.steps)
    elif args.gpu:
        run_gpu(args.steps)
    else:
        run_cpu(args.steps)


if __name__ == "__main__":
    main()
