"""Parameter-efficient fine-tuning, measured against full fine-tuning and naive sequential tuning.

1. LoRA (<= 1% of the parameters trainable) vs full fine-tuning on a standard-library package
   held out of the base's pre-training (the largest, ``http``), split as ``seekdeep finetune``
   splits it: train on the first 80% of every module, test on the last 20%. Both methods run
   the same steps, batches (same seed, same order), schedule (warm-up + cosine), optimizer
   (AdamW, no weight decay) and gradient clipping; each gets its own learning rate, chosen
   without looking at the test text: a grid is swept training on the first 70% of every
   module and scoring on the 70-80% part (the validation slice, which sits after its training
   text as the test slice sits after the full training text), and the learning rate with the
   lowest validation loss is then trained on the full 80% and scored on the test 20%.
   Reported: the fraction of full fine-tuning's test perplexity gain that LoRA recovers,
   ``(ppl_base - ppl_lora) / (ppl_base - ppl_full)`` (target >= 0.9), every (method, learning
   rate) of the sweep, and the peak training memory of each method. Compared the same way:
   ``--reference-lora`` (plain LoRA on every linear layer, r=2) and, with the ``ablation``
   part, full fine-tuning of everything but the tied token embedding / output head and of
   only that: where full fine-tuning's gain comes from. A bar chart of every method's share
   goes to ``<out>/compare.png``.

   Why the default adapter targets the output head with ``lora_bias``: on this task most of
   full fine-tuning's gain is a shift of the token distribution (the package's identifiers);
   training the tied embedding alone recovers most of it, and LoRA on the linear layers alone
   saturates early whatever its rank. A LoRA bias on ``lm_head`` is a learned logit offset
   (4096 numbers); with ``lora_bias`` every adapted layer gets one (14,336 numbers in all), so
   the rank drops to 1 to stay under 1%. Adapters in this form load in peft unchanged.

   Peak memory, per method in a fresh process: the process's resident set (RSS) at its
   highest during three training steps (the kernel's high-water mark, reset just before
   them), minus the RSS just before them (base and adapter weights loaded, optimizer built:
   the delta is gradients + optimizer state + activations + allocator slack), with glibc's
   mmap threshold fixed so that freed tensors go back to the OS and RSS follows the live
   ones (the default allocator's figure, which includes its cache of freed blocks, is
   reported beside it); on CUDA, ``max_memory_allocated`` instead. Also reported, from the
   same process: the bytes of tensors alive at the peak of two further steps (torch profiler
   allocator events plus the tensors alive before them).
2. Continual learning over three packages, one LoRA adapter per task on the frozen base: the
   first task's held-out perplexity after all three tasks against its value right after it was
   learned (target: within 2%). The anchor is the naive way, one adapter trained on the tasks
   in sequence, which forgets.

The base: ``--base``, else the 'small' preset (4 layers, hidden 256, 4.2M parameters, tied
embeddings) trained here on the embedded corpus for ``--base-steps`` (800: about 23 minutes on
2 CPU cores) into ``<out>/base``, once.

Usage: python benchmarks/peft.py [--steps 100] [--jobs 2] [--threads 1] [--out runs/bench-peft]
       [--lora-lrs 3e-3,1e-2,3e-2,1e-1] [--full-lrs 3e-4,1e-3,3e-3,1e-2] [--parts compare,ablation,memory,continual]
Every training run is cached in ``<out>/runs/`` (a rerun with the same settings reuses it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, emit  # noqa: E402

# rank 1 on every linear layer (q, k, v, o, gate, up, down) and the output head, each with a LoRA
# bias (on lm_head: a logit offset): 38,144 parameters, 0.91% of the small preset's
LORA_SPEC = "r=1,alpha=2,targets=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head,lora_bias"
# plain LoRA, rank 2 on every linear layer but the head: 38,912 parameters, 0.93%
REFERENCE_LORA_SPEC = "r=2,alpha=4,targets=all-linear"
LORA_LRS = "3e-3,1e-2,3e-2,1e-1"
FULL_LRS = "3e-4,1e-3,3e-3,1e-2"
TASKS = ("http", "email", "unittest")
#: (training slice, scored slice) of the learning-rate sweep and of the reported runs
STAGES = {"sweep": ("sweep_train", "sweep_val"), "final": ("train", "heldout")}


# ----------------------------------------------------------------------------- base and data


def resolve_base(args) -> Path:
    """``--base``, else the 'small' preset trained here once for ``--base-steps`` into
    ``<out>/base`` (how far the base is trained changes the result: a base stopped early gains
    from any further training, which full fine-tuning gives and a <= 1% adapter cannot)."""
    if args.base:
        return Path(args.base)
    from seekdeep.recipes.train import TrainConfig, train

    out = Path(args.out) / "base"
    if not (out / "final" / "config.json").is_file():
        print(f"# training the 'small' preset for {args.base_steps} steps into {out}", file=sys.stderr)
        train(TrainConfig(preset="small", attention_backend="sdpa", steps=args.base_steps, batch_size=16, seq_len=256,
                          lr=3e-3, warmup_steps=50, weight_decay=0.1, eval_interval=args.base_steps,
                          checkpoint_interval=200, output_dir=str(out), resume="auto", progress=True))
    return out / "final"


def _cut_at_line(text: str, fraction: float) -> int:
    """A line start near ``fraction`` of ``text`` (0 when there is none before it)."""
    return text.rfind("\n", 0, int(len(text) * fraction)) + 1


def split_package(package: str) -> dict[str, list[str]]:
    """``seekdeep finetune``'s split of a package, ``train`` (the first 80% of every module) and
    ``heldout`` (the rest: the test text), plus the split the learning rates are chosen on:
    ``sweep_train`` (the first 7/8 of each training text: 0-70%) and ``sweep_val`` (70-80%)."""
    from seekdeep.recipes.finetune import package_split

    train, heldout = package_split(package, heldout_fraction=0.2)
    sweep_train, sweep_val = [], []
    for text in train:
        cut = _cut_at_line(text, 7 / 8)
        if cut > 0:
            sweep_train.append(text[:cut])
            sweep_val.append(text[cut:])
        else:  # a one-line text: train on it
            sweep_train.append(text)
    return {"train": train, "heldout": heldout, "sweep_train": sweep_train, "sweep_val": sweep_val}


def prepare_splits(args, tokenizer) -> dict[str, str]:
    """Token files of the slices of ``args.package`` (see :func:`split_package`), built once
    under ``<out>/data``."""
    from seekdeep.data import build_token_file, package_files, source_fingerprint, tokenizer_fingerprint

    key = json.dumps(["lr-sweep-split", args.package, source_fingerprint(package_files(args.package)),
                      tokenizer_fingerprint(tokenizer)])
    folder = Path(args.out) / "data" / hashlib.sha256(key.encode()).hexdigest()[:16]
    texts = None
    paths = {}
    for side in STAGES["sweep"] + STAGES["final"]:
        path = folder / f"{side}.bin"
        if not (path.is_file() and (folder / f"{side}.bin.json").is_file()):
            texts = texts or split_package(args.package)
            build_token_file(iter(texts[side]), tokenizer, path, source_fingerprint=f"{key}-{side}")
        paths[side] = str(path)
    return paths


# ----------------------------------------------------------------------------- one training run


#: what each compared method trains (see _attach)
METHODS = {
    "lora": "the --lora adapter (<= 1% of the parameters), base frozen",
    "lora-ref": "the --reference-lora adapter (plain LoRA on every linear layer), base frozen",
    "full": "every parameter",
    "full-no-embedding": "every parameter but the (tied) token embedding / output head",
    "embedding-only": "only the (tied) token embedding / output head",
}
EMBEDDING_PARAMS = ("embed_tokens", "lm_head")


def adapter_spec(args, method: str) -> str | None:
    """The LoRA spec a method trains (None for the full-parameter methods)."""
    return {"lora": args.lora, "lora-ref": args.reference_lora}.get(method)


def _attach(args, model, method: str) -> None:
    """Attach ``method`` (a key of METHODS) to the base."""
    from seekdeep.recipes.finetune import FinetuneConfig, _freeze_backends, attach_method

    torch.manual_seed(args.seed)  # the same adapter initialisation in every run
    spec = adapter_spec(args, method)
    if spec is not None or method == "full":
        attach_method(model, FinetuneConfig(base=str(args.base), method="lora" if spec else "full", lora=spec or args.lora))
        return
    for name, param in model.named_parameters():
        param.requires_grad_(any(part in name for part in EMBEDDING_PARAMS) == (method == "embedding-only"))
    _freeze_backends(model)


def train_run(args, method: str, lr: float, stage: str) -> dict:
    """Fine-tune with ``method`` at ``lr`` on the training slice of ``stage``; the loss on its
    scored slice before and after."""
    from seekdeep.auto import AutoModel
    from seekdeep.data import TokenWindows
    from seekdeep.recipes.train import evaluate
    from seekdeep.train import PrecisionPolicy, make_scheduler, param_groups

    policy = PrecisionPolicy("fp32", torch.device(args.device).type)
    splits = json.loads(args.splits)
    train_side, eval_side = STAGES[stage]
    windows = TokenWindows(splits[train_side], args.seq_len, args.batch_size, seed=args.seed)
    scored = TokenWindows(splits[eval_side], args.seq_len, args.batch_size, shuffle=False)
    model = AutoModel.from_pretrained(args.base, device=args.device)
    loss_before = evaluate(model, scored, None, policy)
    _attach(args, model, method)
    trainable, total = model.get_nb_trainable_parameters()
    optimizer = torch.optim.AdamW(param_groups(model, 0.0), lr=lr, betas=(0.9, 0.95), eps=1e-8)
    scheduler = make_scheduler(optimizer, max(1, args.steps // 10), args.steps, 0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    started, losses = time.perf_counter(), []
    for _ in range(args.steps):
        batch = windows.next_batch().to(args.device)
        loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(float(loss))
        if not math.isfinite(losses[-1]):
            break
    seconds = time.perf_counter() - started
    diverged = not math.isfinite(losses[-1])
    loss_after = math.inf if diverged else evaluate(model, scored, None, policy)
    base_total = sum(p.numel() for n, p in model.named_parameters() if ".lora_" not in n)
    return {"method": method, "lr": lr, "stage": stage, "steps": len(losses), "diverged": diverged, "trainable": trainable,
            "total": total, "trainable_percent": 100 * trainable / total,
            "trainable_percent_of_base": 100 * trainable / base_total, "seconds": round(seconds, 1),
            "train_loss_last10": sum(losses[-10:]) / len(losses[-10:]),
            "train_tokens": windows.num_tokens, "scored_tokens": scored.num_tokens,
            "loss_before": loss_before, "loss": loss_after}


def _worker_argv(args, *extra: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--base", str(args.base), "--steps", str(args.steps),
            "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--lora", args.lora,
            "--reference-lora", args.reference_lora,
            "--threads", str(args.threads), "--seed", str(args.seed), "--device", args.device, "--out", args.out,
            "--package", args.package, "--splits", args.splits, *extra]


def run_all(args, runs: list[tuple[str, float, str]]) -> list[dict]:
    """Every (method, lr, stage) in ``runs``, ``args.jobs`` processes at a time; each result is
    cached in ``<out>/runs/`` under a tag of the settings."""
    folder = Path(args.out) / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    def tag(method: str) -> str:
        return hashlib.sha256(json.dumps([str(args.base), args.steps, args.seq_len, args.batch_size,
                                          adapter_spec(args, method), args.seed,
                                          args.package, args.splits]).encode()).hexdigest()[:8]

    def one(run: tuple[str, float, str]) -> dict:
        method, lr, stage = run
        path = folder / f"{stage}-{method}-lr{lr:g}-{tag(method)}.json"
        if not path.is_file():
            with open(path.with_suffix(".log"), "w") as err:
                subprocess.run(_worker_argv(args, "--worker", method, f"{lr!r}", stage, "--result", str(path)),
                               check=True, stderr=err)
        result = json.loads(path.read_text())
        print(f"# {stage} {method} lr={lr:g}: {STAGES[stage][1]} ppl {math.exp(result['loss_before']):.3f} -> "
              f"{math.exp(result['loss']):.3f} ({result['seconds']:.0f}s)", file=sys.stderr)
        return result

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        return list(pool.map(one, runs))


# ----------------------------------------------------------------------------- peak memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_probe(args, method: str) -> dict:
    """Peak training memory of ``method`` (run in a fresh process; see the module docstring)."""
    import gc

    from seekdeep.data import TokenWindows
    from seekdeep.train import param_groups

    from seekdeep.auto import AutoModel

    model = AutoModel.from_pretrained(args.base, device=args.device)
    _attach(args, model, method)
    model.train()
    optimizer = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-5)
    batch = TokenWindows(json.loads(args.splits)["train"], args.seq_len, args.batch_size).next_batch().to(args.device)
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())

    def step():
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result = {"method": method, "weight_bytes": weights}
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        result.update(before_bytes=before, peak_bytes=torch.cuda.max_memory_allocated(),
                      delta_bytes=torch.cuda.max_memory_allocated() - before, measured="CUDA max_memory_allocated")
        return result
    rss_before = _status_kib("VmRSS") * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (the peak RSS) to the current RSS
    for _ in range(3):
        step()
    peak = _status_kib("VmHWM") * 1024
    result.update(before_bytes=rss_before, peak_bytes=peak, delta_bytes=peak - rss_before,
                  measured="peak RSS (VmHWM reset before the steps) minus RSS before them, fresh process")
    # tensor bytes: what is alive now (weights, optimizer state, batch) + the allocator events' peak
    from torch.profiler import ProfilerActivity, profile

    tensors = [*model.parameters(), *model.buffers(), batch,
               *(t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor))]
    alive = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(2):
            step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    live = top = 0
    for event in events:
        live += event.nbytes()
        top = max(top, live)
    result.update(tensor_peak_bytes=alive + top, tensor_bytes_before=alive)
    return result


#: glibc's default mmap threshold grows after the first large free, so freed activations stay
#: in the heap and RSS then reports the allocator's cache; a fixed threshold hands every large
#: block back to the OS at once, and RSS follows the live tensors
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def run_memory_probe(args, method: str, env: dict[str, str] | None = None) -> dict:
    out = subprocess.run(_worker_argv(args, "--memory-probe", method), check=True, capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- continual learning


def continual(args, lr: float, naive: bool) -> tuple[list[dict], dict]:
    """Learn TASKS in sequence; per-task adapters (or, naive, one shared adapter)."""
    from seekdeep.auto import AutoModel, AutoTokenizer
    from seekdeep.data import TokenWindows
    from seekdeep.peft import ContinualLearner, parse_lora_spec
    from seekdeep.recipes.finetune import FinetuneConfig, _freeze_backends, prepare_finetune_data
    from seekdeep.recipes.train import evaluate
    from seekdeep.train import PrecisionPolicy, make_scheduler

    model = AutoModel.from_pretrained(args.base, device=args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    policy = PrecisionPolicy("fp32", torch.device(args.device).type)
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
        optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
        scheduler = make_scheduler(optimizer, min(10, args.cl_steps), args.cl_steps)
        model.train()
        for _ in range(args.cl_steps):
            batch = data[task][0].next_batch().to(args.device)
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


# ----------------------------------------------------------------------------- the three results


def compared_methods(args) -> list[str]:
    methods = ["lora", "full"] + (["lora-ref"] if args.reference_lora else [])
    return methods + (["full-no-embedding", "embedding-only"] if "ablation" in args.parts.split(",") else [])


def sweep_runs(args, methods: list[str]) -> list[tuple[str, float, str]]:
    return [(m, lr, "sweep") for m in methods for lr in (args.lora_lrs if m.startswith("lora") else args.full_lrs)]


def choose_learning_rates(args, methods: list[str]) -> dict[str, float]:
    """Each method's learning rate with the lowest validation loss in the sweep."""
    results = run_all(args, sweep_runs(args, methods))
    best_lr = {}
    for method in methods:
        rows = [r for r in results if r["method"] == method]
        best_lr[method] = min(rows, key=lambda r: r["loss"])["lr"]
        grid = sorted(r["lr"] for r in rows)
        if len(grid) > 1 and best_lr[method] in (grid[0], grid[-1]):
            print(f"# warning: the best {method} learning rate {best_lr[method]:g} is at the edge of the grid "
                  f"{grid}; widen it", file=sys.stderr)
    return best_lr


