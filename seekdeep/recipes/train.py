"""``seekdeep train``: pre-train a small code model on the embedded corpus (or user data).

The recipe owns its loop: data -> model -> AdamW + warm-up/cosine -> precision policy
(autocast, fp16 loss scaling) -> gradient accumulation and clipping -> periodic held-out
evaluation and crash-safe checkpoints -> final model directory, loss curve and a sample.

With the ``dsa`` backend the run follows DeepSeek-V3.2's recipe for its indexer, adapted to
training from scratch: (1) dense attention for half the steps while the indexer learns to
imitate it through a KL loss, (2) optionally (``indexer_warmup_steps``, off by default: the
indexer already learns in phase 1) a warm-up in which only the indexer learns, (3) sparse
training: every query keeps the ``local_window`` most recent keys plus the indexer's top
picks (``topk`` in all), the indexer still following the KL loss.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from seekdeep.errors import ConfigError
from seekdeep.files import check_data_path
from seekdeep.validate import MAX_BATCH, MAX_SEED, MAX_SEQ_LEN, check_device, check_float, check_int

PRESETS = ("tiny", "small", "base", "125m")
MAX_VOCAB = 1 << 20


@dataclass
class TrainConfig:
    """Every knob of a training run; the defaults fit a 2-core CPU in about ten minutes."""

    preset: str = "tiny"
    attention_backend: str = "dsa"
    topk: int = 64  # dsa: keys per query (block mode: the key budget per query block)
    block_size: int = 1  # dsa: 1 = token-level selection; > 1 = select key blocks of this many slots
    local_window: int | None = None  # dsa: recent keys always attended, in topk; None: topk // 2 (block mode: in blocks)
    distance_bias: int | None = None  # dsa token mode: learned indexer score per key distance up to this many slots; None: seq_len (block mode: 0), 0: off
    data: str | None = None  # None: the Python standard library (the embedded corpus)
    vocab_size: int = 4096
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    steps: int = 700
    max_time: float | None = None  # seconds of training after which the run wraps up early
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50  # capped at steps
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    precision: str = "fp32"
    dense_fraction: float = 0.5  # dsa: share of steps trained densely (indexer imitating)
    indexer_warmup_steps: int = 0  # dsa: steps in which only the indexer learns (it already learns while dense)
    indexer_loss_weight: float = 1.0
    eval_interval: int = 100
    eval_batches: int = 20
    checkpoint_interval: int = 100
    keep_last: int = 2
    output_dir: str = "runs/train"
    resume: str | None = None  # "auto" (latest in output_dir) or a checkpoint path
    overwrite: bool = False  # replace a finished (or unfinished) run in output_dir instead of refusing
    compile: bool = False
    gradient_checkpointing: bool = False
    fp8: bool = False
    device: str | None = None  # None: cuda when available, else cpu
    seed: int = 0
    sample_prompt: str = "def "
    sample_tokens: int = 96
    progress: bool = True
    parallel: str | None = None  # under torchrun: a layout such as "dp_shard=2" or "dp_shard=2,tp=2"
    grad_flow: bool = False  # record per-layer gradient / update norms (grad_flow.json / .png; not with parallel)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError("preset", f"unknown preset {self.preset!r}; accepted: {', '.join(PRESETS)}")
        if self.grad_flow and self.parallel:
            raise ConfigError("grad_flow", "is recorded on one process only; accepted: --grad-flow without --parallel")
        for name in ("grad_accum", "steps", "eval_interval", "eval_batches", "checkpoint_interval", "keep_last",
                     "sample_tokens"):
            check_int(name, getattr(self, name))
        check_int("vocab_size", self.vocab_size, 300, MAX_VOCAB)  # 256 bytes + merges + special tokens
        check_int("seq_len", self.seq_len, 1, MAX_SEQ_LEN)
        check_int("batch_size", self.batch_size, 1, MAX_BATCH)
        check_int("topk", self.topk, 1, MAX_SEQ_LEN)
        check_int("block_size", self.block_size, 1, MAX_SEQ_LEN)
        for name in ("warmup_steps", "indexer_warmup_steps"):
            check_int(name, getattr(self, name), 0)
        check_int("seed", self.seed, 0, MAX_SEED)
        check_float("lr", self.lr, 0, 10, lo_open=True)
        check_float("grad_clip", self.grad_clip, 0, lo_open=True)
        check_float("weight_decay", self.weight_decay, 0, 10)
        check_float("indexer_loss_weight", self.indexer_loss_weight, 0, 1000)
        check_float("min_lr_ratio", self.min_lr_ratio, 0, 1)
        check_data_path("data", self.data)
        check_device("device", self.device)
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ConfigError("output_dir", f"got {self.output_dir!r}; accepted: a directory path")
        if self.local_window is not None and (isinstance(self.local_window, bool) or not isinstance(self.local_window, int)
                                              or not 1 <= self.local_window <= self.topk):
            raise ConfigError("local_window", f"got {self.local_window!r} with topk={self.topk}; accepted: None (topk // 2) "
                              "or an int in [1, topk]")
        check_int("distance_bias", self.distance_bias, 0, MAX_SEQ_LEN, optional=True)  # None: seq_len, 0: off
        if self.distance_bias and self.block_size > 1:
            raise ConfigError("distance_bias", "is token-mode only; accepted with block_size > 1: 0")
        check_float("dense_fraction", self.dense_fraction, 0, 1, hi_open=True)
        check_float("max_time", self.max_time, 0, lo_open=True, optional=True)
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError("precision", f"unknown {self.precision!r}; accepted: fp32, bf16, fp16")
        if self.parallel is not None:
            from seekdeep.parallel.recipe import check_recipe_config

            check_recipe_config(self.parallel, self.attention_backend, self.indexer_warmup_steps, self.fp8)

    @property
    def dense_steps(self) -> int:
        return int(self.steps * self.dense_fraction) if self.attention_backend == "dsa" else 0

    @property
    def dsa_local_window(self) -> int:
        """Recent keys every query keeps: half the budget unless set. A sliding window plus selected
        keys (as NSA / DeepSeek's sparse attention keep) closed half of the held-out perplexity gap
        of top-k alone (benchmarks/train_quality.py): the position-free indexer cannot tell recency."""
        return self.local_window if self.local_window is not None else max(1, self.topk // 2)

    @property
    def dsa_distance_bias(self) -> int:
        """Distances the indexer scores by position (token mode): the sequence length unless set.
        With it dsa matched dense on a copy task (0.88 vs 0.88; without: 0.05) and came within
        0.6% of dense perplexity on the corpus (benchmarks/retrieval.py, train_quality.py)."""
        if self.distance_bias is not None:
            return self.distance_bias
        return 0 if self.block_size > 1 else self.seq_len

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len

    def phase(self, step: int) -> str:
        """'dense' | 'indexer_warmup' | 'sparse' for dsa; 'dense' for every other backend."""
        if self.attention_backend != "dsa":
            return "dense"
        if step < self.dense_steps:
            return "dense"
        if step < self.dense_steps + self.indexer_warmup_steps:
            return "indexer_warmup"
        return "sparse"


# ----------------------------------------------------------------------------- pieces


def _dsa_options(cfg: TrainConfig) -> dict[str, Any]:
    options: dict[str, Any] = {"topk": cfg.topk}
    # Options equal to the backend's own defaults are left out of config.json.
    if cfg.block_size > 1:
        options["block_size"] = cfg.block_size
        local_blocks = -(-cfg.dsa_local_window // cfg.block_size)  # the blocks holding the last local_window slots
        if local_blocks > 1:
            options["local_blocks"] = min(local_blocks, -(-cfg.topk // cfg.block_size))
    elif cfg.dsa_local_window != 1:
        options["local_window"] = cfg.dsa_local_window
    if cfg.dsa_distance_bias:
        options["distance_bias"] = cfg.dsa_distance_bias
    return options


def build_model(cfg: TrainConfig, tokenizer, device: torch.device):
    from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_name(
        cfg.preset,
        vocab_size=tokenizer.vocab_size,
        max_position_embeddings=max(1024, cfg.seq_len),
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        attention_backend=cfg.attention_backend,
        attention_options=_dsa_options(cfg) if cfg.attention_backend == "dsa" else {},
    )
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.init_weights()
    model.gradient_checkpointing = cfg.gradient_checkpointing
    return model


def _indexers(model) -> list[torch.nn.Module]:
    from seekdeep.attention.dsa import DynamicSparseAttention

    return [m for m in model.modules() if isinstance(m, DynamicSparseAttention)]


def apply_phase(model, phase: str) -> None:
    """Switch the DSA modules and which parameters learn for a training phase."""
    indexers = _indexers(model)
    if not indexers:
        return
    indexer_params = {id(p) for m in indexers for p in m.parameters()}
    for module in indexers:
        module.dense_warmup = phase != "sparse"
        module.compute_indexer_loss = True
    for param in model.parameters():
        param.requires_grad_(phase != "indexer_warmup" or id(param) in indexer_params)


@torch.no_grad()
def evaluate(model, windows, max_batches: int, policy) -> float:
    """Mean held-out cross-entropy (nats per token) over the first ``max_batches`` batches."""
    from seekdeep.train import mean_loss

    return mean_loss(model, windows.eval_batches(max_batches), policy)


class MetricsLog:
    """metrics.jsonl (plus TensorBoard when installed). On resume, lines past the resumed
    step are dropped so the log reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int | None, use_tensorboard: bool = True):
        self.path = path
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        self._file = open(path, "a", encoding="utf-8")
        self._tb = None
        if use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(path.parent / "tensorboard"))
            except ImportError:
                pass

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "kind", "phase") and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{record.get('kind', 'train')}/{key}", value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def plot_losses(metrics_path: Path, out_png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss (LM)", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_png.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, out_png)


