"""Parameter-efficient fine-tuning, measured against full fine-tuning and naive sequential tuning.

1. LoRA (<= 1% of the parameters trainable) vs full fine-tuning, same steps, data, seed and
   schedule, on a standard-library package held out of the base's pre-training (``http``;
   trained on the first 80% of each module, measured on the last 20%): the fraction of full fine-tuning's held-out perplexity gain that LoRA recovers (the seeds
   claim 90%+; target >= 0.9), and the peak training memory of each (tensor bytes live at the
   peak of a training step: CUDA's allocator statistics, or on CPU the allocator events of the
   torch profiler, plus the tensors that existed before).
2. Continual learning over three packages, one LoRA adapter per task on the frozen base: the
   first task's held-out perplexity after all three tasks against its value right after it was
   learned (target: within 2%). The anchor is the naive way, one adapter trained on the tasks
   in sequence, which forgets.

Usage: python benchmarks/peft.py [--steps 100] [--cl-steps 40] [--base DIR] [--out runs/bench-peft]
(with no --base: runs/train/final, else the small model ``seekdeep finetune`` trains once)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, emit  # noqa: E402

from seekdeep.recipes.finetune import FinetuneConfig, default_base, finetune  # noqa: E402

# rank 2 on every linear layer but k_proj: 0.97% of the tiny model's parameters
LORA_SPEC = "r=2,alpha=4,targets=q_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
TASKS = ("http", "email", "unittest")


def _run(args, method: str, **overrides) -> dict:
    cfg = FinetuneConfig(base=str(args.base), method=method, lora=args.lora, steps=args.steps, seq_len=args.seq_len,
                         batch_size=args.batch_size, eval_batches=args.eval_batches, eval_interval=args.steps,
                         checkpoint_interval=args.steps, keep_last=1, lr=args.lora_lr if method == "lora" else args.full_lr,
                         output_dir=f"{args.out}/{method}", progress=False, device=args.device, **overrides)
    return finetune(cfg)


def peak_training_memory(args, method: str, steps: int = 3) -> int:
    """Bytes of tensors alive at the peak of ``steps`` training steps (optimizer state included)."""
    from seekdeep.auto import AutoModel
    from seekdeep.recipes.finetune import attach_method
    from seekdeep.train import param_groups

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = FinetuneConfig(base=str(args.base), method=method, lora=args.lora)
    model = AutoModel.from_pretrained(args.base, device=device)
    attach_method(model, cfg)
    model.train()
    optimizer = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-4)
    batch = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len), device=device)

    def step():
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    from torch.profiler import ProfilerActivity, profile

    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers(), batch]}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(steps):
            step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return sum(storages.values()) + peak


def continual(args, naive: bool) -> tuple[list[dict], dict]:
    """Learn TASKS in sequence; per-task adapters (or, naive, one shared adapter)."""
    from seekdeep.auto import AutoModel, AutoTokenizer
    from seekdeep.data import TokenWindows
    from seekdeep.peft import ContinualLearner, parse_lora_spec
    from seekdeep.recipes.finetune import _freeze_backends, prepare_finetune_data
    from seekdeep.recipes.train import evaluate
    from seekdeep.train import PrecisionPolicy, make_scheduler

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = AutoModel.from_pretrained(args.base, device=device)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    policy = PrecisionPolicy("fp32", device.type)
    data = {}
    for task in TASKS:
        cfg = FinetuneConfig(base=str(args.base), package=task, seq_len=args.seq_len)
        train_path, heldout_path, _ = prepare_finetune_data(cfg, tokenizer)
        data[task] = (TokenWindows(train_path, args.seq_len, args.batch_size, seed=0),
                      TokenWindows(heldout_path, args.seq_len, args.batch_size, shuffle=False))
    base_scores = {t: evaluate(model, data[t][1], args.eval_batches, policy) for t in TASKS}
    config = parse_lora_spec(args.lora)
    learner = ContinualLearner(model, config)
    history = []
    torch.manual_seed(0)
    if naive:
        model.add_adapter("shared", config)
    for task in TASKS:
        if naive:
            params = [p for p in model.parameters() if p.requires_grad]
        else:
            params = learner.begin_task(task)
        _freeze_backends(model)
        optimizer = torch.optim.AdamW(params, lr=args.lora_lr, betas=(0.9, 0.95), weight_decay=0.0)
        scheduler = make_scheduler(optimizer, min(10, args.cl_steps), args.cl_steps)
        model.train()
        for _ in range(args.cl_steps):
            batch = data[task][0].next_batch().to(device)
            model(batch, labels=batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        model.eval()
        if naive:
            learned = TASKS[: TASKS.index(task) + 1]
            history.append({"after": task, "scores": {t: evaluate(model, data[t][1], args.eval_batches, policy) for t in learned}})
        else:
            learner.end_task(lambda t: evaluate(model, data[t][1], args.eval_batches, policy))
    return (history if naive else learner.history), base_scores


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default=None)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--cl-steps", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--lora", default=LORA_SPEC)
    parser.add_argument("--lora-lr", type=float, default=5e-3)
    parser.add_argument("--full-lr", type=float, default=5e-4)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default="runs/bench-peft")
    args = parser.parse_args()
    started = time.perf_counter()
    args.base = Path(args.base) if args.base else default_base(progress=False)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = device_name(device)

    lora, full = _run(args, "lora"), _run(args, "full")
    before = lora["ppl_before"]
    gain_lora, gain_full = before - lora["ppl_after"], before - full["ppl_after"]
    loss_gain_ratio = (lora["loss_before"] - lora["loss_after"]) / (full["loss_before"] - full["loss_after"])
    common = dict(base=str(args.base), package=lora["package"], steps=args.steps, seq_len=args.seq_len,
                  batch_size=args.batch_size, lora=args.lora, lora_lr=args.lora_lr, full_lr=args.full_lr)
    emit("lora_ppl_gain_vs_full_finetune", gain_lora, "perplexity points", gain_full, "full fine-tuning, same steps", dev,
         target_ratio=0.9, ppl_before=round(before, 3), ppl_lora=round(lora["ppl_after"], 3),
         ppl_full=round(full["ppl_after"], 3), loss_gain_ratio=round(loss_gain_ratio, 4),
         lora_trainable_percent=round(lora["trainable_percent"], 4), lora_seconds=round(lora["train_seconds"], 1),
         full_seconds=round(full["train_seconds"], 1), **common)
    mem_lora, mem_full = peak_training_memory(args, "lora"), peak_training_memory(args, "full")
    emit("peak_training_memory_lora", mem_lora / 2**20, "MiB", mem_full / 2**20, "full fine-tuning", dev,
         measured="CUDA max_memory_allocated" if device.startswith("cuda") else
         "torch profiler CPU allocator events + tensors alive before", **common)

    history, base_scores = continual(args, naive=False)
    first = TASKS[0]
    right_after, at_end = history[0]["scores"][first], history[-1]["scores"][first]
    emit("continual_first_task_ppl_after_3_tasks", math.exp(at_end), "perplexity", math.exp(right_after),
         f"{first} right after it was learned", dev, target_ratio_max=1.02, tasks=list(TASKS), cl_steps=args.cl_steps,
         base_ppl={t: round(math.exp(v), 3) for t, v in base_scores.items()},
         ppl_after_each_task=[{"after": row["after"], **{t: round(math.exp(v), 3) for t, v in row["scores"].items()}}
                              for row in history])
    naive, _ = continual(args, naive=True)
    emit("naive_sequential_first_task_ppl_after_3_tasks", math.exp(naive[-1]["scores"][first]), "perplexity",
         math.exp(naive[0]["scores"][first]), f"{first} right after it was learned (one shared adapter)", dev,
         tasks=list(TASKS), cl_steps=args.cl_steps,
         ppl_after_each_task=[{"after": row["after"], **{t: round(math.exp(v), 3) for t, v in row["scores"].items()}}
                              for row in naive])
    print(f"# total {time.perf_counter() - started:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