def compare(args, best_lr: dict[str, float], dev: str, common: dict) -> None:
    """Every method vs full fine-tuning at their chosen learning rates, scored on the held-out
    test: the headline row for the --lora adapter, then one row per other method."""
    methods = list(best_lr)
    results = run_all(args, sweep_runs(args, methods))
    finals = dict(zip(methods, run_all(args, [(m, best_lr[m], "final") for m in methods])))
    full = finals["full"]
    val_before = math.exp(results[0]["loss_before"])
    val_ppl = {m: math.exp(min(r["loss"] for r in results if r["method"] == m)) for m in methods}
    ppl_before = math.exp(full["loss_before"])
    gain_full = ppl_before - math.exp(full["loss"])
    for method in [m for m in methods if m != "full"]:
        run = finals[method]
        name = "lora_ppl_gain_vs_full_finetune" if method == "lora" else f"{method.replace('-', '_')}_ppl_gain_vs_full_finetune"
        extra = dict(target_ratio=0.9) if method == "lora" else {}
        if method == "lora":
            extra["sweep"] = [{"method": r["method"], "lr": r["lr"], "val_ppl": round(math.exp(r["loss"]), 3),
                               "train_loss_last10": round(r["train_loss_last10"], 4), "seconds": r["seconds"]}
                              for r in results]
        emit(name, ppl_before - math.exp(run["loss"]), "perplexity points (held-out test: last 20% of each module)",
             gain_full, "full fine-tuning, same steps and data, each at its best learning rate on the validation slice",
             dev, **extra, method=METHODS[method], spec=adapter_spec(args, method),
             ppl_before=round(ppl_before, 3), ppl=round(math.exp(run["loss"]), 3), ppl_full=round(math.exp(full["loss"]), 3),
             lr=run["lr"], full_lr=full["lr"],
             loss_gain_ratio=round((run["loss_before"] - run["loss"]) / (full["loss_before"] - full["loss"]), 4),
             val_ppl_gain_ratio=round((val_before - val_ppl[method]) / (val_before - val_ppl["full"]), 4),
             trainable=run["trainable"], trainable_percent_of_base=round(run["trainable_percent_of_base"], 4),
             train_tokens=run["train_tokens"], test_tokens=run["scored_tokens"],
             sweep_train_tokens=results[0]["train_tokens"], val_tokens=results[0]["scored_tokens"],
             val_ppl_before=round(val_before, 3), seconds={method: run["seconds"], "full": full["seconds"]}, **common)
    plot_comparison(Path(args.out) / "compare.png", ppl_before, {m: math.exp(finals[m]["loss"]) for m in methods},
                    {m: finals[m]["trainable_percent_of_base"] for m in methods})


