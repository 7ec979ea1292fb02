"""Dense SDPA vs dynamic sparse attention (``dsa`` block mode) or gated attention, end to end.

dsa is timed as the backend is called in a model: indexer (index keys, block summaries, anchor
queries, scores), block selection and the block-sparse attention. The anchor is
``scaled_dot_product_attention`` with ``is_causal=True`` (the flash kernel on CUDA and on CPU).

Every row names the CPU class (``cpu_capability``: AVX2, AVX512, ...; ``cpu_class`` adds +BF16
where oneDNN has native bf16 kernels; ``capability_caps``: ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA /
MKL_ENABLE_INSTRUCTIONS when set, i.e. an emulated class) and ``kernel_used``, the path the dsa
call took (``DynamicSparseAttention.last_kernel``): the sparse path's speed depends on the CPU
class far more than dense SDPA's does, so a number is never read off the wrong class.

Points: forward; forward + backward (dsa with its straight-through term, so the indexer gets
gradients too); peak memory of the attention call (CUDA: ``max_memory_allocated`` above the
inputs; CPU: not measured, no line); decode-step latency with a KV cache of T slots
(dense: one query against every cached key; dsa: indexer step + the selected blocks).

``--main-job-steps N`` times N training steps (forward, backward, AdamW) of the README main
job's model instead (``seekdeep train`` defaults: tiny llama, seq 256, batch 16, token-level
dsa, top-64 with the 32 most recent, distance bias), sdpa against dsa in its dense phase (dense
attention + indexer KL + straight-through term) and its sparse phase, each with the token kernel
``auto`` chose and with the ``masked_sdpa`` reference; steps interleaved; wall seconds per step
(min and median) and the process CPU seconds per step (steadier on a loaded machine).

``--backend gated`` times the gated backend (dense SDPA plus the learned per-head output gate)
against the same SDPA anchor instead: forward and forward + backward (gate parameters get their
gradients), no decode points.

Usage:
    python benchmarks/attention.py --device cpu                 # 2K/8K/16K, bf16, decode to 128K
    python benchmarks/attention.py --device cpu --backend gated --dtype fp32 --lengths 256,1024 --threads 1
    python benchmarks/attention.py --device cpu --dtype fp32
    python benchmarks/attention.py --device cuda                # 8K/32K/64K/128K, bf16
    python benchmarks/attention.py --device cpu --main-job-steps 8  # the README main job's train step
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_capability_fields, device_name, emit  # noqa: E402

from seekdeep.attention import AttentionMask, AttentionSpec, repeat_kv  # noqa: E402
from seekdeep.attention.dsa import DynamicSparseAttention  # noqa: E402
from seekdeep.attention.gated import GatedAttention  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_pair(anchor, candidate, device: torch.device, repeats: int, cpu: dict | None = None
               ) -> tuple[float, float, float, float]:
    """Median and min seconds of ``anchor`` and of ``candidate``, calls interleaved (the load of
    a shared machine drifts) after one warm-up call each: (anchor_med, anchor_min, cand_med, cand_min).
    ``cpu``, when given, receives the median process CPU seconds of each (``anchor_cpu_s``,
    ``cpu_s``) and their ratio (``speedup_cpu``): steadier than wall time on a loaded machine."""
    anchor(), candidate()
    sync(device)
    times: tuple[list[float], list[float]] = ([], [])
    cpu_times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out, out_cpu in ((anchor, times[0], cpu_times[0]), (candidate, times[1], cpu_times[1])):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            out.append(time.perf_counter() - t0)
            out_cpu.append(time.process_time() - c0)
    if cpu is not None:
        a, c = statistics.median(cpu_times[0]), statistics.median(cpu_times[1])
        cpu.update(anchor_cpu_s=round(a, 6), cpu_s=round(c, 6), speedup_cpu=round(a / c, 3))
    return statistics.median(times[0]), min(times[0]), statistics.median(times[1]), min(times[1])


def peak_memory(fn, device: torch.device) -> float | None:
    """MiB allocated by ``fn`` at its peak, above what was allocated before (CUDA only)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def build_dsa(args, device, dtype) -> DynamicSparseAttention:
    spec = AttentionSpec(args.heads * args.head_dim, args.heads, args.kv_heads, args.head_dim, args.head_dim,
                         {"topk": args.budget, "block_size": args.block_size, "block_kernel": args.kernel,
                          "row_kernel": args.row_kernel})
    torch.manual_seed(0)
    return DynamicSparseAttention(spec).to(device=device, dtype=dtype).eval()


