"""``seekdeep distill``: knowledge distillation of a model into a shallower student.

The recipe owns its loop and reuses the training pieces: teacher + its tokenizer -> a student
copied from some of the teacher's layers (:func:`seekdeep.distill.make_student`) -> data
encoded with the teacher's tokenizer -> held-out perplexity of the teacher and of the student
at initialisation -> AdamW + warm-up/cosine on the student only, the teacher frozen in eval
mode under ``no_grad`` -> precision policy, gradient clipping -> periodic held-out evaluation
and crash-safe checkpoints of the student -> the student in ``output_dir/final`` with the
teacher's tokenizer, metrics.jsonl, a loss curve and summary.json.

With no data it uses the embedded corpus (the standard library with ``seekdeep train``'s
module split), encoded with the teacher's tokenizer; with no teacher, ``runs/train/final``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from seekdeep.errors import ConfigError
from seekdeep.files import check_data_path, check_model_path
from seekdeep.validate import MAX_BATCH, MAX_SEED, MAX_SEQ_LEN, check_device, check_float, check_int

#: what ``seekdeep train`` writes by default: the teacher when none is given
DEFAULT_TEACHER = Path("runs/train/final")


@dataclass
class DistillRunConfig:
    """Every knob of a distillation run; the defaults fit a 2-core CPU in a few minutes for the
    model ``seekdeep train`` makes."""

    teacher: str | None = None  # model directory or hub id; None: runs/train/final
    data: str | None = None  # text file, folder or .jsonl; None: the embedded corpus
    layers: str = "every_other"  # teacher layers the student keeps: every_other or e.g. "0,2,5"
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the distillation (KL) term; 1 - alpha goes to cross-entropy
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    steps: int = 200
    max_time: float | None = None  # seconds of training after which the run wraps up early
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20  # capped at steps
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    indexer_loss_weight: float = 1.0  # dsa students: weight of the indexer's KL towards dense attention
    precision: str = "fp32"
    eval_interval: int = 50
    eval_batches: int = 20
    checkpoint_interval: int = 50
    keep_last: int = 2
    output_dir: str = "runs/distill"
    resume: str | None = None  # "auto" (latest in output_dir) or a checkpoint path
    overwrite: bool = False  # replace a finished (or unfinished) run in output_dir instead of refusing
    device: str | None = None  # None: cuda when available, else cpu
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("grad_accum", "steps", "eval_interval", "eval_batches", "checkpoint_interval", "keep_last"):
            check_int(name, getattr(self, name))
        check_int("seq_len", self.seq_len, 1, MAX_SEQ_LEN)
        check_int("batch_size", self.batch_size, 1, MAX_BATCH)
        check_int("warmup_steps", self.warmup_steps, 0)
        check_int("seed", self.seed, 0, MAX_SEED)
        check_float("lr", self.lr, 0, 10, lo_open=True)
        check_float("grad_clip", self.grad_clip, 0, lo_open=True)
        check_float("weight_decay", self.weight_decay, 0, 10)
        check_float("indexer_loss_weight", self.indexer_loss_weight, 0, 1000)
        check_float("min_lr_ratio", self.min_lr_ratio, 0, 1)
        check_float("max_time", self.max_time, 0, lo_open=True, optional=True)
        check_model_path("teacher", self.teacher)
        check_data_path("data", self.data)
        check_device("device", self.device)
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError("precision", f"unknown {self.precision!r}; accepted: fp32, bf16, fp16")
        if not isinstance(self.layers, str):  # a list from Python: keep the JSON-friendly string form
            self.layers = ",".join(str(i) for i in self.method().layers)
        self.method()  # validates layers, temperature and alpha

    def method(self):
        """The distillation settings as a :class:`seekdeep.distill.DistillConfig`."""
        from seekdeep.distill import DistillConfig

        return DistillConfig(layers=self.layers, temperature=self.temperature, alpha=self.alpha)


# ----------------------------------------------------------------------------- teacher and data


def default_teacher() -> Path:
    """``runs/train/final`` when ``seekdeep train`` made it."""
    if (DEFAULT_TEACHER / "config.json").is_file():
        return DEFAULT_TEACHER
    raise ConfigError("teacher", f"none given and {DEFAULT_TEACHER} does not exist; train one with `seekdeep train` "
                      "or pass a model directory or hub id")


def prepare_distill_data(data: str | None, tokenizer, seq_len: int, progress: bool = False) -> tuple[Path, Path, dict[str, Any]]:
    """Train / held-out token files encoded with the teacher's ``tokenizer``, cached in
    ``$SEEKDEEP_HOME/cache``. User data is split as ``seekdeep finetune`` splits it (its
    :func:`~seekdeep.recipes.finetune.prepare_finetune_data`); with no data, the embedded
    corpus with the module split ``seekdeep train`` uses, so a teacher trained there is
    measured on the modules it never saw."""
    if data is not None:
        from seekdeep.recipes.finetune import FinetuneConfig, prepare_finetune_data

        return prepare_finetune_data(FinetuneConfig(data=data, seq_len=seq_len, progress=False), tokenizer)
    import seekdeep.data as sd_data

    split = sd_data.default_corpus()
    fingerprint = hashlib.sha256(json.dumps(
        ["corpus", split.fingerprint, sd_data.tokenizer_fingerprint(tokenizer)]).encode()).hexdigest()[:16]
    folder = sd_data.default_cache_dir() / f"distill-{fingerprint}"
    info: dict[str, Any] = {"data": "embedded corpus (standard library)", "heldout_rule": "whole modules and packages, by hash"}
    paths = {}
    for side, files in (("train", split.train_files), ("heldout", split.heldout_files)):
        paths[side] = folder / f"{side}.bin"
        token_info = sd_data.build_token_file(sd_data.iter_documents(files), tokenizer, paths[side],
                                              source_fingerprint=f"{fingerprint}-{side}", progress=progress,
                                              total=len(files), desc=f"tokenizing {side}")
        if token_info["num_tokens"] < seq_len:
            raise ConfigError("seq_len", f"{seq_len} is longer than the {side} side of the corpus "
                              f"({token_info['num_tokens']} tokens); use a smaller --seq-len")
        info[f"{side}_tokens"] = token_info["num_tokens"]
    return paths["train"], paths["heldout"], info


# ----------------------------------------------------------------------------- the loop


def distill(cfg: DistillRunConfig) -> dict[str, Any]:
    """Run (or resume) a distillation job; returns a summary dict (also in summary.json)."""
    from seekdeep.auto import AutoModel, AutoTokenizer
    from seekdeep.data import TokenWindows
    from seekdeep.distill import distillation_loss, make_student
    from seekdeep.files import write_json_atomic
    from seekdeep.recipes.train import MetricsLog, apply_phase, evaluate, plot_losses
    from seekdeep.train import (PrecisionPolicy, load_checkpoint, make_scheduler, param_groups, prepare_run_dir,
                                publish_dir, resume_checkpoint, resumed_config, save_checkpoint)
    from seekdeep.train.loop import StepEnd, optimizer_step

    out = prepare_run_dir(cfg.output_dir, command="distill", overwrite=cfg.overwrite, resume=cfg.resume)
    ckpt_dir = out / "checkpoints"
    resume_path = resume_checkpoint(cfg.resume, ckpt_dir)
    if resume_path is not None:
        cfg = resumed_config(resume_path, cfg, command="distill", marker="temperature")
    teacher_dir = Path(cfg.teacher) if cfg.teacher else default_teacher()
    if cfg.teacher is None:
        cfg = DistillRunConfig(**{**asdict(cfg), "teacher": str(teacher_dir)})
    method = cfg.method()
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    policy = PrecisionPolicy(cfg.precision, device.type)

    teacher = AutoModel.from_pretrained(teacher_dir, device=device)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    layers = method.student_layers(teacher.config.num_hidden_layers)
    torch.manual_seed(cfg.seed)
    student = make_student(teacher, layers)
    teacher.requires_grad_(False)
    teacher.eval()
    train_path, heldout_path, data_info = prepare_distill_data(cfg.data, tokenizer, cfg.seq_len, cfg.progress)
    windows = TokenWindows(train_path, cfg.seq_len, cfg.batch_size, seed=cfg.seed)
    heldout = TokenWindows(heldout_path, cfg.seq_len, cfg.batch_size, seed=cfg.seed, shuffle=False)
    out.mkdir(parents=True, exist_ok=True)

    teacher_loss = evaluate(teacher, heldout, cfg.eval_batches, policy)
    init_loss = evaluate(student, heldout, cfg.eval_batches, policy)
    apply_phase(student, "sparse")  # dsa students: sparse attention, the indexer keeps following dense attention
    optimizer = torch.optim.AdamW(param_groups(student, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
                                  fused=device.type == "cuda")
    scheduler = make_scheduler(optimizer, min(cfg.warmup_steps, cfg.steps), cfg.steps, cfg.min_lr_ratio)
    scaler = policy.make_scaler()
    start_step = 0
    if resume_path is not None:
        state = load_checkpoint(resume_path, student, optimizer, scheduler, scaler)
        windows.load_state_dict(state.data_state)
        start_step = state.step
        print(f"resumed from {resume_path} at step {start_step}", file=sys.stderr)

    metrics = MetricsLog(out / "metrics.jsonl", start_step if resume_path is not None else None)
    if resume_path is None:
        metrics.write({"kind": "teacher_eval", "step": 0, "eval_loss": teacher_loss, "eval_ppl": math.exp(teacher_loss)})
        metrics.write({"kind": "eval", "step": 0, "eval_loss": init_loss, "eval_ppl": math.exp(init_loss), "init": True})
    teacher_params, student_params = teacher.num_parameters(), student.num_parameters()
    print(f"distilling {teacher_dir} ({teacher.config.num_hidden_layers} layers, {teacher_params / 1e6:.2f}M parameters) "
          f"into layers {layers} ({student_params / 1e6:.2f}M); held-out perplexity: teacher {math.exp(teacher_loss):.2f}, "
          f"student at init {math.exp(init_loss):.2f}", file=sys.stderr)
    params = [p for p in student.parameters() if p.requires_grad]
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    student.train()
    bar = tqdm(total=cfg.steps, initial=start_step, desc="distill", disable=not cfg.progress, dynamic_ncols=True)
    step = start_step

    def run_eval(at: int) -> None:
        eval_loss = evaluate(student, heldout, cfg.eval_batches, policy)
        metrics.write({"kind": "eval", "step": at, "eval_loss": eval_loss, "eval_ppl": math.exp(eval_loss)})
        bar.write(f"step {at}: student held-out perplexity {math.exp(eval_loss):.2f} (teacher {math.exp(teacher_loss):.2f})")

    end_of_step = StepEnd(steps=cfg.steps, eval_interval=cfg.eval_interval, checkpoint_interval=cfg.checkpoint_interval,
                          max_time=cfg.max_time, say=bar.write)
    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            parts = {"loss": 0.0, "kl": 0.0, "total": 0.0, "indexer_loss": 0.0}
            for _ in range(cfg.grad_accum):
                batch = windows.next_batch().to(device)
                with torch.no_grad(), policy.autocast():
                    teacher_logits = teacher(batch).logits
                with policy.autocast():
                    output = student(batch)
                losses = distillation_loss(output.logits, teacher_logits, batch, method.temperature, method.alpha)
                loss = losses.total
                if output.aux_loss is not None:
                    loss = loss + cfg.indexer_loss_weight * output.aux_loss
                    parts["indexer_loss"] += float(output.aux_loss.detach()) / cfg.grad_accum
                for key, value in (("loss", losses.ce), ("kl", losses.kl), ("total", losses.total)):
                    parts[key] += float(value.detach()) / cfg.grad_accum
                scaler.scale(loss / cfg.grad_accum).backward()
            grad_norm, applied = optimizer_step(optimizer, scheduler, scaler, params, cfg.grad_clip)
            step += 1
            dt = time.perf_counter() - t0
            # "loss" is the student's cross-entropy, comparable with the held-out loss on the plot
            metrics.write({"kind": "train", "step": step, **parts, "lr": scheduler.get_last_lr()[0],
                           "grad_norm": grad_norm, "tokens_per_s": tokens_per_step / dt, "applied": applied})
            bar.update(1)
            bar.set_postfix(ce=f"{parts['loss']:.3f}", kl=f"{parts['kl']:.3f}")
            if end_of_step(step, parts["total"], evaluate=lambda: run_eval(step), checkpoint=lambda: save_checkpoint(
                    ckpt_dir, step, student, optimizer, scheduler, scaler, data_state=windows.state_dict(),
                    extra={"config": asdict(cfg), "layers": layers}, keep_last=cfg.keep_last)):
                break
        final_loss = evaluate(student, heldout, cfg.eval_batches, policy)
        metrics.write({"kind": "eval", "step": step, "eval_loss": final_loss, "eval_ppl": math.exp(final_loss), "final": True})
    finally:
        bar.close()
        metrics.close()

    final_dir = out / "final"
    student.eval()
    publish_dir(final_dir, lambda tmp: (student.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    plot_losses(metrics.path, out / "loss.png", f"seekdeep distill: layers {cfg.layers}, T={method.temperature:g}, "
                f"alpha={method.alpha:g}")
    summary = {
        "teacher": str(teacher_dir), **data_info, "layers": layers,
        "teacher_layers": teacher.config.num_hidden_layers, "student_layers": len(layers),
        "teacher_parameters": teacher_params, "student_parameters": student_params,
        "parameter_ratio": student_params / teacher_params,
        "steps": step, "stopped_early": end_of_step.stopped_early,
        "teacher_loss": teacher_loss, "teacher_ppl": math.exp(teacher_loss),
        "student_init_loss": init_loss, "student_init_ppl": math.exp(init_loss),
        "student_loss": final_loss, "student_ppl": math.exp(final_loss),
        "train_seconds": end_of_step.elapsed(), "model_dir": str(final_dir),
        "loss_curve": str(out / "loss.png"), "config": asdict(cfg),
    }
    write_json_atomic(out / "summary.json", summary)
    return summary


# ----------------------------------------------------------------------------- CLI


def cmd_distill(args: argparse.Namespace) -> int:
    cfg = DistillRunConfig(**{f.name: getattr(args, f.name) for f in fields(DistillRunConfig)})
    s = distill(cfg)
    print(f"\nheld-out perplexity: teacher {s['teacher_ppl']:.2f}; student ({s['student_layers']} of "
          f"{s['teacher_layers']} layers, {100 * s['parameter_ratio']:.0f}% of the parameters) {s['student_init_ppl']:.2f} "
          f"at init -> {s['student_ppl']:.2f} after {s['steps']} steps ({s['train_seconds']:.0f}s)")
    print(f"student: {s['model_dir']}  (try: seekdeep generate {s['model_dir']} --prompt 'def ')")
    print(f"loss curve: {s['loss_curve']}")
    return 0


_HELP = {
    "teacher": f"teacher model directory or hub id (default: {DEFAULT_TEACHER}, what `seekdeep train` writes)",
    "data": "text file, folder or .jsonl (text field); default: the Python standard library, with the module "
            "split `seekdeep train` uses",
    "layers": "teacher layers the student keeps: every_other (0,2,4,...; default) or indices such as 0,2,5",
    "temperature": "softmax temperature of the distillation term (default: 2.0)",
    "alpha": "weight of the distillation (KL) term; 1 - alpha goes to next-token cross-entropy (default: 0.5)",
    "resume": "'auto' (latest checkpoint in --output-dir) or a checkpoint directory",
    "max_time": "seconds of training after which the run evaluates, saves and stops",
    "precision": "fp32 (default), bf16 or fp16 (with dynamic loss scaling)",
}


def register(subparsers) -> None:
    """Add ``seekdeep distill`` (see the module docstring)."""
    from seekdeep.cli import add_recipe_command

    add_recipe_command(subparsers, "distill", "distil a model into a shallower student copied from its layers",
                       DistillRunConfig, "teacher", _HELP, cmd_distill)