def plot_comparison(path: Path, ppl_before: float, ppl: dict[str, float], trainable: dict[str, float]) -> None:
    """Bar chart: each method's share of full fine-tuning's test-perplexity gain (0.9 target line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted(ppl, key=lambda m: trainable[m])
    share = [(ppl_before - ppl[m]) / (ppl_before - ppl["full"]) for m in methods]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    bars = ax.barh([f"{m}\n{trainable[m]:.2f}% trainable" for m in methods], share,
                   color=["tab:orange" if m.startswith("lora") else "tab:blue" for m in methods])
    for bar, value, m in zip(bars, share, methods):
        ax.text(bar.get_width() + 0.01, bar.get_y() + bar.get_height() / 2, f"{value:.1%} (ppl {ppl[m]:.2f})",
                va="center", fontsize=8)
    ax.axvline(0.9, color="black", linestyle="--", linewidth=1, label="target for LoRA (0.9)")
    ax.set_xlim(0, 1.25)
    ax.set_xlabel(f"share of full fine-tuning's held-out perplexity gain (base ppl {ppl_before:.2f})")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"# plot: {path}", file=sys.stderr)


def memory(args, dev: str, common: dict) -> None:
    """Peak training memory of each method (see the module docstring)."""
    cpu = not args.device.startswith("cuda")
    mem = {method: run_memory_probe(args, method, FIXED_MMAP_THRESHOLD if cpu else None) for method in ("lora", "full")}
    extra = {"measured": mem["lora"]["measured"]}
    if cpu:
        default_alloc = {method: run_memory_probe(args, method) for method in ("lora", "full")}
        extra = dict(measured=mem["lora"]["measured"] + f", glibc {FIXED_MMAP_THRESHOLD}",
                     tensor_peak_mib={m: round(v["tensor_peak_bytes"] / 2**20, 1) for m, v in mem.items()},
                     default_glibc_rss_delta_mib={m: round(v["delta_bytes"] / 2**20, 1) for m, v in default_alloc.items()})
    emit("peak_training_memory_lora", mem["lora"]["delta_bytes"] / 2**20, "MiB above the loaded model",
         mem["full"]["delta_bytes"] / 2**20, "full fine-tuning", dev, **extra,
         absolute_peak_mib={m: round(v["peak_bytes"] / 2**20, 1) for m, v in mem.items()},
         weight_mib=round(mem["full"]["weight_bytes"] / 2**20, 2), **common)


# ----------------------------------------------------------------------------- main


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=None)
    parser.add_argument("--base-steps", type=int, default=800, help="steps of the base trained when none is found")
    parser.add_argument("--package", default=None, help="default: the largest package held out of pre-training")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lora", default=LORA_SPEC)
    parser.add_argument("--reference-lora", default=REFERENCE_LORA_SPEC,
                        help="a second adapter compared the same way ('' to skip)")
    parser.add_argument("--lora-lrs", type=_floats, default=_floats(LORA_LRS))
    parser.add_argument("--full-lrs", type=_floats, default=_floats(FULL_LRS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="sweep runs at a time (separate processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--cl-steps", type=int, default=40)
    parser.add_argument("--eval-batches", type=int, default=8, help="continual learning: held-out batches per task")
    parser.add_argument("--parts", default="compare,ablation,memory,continual",
                        help="what to run: compare (LoRA vs full), ablation (adds full fine-tuning without / of only "
                             "the token embedding to compare), memory, continual (uses the learning rate LoRA's "
                             "sweep chose: the sweep runs, or comes from the cache, whenever compare or continual is asked)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default="runs/bench-peft")
    # internal: one sweep run / one memory probe in its own process
    parser.add_argument("--splits", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "LR", "STAGE"), help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    if args.worker:
        result = train_run(args, args.worker[0], float(args.worker[1]), args.worker[2])
        Path(args.result).write_text(json.dumps(result, indent=1))
        return
    if args.memory_probe:
        print(json.dumps(memory_probe(args, args.memory_probe)))
        return

    started = time.perf_counter()
    from seekdeep.auto import AutoTokenizer
    from seekdeep.recipes.finetune import default_package

    args.base = resolve_base(args)
    args.package = args.package or default_package()
    args.splits = json.dumps(prepare_splits(args, AutoTokenizer.from_pretrained(args.base)))
    dev = device_name(args.device)

    parts = set(args.parts.split(","))
    common = dict(base=str(args.base), package=args.package, steps=args.steps, seq_len=args.seq_len,
                  batch_size=args.batch_size, seed=args.seed, lora=args.lora, threads=args.threads)
    best_lr = choose_learning_rates(args, compared_methods(args)) if parts & {"compare", "continual"} else {}
    if "compare" in parts:
        compare(args, best_lr, dev, common)
    if "memory" in parts:
        memory(args, dev, common)
    if "continual" in parts:
        history, base_scores = continual(args, best_lr["lora"], naive=False)
        first = TASKS[0]
        right_after, at_end = history[0]["scores"][first], history[-1]["scores"][first]
        emit("continual_first_task_ppl_after_3_tasks", math.exp(at_end), "perplexity", math.exp(right_after),
             f"{first} right after it was learned", dev, target_ratio_max=1.02, tasks=list(TASKS), cl_steps=args.cl_steps,
             lr=best_lr["lora"], base_ppl={t: round(math.exp(v), 3) for t, v in base_scores.items()},
             ppl_after_each_task=[{"after": row["after"], **{t: round(math.exp(v), 3) for t, v in row["scores"].items()}}
                                  for row in history], **common)
        naive, _ = continual(args, best_lr["lora"], naive=True)
        emit("naive_sequential_first_task_ppl_after_3_tasks", math.exp(naive[-1]["scores"][first]), "perplexity",
             math.exp(naive[0]["scores"][first]), f"{first} right after it was learned (one shared adapter)", dev,
             tasks=list(TASKS), cl_steps=args.cl_steps, lr=best_lr["lora"],
             ppl_after_each_task=[{"after": row["after"], **{t: round(math.exp(v), 3) for t, v in row["scores"].items()}}
                                  for row in naive], **common)
    print(f"# total {time.perf_counter() - started:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