def build_gated(args, device, dtype) -> GatedAttention:
    spec = AttentionSpec(args.heads * args.head_dim, args.heads, args.kv_heads, args.head_dim, args.head_dim)
    torch.manual_seed(0)
    gated = GatedAttention(spec).to(device=device, dtype=dtype).eval()
    with torch.no_grad():  # a trained gate, not the exact-1 init (same cost, but no trivial multiply by 1)
        gated.gate_out.weight.normal_(std=0.02)
    return gated


def bench_length(args, t: int, device, dtype, common: dict) -> None:
    g = torch.Generator(device=device).manual_seed(t)
    h, hkv, d = args.heads, args.kv_heads, args.head_dim
    q = torch.randn(1, h, t, d, device=device, dtype=dtype, generator=g)
    k = torch.randn(1, hkv, t, d, device=device, dtype=dtype, generator=g)
    v = torch.randn(1, hkv, t, d, device=device, dtype=dtype, generator=g)
    x = torch.randn(1, t, h * d, device=device, dtype=dtype, generator=g)
    mask, scale = AttentionMask(t, t), d**-0.5
    backend = build_dsa(args, device, dtype) if args.backend == "dsa" else build_gated(args, device, dtype)
    name = args.backend
    gqa = h != hkv

    def dense():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)

    def candidate():
        return backend(q, k, v, mask=mask, scale=scale, hidden_states=x)

    point = dict(common, seq_len=t)
    with torch.no_grad():
        ref = dense().float()
        err = (candidate().float() - ref).abs().max().item()  # dsa and the gate change the output: for scale only
        cpu: dict = {}
        d_med, d_min, s_med, s_min = timed_pair(dense, candidate, device, args.repeats, cpu)
        d_mem, s_mem = peak_memory(dense, device), peak_memory(candidate, device)
    point["kernel_used"] = getattr(backend, "last_kernel", name)
    emit(f"{name}_forward", s_med, "s", d_med, "sdpa_causal", device_name(str(device)), **point,
         speedup=round(d_med / s_med, 3), min_s=round(s_min, 6), anchor_min_s=round(d_min, 6), max_abs_diff_vs_dense=err,
         **cpu)
    if s_mem is not None:
        emit(f"{name}_forward_peak_memory", s_mem, "MiB", d_mem, "sdpa_causal", device_name(str(device)), **point)

    if t in args.backward_lengths:
        leaves = [z.clone().requires_grad_() for z in (q, k, v)]
        cotangent = torch.randn_like(q)
        backend.train()

        def dense_fb():
            out = F.scaled_dot_product_attention(*leaves, is_causal=True, scale=scale, enable_gqa=gqa)
            out.backward(cotangent)

        def candidate_fb():
            out = backend(*leaves, mask=mask, scale=scale, hidden_states=x)
            out.backward(cotangent)

        cpu = {}
        d_med, d_min, s_med, s_min = timed_pair(dense_fb, candidate_fb, device, args.repeats, cpu)
        d_mem, s_mem = peak_memory(dense_fb, device), peak_memory(candidate_fb, device)
        point["kernel_used"] = getattr(backend, "last_kernel", name)
        backend.eval()
        emit(f"{name}_forward_backward", s_med, "s", d_med, "sdpa_causal", device_name(str(device)), **point,
             speedup=round(d_med / s_med, 3), min_s=round(s_min, 6), anchor_min_s=round(d_min, 6), **cpu)
        if s_mem is not None:
            emit(f"{name}_forward_backward_peak_memory", s_mem, "MiB", d_mem, "sdpa_causal", device_name(str(device)),
                 **point)