def _maybe_fp8(model, cfg: TrainConfig, device: torch.device) -> None:
    if not cfg.fp8:
        return
    if device.type != "cuda":
        raise ConfigError("fp8", "fp8 matmuls need a CUDA device; accepted on this machine: --fp8 off")
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as exc:
        raise ConfigError("fp8", "needs torchao (pip install 'seekdeep[fp8]')") from exc
    convert_to_float8_training(model, module_filter_fn=lambda mod, name: "lm_head" not in name and mod.in_features % 16 == 0 and mod.out_features % 16 == 0)


# ----------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a training job; returns a summary dict (also written to summary.json)."""
    from seekdeep.data import TokenWindows, prepare_data
    from seekdeep.files import write_json_atomic
    from seekdeep.train import (RUN_FIELDS, PrecisionPolicy, latest_checkpoint, load_checkpoint, make_scheduler,
                                param_groups, prepare_run_dir, publish_dir, resume_checkpoint, resumed_config,
                                save_checkpoint)
    from seekdeep.train.loop import StepEnd, optimizer_step

    # before anything is written: never replace a finished run unless asked (every rank checks,
    # rank 0 alone clears an overwritten run's checkpoints)
    out = prepare_run_dir(cfg.output_dir, command="train", overwrite=cfg.overwrite, resume=cfg.resume,
                          clear=int(os.environ.get("RANK", "0")) == 0)
    ckpt_dir = out / "checkpoints"
    resume_path = resume_checkpoint(cfg.resume, ckpt_dir)
    if resume_path is not None:
        # a distributed checkpoint may resume on another layout: parallel comes from the command line too
        cfg = resumed_config(resume_path, cfg, command="train", keep=(*RUN_FIELDS, "parallel"),
                             saved=_saved_config(resume_path))
    run = None
    if cfg.parallel:
        from seekdeep.parallel.recipe import DistributedRun

        run = DistributedRun.start(cfg.parallel, cfg.precision, cfg.gradient_checkpointing, cfg.compile)
    main_rank = run is None or run.is_main
    say = (lambda text, file=None: tqdm.write(text, file=file)) if main_rank else (lambda text, file=None: None)
    out.mkdir(parents=True, exist_ok=True)
    device = run.device if run else torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    policy = PrecisionPolicy(cfg.precision, device.type)
    torch.manual_seed(cfg.seed)

    with run.main_first() if run else contextlib.nullcontext():  # rank 0 fills the data cache
        data = prepare_data(cfg.data, vocab_size=cfg.vocab_size, seq_len=cfg.seq_len, progress=cfg.progress and main_rank)
    tokenizer = data.tokenizer
    windows = TokenWindows(data.train_path, cfg.seq_len, cfg.batch_size, seed=cfg.seed)
    heldout = TokenWindows(data.heldout_path, cfg.seq_len, cfg.batch_size, seed=cfg.seed, shuffle=False)

    model = build_model(cfg, tokenizer, device if run is None else torch.device("cpu"))
    _maybe_fp8(model, cfg, device)
    all_params = list(model.parameters())
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
                                  fused=device.type == "cuda")
    pm = None
    if run is not None:  # `model` stays a full CPU copy: the source of every rank's shards and the final save
        pm = run.parallelize(model)
        optimizer = run.optimizer(lambda part: torch.optim.AdamW(
            param_groups(part, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, foreach=False))
    scheduler = make_scheduler(optimizer, min(cfg.warmup_steps, cfg.steps), cfg.steps, cfg.min_lr_ratio)
    scaler = policy.make_scaler()
    flow = None
    if cfg.grad_flow:
        from seekdeep.explain.gradflow import GradientFlowRecorder

        flow = GradientFlowRecorder(model, optimizer, log_dir=out / "tensorboard")
    start_step = 0
    if resume_path is not None:
        from seekdeep.parallel.checkpoint import is_distributed_checkpoint, load_distributed_checkpoint

        if pm is not None or is_distributed_checkpoint(resume_path):
            state = load_distributed_checkpoint(resume_path, pm.parts if pm is not None else [model], optimizer,
                                                scheduler, scaler)
        else:
            state = load_checkpoint(resume_path, model, optimizer, scheduler, scaler)
        windows.load_state_dict(state.data_state)
        start_step = state.step
        say(f"resumed from {resume_path} at step {start_step}", sys.stderr)
    forward = pm if pm is not None else torch.compile(model) if cfg.compile else model

    metrics = MetricsLog(out / "metrics.jsonl", start_step if resume_path is not None else None) if main_rank else None
    n_params = model.num_parameters()
    layout = f", parallel={run.config.describe()} on {run.world_size} ranks" if run else ""
    say(f"model: {cfg.preset} llama, {n_params / 1e6:.2f}M parameters, attention={cfg.attention_backend}, "
        f"device={device}, precision={cfg.precision}{layout}; data: {data.stats.get('train_tokens', '?')} training tokens",
        sys.stderr)
    (pm or model).train()
    bar = tqdm(total=cfg.steps, initial=start_step, desc="train", disable=not (cfg.progress and main_rank), dynamic_ncols=True)
    step, tokens_seen = start_step, 0

    def run_eval(at: int, phase: str) -> None:
        loss = evaluate(pm or model, heldout, cfg.eval_batches, policy)
        if metrics is not None:
            metrics.write({"kind": "eval", "step": at, "phase": phase, "eval_loss": loss, "eval_ppl": math.exp(loss)})
        say(f"step {at}: held-out loss {loss:.4f}, perplexity {math.exp(loss):.2f}")

    def checkpoint(at: int) -> None:
        if pm is not None:
            from seekdeep.parallel.checkpoint import save_distributed_checkpoint

            save_distributed_checkpoint(ckpt_dir, at, pm.parts, optimizer, scheduler, scaler,
                                        data_state=windows.state_dict(), extra={"config": asdict(cfg)},
                                        keep_last=cfg.keep_last)
        else:
            save_checkpoint(ckpt_dir, at, model, optimizer, scheduler, scaler, data_state=windows.state_dict(),
                            extra={"config": asdict(cfg)}, keep_last=cfg.keep_last)

    # under torchrun every rank stops at the same step
    end_of_step = StepEnd(steps=cfg.steps, eval_interval=cfg.eval_interval, checkpoint_interval=cfg.checkpoint_interval,
                          max_time=cfg.max_time, say=say,
                          agree=(lambda out_of_time: bool(run.mean(float(out_of_time)) > 0)) if run is not None else None)
    try:
        while step < cfg.steps:
            phase = cfg.phase(step)
            for part in pm.parts if pm is not None else [model]:
                apply_phase(part, phase)
            t0 = time.perf_counter()
            lm_total, aux_total = 0.0, 0.0
            for _ in range(cfg.grad_accum):
                batch = windows.next_batch()
                batch = (pm.local_batch(batch) if pm is not None else batch).to(device)  # this dp rank's rows
                if pm is not None and pm.is_pipelined:  # the schedule runs forward and backward itself
                    loss = pm.forward_backward(batch, loss_scale=scaler.scale_value / cfg.grad_accum, autocast=policy.autocast)
                    lm_total += float(loss) / cfg.grad_accum
                    continue
                try:
                    with policy.autocast():
                        output = forward(batch, labels=batch)
                except torch.OutOfMemoryError as exc:
                    raise ConfigError(
                        "batch_size",
                        f"a batch of {cfg.batch_size} x {cfg.seq_len} tokens does not fit in {device} memory; lower "
                        "--batch-size (and raise --grad-accum to keep the tokens per step) or use --gradient-checkpointing",
                    ) from exc
                loss = output.loss
                if output.aux_loss is not None:
                    loss = loss + cfg.indexer_loss_weight * output.aux_loss
                    aux_total += float(output.aux_loss.detach()) / cfg.grad_accum
                lm_total += float(output.loss.detach()) / cfg.grad_accum
                scaler.scale(loss / cfg.grad_accum).backward()
            grad_norm, applied = optimizer_step(optimizer, scheduler, scaler, all_params, cfg.grad_clip,
                                                clip=pm.clip_grad_norm_ if pm is not None else None)
            if pm is not None:
                lm_total, aux_total = run.mean(lm_total), run.mean(aux_total)  # the global batch's losses
            step += 1
            dt = time.perf_counter() - t0
            tokens_seen += cfg.tokens_per_step
            record = {"kind": "train", "step": step, "phase": phase, "loss": lm_total, "indexer_loss": aux_total,
                      "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm), "tokens_per_s": cfg.tokens_per_step / dt,
                      "applied": bool(applied), "loss_scale": scaler.scale_value}
            if metrics is not None:
                metrics.write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{lm_total:.3f}", tok_s=f"{record['tokens_per_s']:.0f}", phase=phase)
            if end_of_step(step, lm_total, evaluate=lambda: run_eval(step, phase), checkpoint=lambda: checkpoint(step)):
                break
    finally:
        bar.close()
        metrics_path = out / "metrics.jsonl"
        if metrics is not None:
            metrics.close()

    for part in pm.parts if pm is not None else [model]:
        apply_phase(part, cfg.phase(step))
    final_loss = evaluate(pm or model, heldout, cfg.eval_batches, policy)
    if run is not None:
        if run.is_main:  # the full model for saving and sampling: the final checkpoint, read on rank 0 alone
            from seekdeep.parallel.checkpoint import load_distributed_checkpoint

            load_distributed_checkpoint(latest_checkpoint(ckpt_dir), [model], no_dist=True)
        run.barrier()
    final_dir, sample = out / "final", ""
    if main_rank:  # under torchrun the other ranks only return the summary
        apply_phase(model, cfg.phase(step))
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"kind": "eval", "step": step, "phase": cfg.phase(step), "eval_loss": final_loss,
                                "eval_ppl": math.exp(final_loss), "final": True}) + "\n")
        model.eval()
        publish_dir(final_dir, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
        prompt = tokenizer(cfg.sample_prompt, return_tensors="pt")
        sample_ids = model.generate(prompt["input_ids"], max_new_tokens=cfg.sample_tokens, do_sample=True,
                                    temperature=0.8, top_k=50, seed=cfg.seed)
        sample = tokenizer.decode(sample_ids[0].tolist(), skip_special_tokens=True)
        plot_losses(metrics_path, out / "loss.png", f"seekdeep train: {cfg.preset}, {cfg.attention_backend}")
    summary = {
        "steps": step,
        "stopped_early": end_of_step.stopped_early,
        "heldout_loss": final_loss,
        "heldout_ppl": math.exp(final_loss),
        "parameters": n_params,
        "train_seconds": end_of_step.elapsed(),
        "tokens_seen": tokens_seen,
        "model_dir": str(final_dir),
        "loss_curve": str(out / "loss.png"),
        "sample": sample,
        "config": asdict(cfg),
    }
    if flow is not None:
        flow.close()
        summary["grad_flow"] = flow.save(out)
    if main_rank:
        write_json_atomic(out / "summary.json", summary)
    if run is not None:
        run.close()
    return summary


def _saved_config(checkpoint: Path) -> dict[str, Any]:
    from seekdeep.parallel.checkpoint import is_distributed_checkpoint, read_trainer_state
    from seekdeep.train import load_checkpoint

    if is_distributed_checkpoint(checkpoint):
        state = read_trainer_state(checkpoint)
    else:
        state = load_checkpoint(checkpoint, restore_rng=False)
    return (state.extra or {}).get("config")