def bench_decode(args, t: int, device, dtype, common: dict) -> None:
    """Mean step latency over ``--decode-steps`` steps after a context of ``t`` slots.

    dense: one query against a contiguous cache of exactly ``t`` keys (its best case).
    dsa: the real decode path (index key of the new token, block summaries, selection at each
    block start, the row kernel: blocks read in place or gathered) on views of a preallocated
    cache growing from ``t``; its cache state starts from the prompt's block summaries, as a
    prefill leaves them. Wall and process CPU seconds are both reported (CPU seconds are steadier
    on a loaded machine: a descheduled thread's wait is not counted).
    """
    steps = args.decode_steps
    g = torch.Generator(device=device).manual_seed(t + 1)
    h, hkv, d = args.heads, args.kv_heads, args.head_dim
    k_cache = torch.randn(1, hkv, t + steps, d, device=device, dtype=dtype, generator=g)
    v_cache = torch.randn(1, hkv, t + steps, d, device=device, dtype=dtype, generator=g)
    q = torch.randn(1, h, steps, d, device=device, dtype=dtype, generator=g)
    x = torch.randn(1, t + steps, h * d, device=device, dtype=dtype, generator=g)
    k_dense, v_dense = k_cache[:, :, :t].contiguous(), v_cache[:, :, :t].contiguous()
    scale, gqa = d**-0.5, h != hkv
    dsa = build_dsa(args, device, dtype)
    state: dict = {}

    def dense_steps():
        for i in range(steps):
            F.scaled_dot_product_attention(q[:, :, i:i + 1], k_dense, v_dense, scale=scale, enable_gqa=gqa)

    k_rep, v_rep = repeat_kv(k_dense, h // hkv), repeat_kv(v_dense, h // hkv)

    def matmul_steps():  # a second dense anchor: SDPA's CPU bf16 decode is slower than plain matmuls
        for i in range(steps):
            logits = torch.matmul(q[:, :, i:i + 1], k_rep.transpose(-1, -2)).float() * scale
            torch.matmul(logits.softmax(-1).to(dtype), v_rep)

    def sparse_steps():
        state.clear()
        dsa.block_selection(x[:, :t], AttentionMask(t, t), state)  # what the prefill leaves (not timed)
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(steps):
            n = t + i + 1
            dsa(q[:, :, i:i + 1], k_cache[:, :, :n], v_cache[:, :, :n], mask=AttentionMask(1, n), scale=scale,
                hidden_states=x[:, n - 1:n], cache_state=state)
        sync(device)
        return time.perf_counter() - t0, time.process_time() - c0

    def timed_steps(fn) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        return time.perf_counter() - t0, time.process_time() - c0

    dense_times, matmul_times, sparse_times = [], [], []
    with torch.no_grad():
        dense_steps(), matmul_steps(), sparse_steps()  # warm-up
        for _ in range(args.repeats):
            dense_times.append(timed_steps(dense_steps))
            matmul_times.append(timed_steps(matmul_steps))
            sparse_times.append(sparse_steps())

    def per_step(times, which):
        return statistics.median(x[which] for x in times) / steps

    d_med, s_med, m_med = (per_step(x, 0) for x in (dense_times, sparse_times, matmul_times))
    d_cpu, s_cpu, m_cpu = (per_step(x, 1) for x in (dense_times, sparse_times, matmul_times))
    emit("dsa_decode_step", s_med, "s", d_med, "sdpa", device_name(str(device)),
         **dict(common, context=t, steps=steps, kernel_used=dsa.last_kernel), speedup=round(d_med / s_med, 3),
         cpu_s=round(s_cpu, 6), anchor_cpu_s=round(d_cpu, 6), speedup_cpu=round(d_cpu / s_cpu, 3),
         dense_matmul_s=round(m_med, 6), speedup_vs_dense_matmul=round(m_med / s_med, 3),
         speedup_vs_dense_matmul_cpu=round(m_cpu / s_cpu, 3))


def bench_main_job(args, common: dict) -> None:
    """Interleaved train steps of the README main job's model: sdpa vs dsa per phase and kernel."""
    import types

    from seekdeep.recipes.train import TrainConfig, apply_phase, build_model
    from seekdeep.train import param_groups

    tokenizer = types.SimpleNamespace(vocab_size=4096, eos_token_id=0, pad_token_id=1)
    runs = {}
    for name, backend, phase, kernel in (("sdpa", "sdpa", "dense", None), ("dsa_dense", "dsa", "dense", "auto"),
                                         ("dsa_sparse", "dsa", "sparse", "auto"),
                                         ("dsa_dense_ref", "dsa", "dense", "masked_sdpa"),
                                         ("dsa_sparse_ref", "dsa", "sparse", "masked_sdpa")):
        cfg = TrainConfig(attention_backend=backend)
        model = build_model(cfg, tokenizer, torch.device("cpu"))
        apply_phase(model, phase)
        layers = [m for m in model.modules() if isinstance(m, DynamicSparseAttention)]
        for layer in layers:
            if kernel is not None:
                layer.token_kernel = kernel
        model.train()
        opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
        runs[name] = (model, opt, layers, cfg)
    g = torch.Generator().manual_seed(0)
    cfg = runs["sdpa"][3]
    batches = [torch.randint(0, 4096, (cfg.batch_size, cfg.seq_len), generator=g) for _ in range(4)]

    def step(name: str, i: int) -> None:
        model, opt, _, _ = runs[name]
        batch = batches[i % len(batches)]
        out = model(batch, labels=batch)
        loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for name in runs:
        step(name, 0)  # warm-up: optimizer state, allocator
    for i in range(args.main_job_steps):
        for name in runs:
            t0, c0 = time.perf_counter(), time.process_time()
            step(name, i)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    tokens = cfg.batch_size * cfg.seq_len
    anchor_med, anchor_cpu = statistics.median(wall["sdpa"]), min(cpu["sdpa"])
    for name in runs:
        if name == "sdpa":
            continue
        layers = runs[name][2]
        med, best, cpu_best = statistics.median(wall[name]), min(wall[name]), min(cpu[name])
        emit(f"main_job_train_step_{name}", med, "s", anchor_med, "sdpa_train_step", device_name("cpu"),
             min_s=round(best, 4), anchor_min_s=round(min(wall["sdpa"]), 4), cpu_s=round(cpu_best, 4),
             anchor_cpu_s=round(anchor_cpu, 4), tokens_per_s=round(tokens / med),
             tokens_per_s_vs_sdpa=round(anchor_med / med, 3),
             tokens_per_s_vs_sdpa_min=round(min(wall["sdpa"]) / best, 3),
             tokens_per_s_vs_sdpa_cpu=round(anchor_cpu / cpu_best, 3),
             kernel_used=layers[0].last_kernel if layers else None, steps=args.main_job_steps,
             batch=cfg.batch_size, seq_len=cfg.seq_len, threads=torch.get_num_threads(),
             **{k: v for k, v in common.items() if k.startswith("cpu_") or k == "capability_caps"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", choices=("dsa", "gated"), default="dsa", help="the backend timed against SDPA")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--lengths", type=_ints, default=None, help="default: cuda 8K,32K,64K,128K; cpu 2K,8K,16K")
    parser.add_argument("--backward-lengths", type=_ints, default=None,
                        help="lengths that also time forward+backward (default: cuda all, cpu 2K,8K)")
    parser.add_argument("--decode-lengths", type=_ints, default=None,
                        help="default: the forward lengths plus 32K,64K,128K")
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no GQA)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--budget", type=int, default=2048, help="dsa topk: keys per query block")
    parser.add_argument("--kernel", default="auto",
                        help="dsa block_kernel: auto, gather, gather_fp32, gather_sdpa, flex, flex_eager")
    parser.add_argument("--row-kernel", default="auto",
                        help="dsa row_kernel for the decode steps: auto, blocks (read in place), gather")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--main-job-steps", type=int, default=0,
                        help="time this many train steps of the README main job's model (sdpa vs token-level dsa) "
                             "instead of the attention points")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    args.kv_heads = args.kv_heads or args.heads
    if args.lengths is None:  # an empty --lengths "" skips the forward points
        args.lengths = [8192, 32768, 65536, 131072] if cuda else [2048, 8192, 16384]
    if args.backward_lengths is None:
        args.backward_lengths = args.lengths if cuda else [2048, 8192]
    if args.decode_lengths is None:
        args.decode_lengths = sorted(set(args.lengths) | {32768, 65536, 131072}) if args.backend == "dsa" else []
    dtype = DTYPES[args.dtype]
    common = dict(dtype=args.dtype, batch=1, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                  threads=torch.get_num_threads(), **(cpu_capability_fields() if not cuda else {}))
    if args.main_job_steps:
        bench_main_job(args, common)
        return
    if args.backend == "dsa":
        common.update(block_size=args.block_size, budget=args.budget, kernel=args.kernel, row_kernel=args.row_kernel)
    for t in args.lengths:
        bench_length(args, t, device, dtype, common)
    for t in args.decode_lengths:
        bench_decode(args, t, device, dtype, common)


if __name__ == "__main__":
    main()
