"""``seekdeep finetune``: parameter-efficient fine-tuning of a model on new data.

The recipe owns its loop and reuses the training pieces: base model + its tokenizer -> data
split into train / held-out token files (with the base's tokenizer) -> held-out perplexity
before -> an adapter (LoRA / DoRA, bottleneck, prompt tuning; or full fine-tuning) -> AdamW +
warm-up/cosine -> precision policy -> periodic evaluation and crash-safe checkpoints holding
only the adapter -> perplexity after, the adapter in peft's layout, a loss curve.

With no data it fine-tunes the default model on one standard-library package that the
default corpus split holds out of pre-training (``http``), training on the first 80% of each of
its modules and measuring perplexity on the last 20%. With no base it uses ``runs/train/final`` when
``seekdeep train`` made it, else trains a small model once into ``$SEEKDEEP_HOME``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
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

METHODS = ("lora", "bottleneck", "prompt", "full")
TASKS = ("lm", "classification")
DEFAULT_LR = {"lora": 3e-3, "bottleneck": 2e-3, "prompt": 3e-2, "full": 1e-3}
#: the budget of the base model trained when none is given and runs/train/final is missing; with
#: the default steps below, a bare ``seekdeep finetune`` stays within a few minutes on 2 CPU cores
DEFAULT_BASE_STEPS = 150


@dataclass
class FinetuneConfig:
    """Every knob of a fine-tuning run; the defaults fit a 2-core CPU in a few minutes."""

    base: str | None = None  # model directory or hub id; None: the default model (see module docstring)
    data: str | None = None  # text file, folder or .jsonl; None: a held-out standard-library package
    package: str | None = None  # with no data: the package (default: the largest one held out of pre-training)
    method: str = "lora"
    lora: str = "r=8,alpha=16,targets=all-linear"
    bottleneck_size: int = 32
    num_virtual_tokens: int = 16
    adapter_name: str = "default"
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    steps: int = 100
    max_time: float | None = None
    lr: float | None = None  # None: the method's default (DEFAULT_LR)
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    precision: str = "fp32"
    eval_interval: int = 50
    eval_batches: int = 20
    checkpoint_interval: int = 50
    keep_last: int = 2
    output_dir: str = "runs/finetune"
    resume: str | None = None  # "auto" (latest in output_dir) or a checkpoint path
    overwrite: bool = False  # replace a finished (or unfinished) run in output_dir instead of refusing
    merge: bool = False  # LoRA: also write the merged full model to output_dir/merged
    device: str | None = None
    seed: int = 0
    progress: bool = True
    task: str = "lm"  # "lm" (next-token loss) or "classification" (--data FILE.jsonl of {text, label})
    text_field: str = "text"  # classification: the JSONL field with the text
    label_field: str = "label"  # classification: the JSONL field with the label (string or integer)
    grad_flow: bool = False  # record per-layer gradient / update norms (grad_flow.json / .png)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError("method", f"unknown {self.method!r}; accepted: {', '.join(METHODS)}")
        for name in ("grad_accum", "steps", "eval_interval", "eval_batches", "checkpoint_interval", "keep_last"):
            check_int(name, getattr(self, name))
        check_int("bottleneck_size", self.bottleneck_size, 1, 1 << 16)
        check_int("num_virtual_tokens", self.num_virtual_tokens, 1, 1 << 16)
        check_int("seq_len", self.seq_len, 1, MAX_SEQ_LEN)
        check_int("batch_size", self.batch_size, 1, MAX_BATCH)
        check_int("warmup_steps", self.warmup_steps, 0)
        check_int("seed", self.seed, 0, MAX_SEED)
        check_float("lr", self.lr, 0, 10, lo_open=True, optional=True)
        check_float("grad_clip", self.grad_clip, 0, lo_open=True)
        check_float("min_lr_ratio", self.min_lr_ratio, 0, 1)
        check_float("weight_decay", self.weight_decay, 0, 10)
        check_float("max_time", self.max_time, 0, lo_open=True, optional=True)
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError("precision", f"unknown {self.precision!r}; accepted: fp32, bf16, fp16")
        if self.task not in TASKS:
            raise ConfigError("task", f"unknown {self.task!r}; accepted: {', '.join(TASKS)}")
        if self.task == "classification":
            if self.data is None or not str(self.data).endswith(".jsonl"):
                raise ConfigError("data", "--task classification needs --data FILE.jsonl (one {text, label} object "
                                  f"per line), got {self.data!r}")
            if self.method not in ("lora", "full"):
                raise ConfigError("method", f"--task classification trains lora or full, not {self.method!r}")
        if self.data is not None and self.package is not None:
            raise ConfigError("package", "give --data or --package, not both")
        if self.merge and self.method != "lora":
            raise ConfigError("merge", f"only LoRA adapters can be merged, not method {self.method!r}")
        check_model_path("base", self.base)
        check_data_path("data", self.data)
        check_device("device", self.device)
        self.adapter_config()  # validates --lora and the adapter settings

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    def adapter_config(self):
        from seekdeep.peft.config import BottleneckConfig, PromptTuningConfig, parse_lora_spec

        if self.method == "lora":
            return parse_lora_spec(self.lora)
        if self.method == "bottleneck":
            return BottleneckConfig(bottleneck_size=self.bottleneck_size)
        if self.method == "prompt":
            return PromptTuningConfig(num_virtual_tokens=self.num_virtual_tokens, prompt_tuning_init="SAMPLE_VOCAB")
        return None


# ----------------------------------------------------------------------------- base and data


def seekdeep_home() -> Path:
    return Path(os.environ.get("SEEKDEEP_HOME") or Path.home() / ".cache" / "seekdeep").expanduser()


def default_base(progress: bool = True, steps: int = DEFAULT_BASE_STEPS) -> Path:
    """``runs/train/final`` when ``seekdeep train`` made it; else a small sdpa model trained once
    on the default corpus into ``$SEEKDEEP_HOME/finetune-base/final`` (a few minutes on a CPU)."""
    trained = Path("runs/train/final")
    if (trained / "config.json").is_file():
        return trained
    out = seekdeep_home() / "finetune-base"
    final = out / "final"
    if (final / "config.json").is_file():
        return final
    from seekdeep.recipes.train import TrainConfig, train

    print(f"no base model given and no {trained}: training a small one into {out} ({steps} steps, once)", file=sys.stderr)
    # an interrupted earlier attempt is continued, not refused (resume="auto" starts fresh when there is none)
    train(TrainConfig(preset="tiny", attention_backend="sdpa", steps=steps, batch_size=8, seq_len=256, lr=3e-3,
                      warmup_steps=30, eval_interval=steps, eval_batches=10, checkpoint_interval=steps, keep_last=1,
                      output_dir=str(out), progress=progress, sample_tokens=16, resume="auto"))
    return final


def default_package() -> str:
    """The largest multi-module package the default corpus split holds out of pre-training."""
    from seekdeep.data import default_corpus

    split = default_corpus()
    sizes: dict[str, int] = {}
    for file in split.heldout_files:
        parts = file.relative_to(split.root).parts
        if len(parts) > 1:
            sizes[parts[0]] = sizes.get(parts[0], 0) + file.stat().st_size
    if not sizes:
        raise ConfigError("package", "the default corpus split holds out no package here; pass --package or --data")
    return max(sizes, key=sizes.__getitem__)


def package_split(package: str, heldout_fraction: float = 0.2) -> tuple[list[str], list[str]]:
    """(train, held-out) texts of a standard-library package: the last ``heldout_fraction`` of
    every module (cut at a line start) is held out, the rest trains. Every module is on both
    sides, so the held-out text measures the package's own code, not a different module."""
    from seekdeep.data import iter_documents, package_files

    train, heldout = [], []
    for text in iter_documents(package_files(package)):
        cut = text.rfind("\n", 0, int(len(text) * (1 - heldout_fraction))) + 1
        if 0 < cut < len(text):
            train.append(text[:cut])
            heldout.append(text[cut:])
        else:  # a one-line module: train on it
            train.append(text)
    if not heldout:
        raise ConfigError("package", f"{package!r} leaves no held-out text; pick a larger package or pass --data")
    return train, heldout


def prepare_finetune_data(cfg: FinetuneConfig, tokenizer) -> tuple[Path, Path, dict[str, Any]]:
    """Train / held-out token files of the fine-tuning data, encoded with the base's tokenizer
    and cached in ``$SEEKDEEP_HOME/cache`` (rebuilt when the data or the tokenizer change)."""
    from seekdeep.data import build_token_file, default_cache_dir, source_fingerprint, tokenizer_fingerprint
    from seekdeep.data.tokens import plan_heldout, split_side  # the split prepare_data applies to user data

    if cfg.data is not None:
        every, fraction = 20, 0.1
        plan = plan_heldout(cfg.data, every, fraction)
        key = ["data", source_fingerprint(cfg.data), every, fraction]
        sides = {side: (lambda side=side: split_side(cfg.data, plan, every, side)) for side in ("train", "heldout")}
        info: dict[str, Any] = {"data": cfg.data}
    else:
        from seekdeep.data import package_files

        package = cfg.package or default_package()
        train_texts, heldout_texts = package_split(package)
        key = ["package", package, source_fingerprint(package_files(package)), 0.2]
        sides = {"train": lambda: iter(train_texts), "heldout": lambda: iter(heldout_texts)}
        info = {"package": package, "modules": len(train_texts), "heldout_rule": "last 20% of every module"}
    fingerprint = hashlib.sha256(json.dumps([*key, tokenizer_fingerprint(tokenizer)]).encode()).hexdigest()[:16]
    folder = default_cache_dir() / f"finetune-{fingerprint}"
    paths = {}
    for side, documents in sides.items():
        paths[side] = folder / f"{side}.bin"
        token_info = build_token_file(documents(), tokenizer, paths[side], source_fingerprint=f"{fingerprint}-{side}")
        if token_info["num_tokens"] < cfg.seq_len:
            raise ConfigError("seq_len", f"{cfg.seq_len} is longer than the {side} side of the data "
                              f"({token_info['num_tokens']} tokens); use a smaller --seq-len or more data")
        info[f"{side}_tokens"] = token_info["num_tokens"]
    return paths["train"], paths["heldout"], info


# ----------------------------------------------------------------------------- the loop


class _AdapterArtifact:
    """What checkpoints save for an adapter run: the adapter alone, in peft's layout."""

    def __init__(self, model, adapter_name: str):
        self.model, self.adapter_name = model, adapter_name

    def save_pretrained(self, directory) -> None:
        self.model.save_adapter(directory, adapter_name=self.adapter_name)


def _freeze_backends(model) -> None:
    """Attention backends keep their inference behaviour (DSA: sparse, no indexer loss) and
    their own parameters (the indexer) stay as pre-trained."""
    for name, module in model.named_modules():
        if name.endswith(".inner"):
            if hasattr(module, "dense_warmup"):
                module.dense_warmup = False
                module.compute_indexer_loss = False
            for param in module.parameters():
                param.requires_grad_(False)


def attach_method(model, cfg: FinetuneConfig) -> None:
    """Add the adapter (every base parameter frozen), or for ``full`` unfreeze the trunk."""
    if cfg.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
    else:
        config = cfg.adapter_config()
        config.base_model_name_or_path = cfg.base
        if cfg.task == "classification":  # the new head trains in full, saved with the adapter (peft's SEQ_CLS)
            config.modules_to_save = [*(config.modules_to_save or []), "score"]
            excluded = config.exclude_modules
            config.exclude_modules = (["score"] if excluded is None else [*excluded, "score"]
                                      if isinstance(excluded, list) else f"(?:{excluded})|score")
        model.add_adapter(cfg.adapter_name, config)
        if cfg.merge or cfg.task == "classification":  # a classifier is published merged
            _check_mergeable(model, cfg.adapter_name)
    _freeze_backends(model)


def _check_mergeable(model, adapter_name: str) -> None:
    """--merge: refuse before training what merge_and_unload would refuse after it."""
    try:
        model._mergeable([adapter_name])
    except ConfigError as exc:
        raise ConfigError("merge", f"{exc}. Drop --merge (the adapter is saved either way) or change the adapter") from None


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Run (or resume) a fine-tuning job; returns a summary dict (also in summary.json)."""
    from seekdeep.auto import AutoModel, AutoTokenizer
    from seekdeep.data import TokenWindows
    from seekdeep.files import write_json_atomic
    from seekdeep.peft.io import copy_into_adapter, read_adapter_weights
    from seekdeep.recipes.train import MetricsLog, plot_losses
    from seekdeep.train import (PrecisionPolicy, load_checkpoint, make_scheduler, param_groups, prepare_run_dir,
                                publish_dir, resume_checkpoint, resumed_config, save_checkpoint)
    from seekdeep.train.loop import StepEnd, optimizer_step

    out = prepare_run_dir(cfg.output_dir, command="finetune", overwrite=cfg.overwrite, resume=cfg.resume)
    ckpt_dir = out / "checkpoints"
    resume_path = resume_checkpoint(cfg.resume, ckpt_dir)
    if resume_path is not None:
        cfg = resumed_config(resume_path, cfg, command="finetune")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    policy = PrecisionPolicy(cfg.precision, device.type)
    base_dir = Path(cfg.base) if cfg.base else default_base(cfg.progress)
    if cfg.base is None:
        cfg = FinetuneConfig(**{**asdict(cfg), "base": str(base_dir)})
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if cfg.task == "classification":  # labelled JSONL, a score head on the base's trunk, held-out accuracy
        from seekdeep.auto import AutoModelForSequenceClassification
        from seekdeep.data.classification import HeldoutAccuracy, load_classification_data

        windows, heldout, data_info = load_classification_data(cfg.data, tokenizer, cfg.seq_len, cfg.batch_size,
                                                               cfg.seed, cfg.text_field, cfg.label_field)
        model = AutoModelForSequenceClassification.from_pretrained(base_dir, device=device, id2label=data_info["labels"])
        evaluate = HeldoutAccuracy()  # same call as the LM evaluation; keeps each accuracy
    else:
        from seekdeep.recipes.train import evaluate

        model = AutoModel.from_pretrained(base_dir, device=device)
        train_path, heldout_path, data_info = prepare_finetune_data(cfg, tokenizer)
        windows = TokenWindows(train_path, cfg.seq_len, cfg.batch_size, seed=cfg.seed)
        heldout = TokenWindows(heldout_path, cfg.seq_len, cfg.batch_size, seed=cfg.seed, shuffle=False)

    loss_before = evaluate(model, heldout, cfg.eval_batches, policy)
    torch.manual_seed(cfg.seed)
    attach_method(model, cfg)
    trainable, total = model.get_nb_trainable_parameters()
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.learning_rate, betas=(0.9, 0.95),
                                  eps=1e-8, fused=device.type == "cuda")
    scheduler = make_scheduler(optimizer, min(cfg.warmup_steps, cfg.steps), cfg.steps, cfg.min_lr_ratio)
    scaler = policy.make_scaler()
    flow = None
    if cfg.grad_flow:
        from seekdeep.explain.gradflow import GradientFlowRecorder

        flow = GradientFlowRecorder(model, optimizer, log_dir=out / "tensorboard")
    artifact = model if cfg.method == "full" else _AdapterArtifact(model, cfg.adapter_name)
    start_step = 0
    if resume_path is not None:
        state = load_checkpoint(resume_path, model if cfg.method == "full" else None, optimizer, scheduler, scaler)
        if cfg.method != "full":
            copy_into_adapter(model, cfg.adapter_name, read_adapter_weights(resume_path), str(resume_path))
        windows.load_state_dict(state.data_state)
        start_step = state.step
        print(f"resumed from {resume_path} at step {start_step}", file=sys.stderr)

    metrics = MetricsLog(out / "metrics.jsonl", start_step if resume_path is not None else None)
    print(f"fine-tuning {base_dir} ({cfg.method}): {trainable:,d} of {total:,d} parameters trainable "
          f"({100 * trainable / total:.3f}%); held-out perplexity before: {math.exp(loss_before):.2f}", file=sys.stderr)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    bar = tqdm(total=cfg.steps, initial=start_step, desc="finetune", disable=not cfg.progress, dynamic_ncols=True)
    step = start_step

    def run_eval(at: int) -> None:
        eval_loss = evaluate(model, heldout, cfg.eval_batches, policy)
        metrics.write({"kind": "eval", "step": at, "eval_loss": eval_loss, "eval_ppl": math.exp(eval_loss)})
        bar.write(f"step {at}: held-out perplexity {math.exp(eval_loss):.2f}")

    end_of_step = StepEnd(steps=cfg.steps, eval_interval=cfg.eval_interval, checkpoint_interval=cfg.checkpoint_interval,
                          max_time=cfg.max_time, say=bar.write)
    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            total_loss = 0.0
            for _ in range(cfg.grad_accum):
                batch = windows.next_batch().to(device)
                with policy.autocast():
                    loss = (model(**batch) if cfg.task == "classification" else model(batch, labels=batch)).loss
                total_loss += float(loss.detach()) / cfg.grad_accum
                scaler.scale(loss / cfg.grad_accum).backward()
            grad_norm, _ = optimizer_step(optimizer, scheduler, scaler, params, cfg.grad_clip)
            step += 1
            dt = time.perf_counter() - t0
            metrics.write({"kind": "train", "step": step, "loss": total_loss, "lr": scheduler.get_last_lr()[0],
                           "grad_norm": grad_norm, "tokens_per_s": cfg.batch_size * cfg.grad_accum * cfg.seq_len / dt})
            bar.update(1)
            bar.set_postfix(loss=f"{total_loss:.3f}")
            if end_of_step(step, total_loss, evaluate=lambda: run_eval(step), checkpoint=lambda: save_checkpoint(
                    ckpt_dir, step, artifact, optimizer, scheduler, scaler, data_state=windows.state_dict(),
                    extra={"config": asdict(cfg)}, keep_last=cfg.keep_last)):
                break
    finally:
        bar.close()
        metrics.close()

    loss_after = evaluate(model, heldout, cfg.eval_batches, policy)
    with open(metrics.path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"kind": "eval", "step": step, "eval_loss": loss_after, "eval_ppl": math.exp(loss_after),
                            "final": True}) + "\n")
    model.eval()
    artefacts: dict[str, str] = {}
    if cfg.method == "full":
        publish_dir(out / "final", lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
        artefacts["model_dir"] = str(out / "final")
    else:
        publish_dir(out / "adapter", lambda tmp: model.save_adapter(tmp, adapter_name=cfg.adapter_name))
        artefacts["adapter_dir"] = str(out / "adapter")
        if cfg.merge or cfg.task == "classification":
            model.merge_and_unload()
            name = "final" if cfg.task == "classification" else "merged"
            publish_dir(out / name, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
            artefacts["model_dir" if cfg.task == "classification" else "merged_dir"] = str(out / name)
    if flow is not None:
        flow.close()
        artefacts.update({f"grad_flow_{kind}": path for kind, path in flow.save(out).items()})
    plot_losses(metrics.path, out / "loss.png", f"seekdeep finetune: {cfg.method}")
    summary = {
        "method": cfg.method, "base": str(base_dir), **data_info, "steps": step, "stopped_early": end_of_step.stopped_early,
        "loss_before": loss_before, "loss_after": loss_after,
        "ppl_before": math.exp(loss_before), "ppl_after": math.exp(loss_after),
        **({"accuracy_before": evaluate.accuracies[0], "accuracy_after": evaluate.accuracies[-1]}
           if cfg.task == "classification" else {}),
        "trainable_parameters": trainable, "total_parameters": total, "trainable_percent": 100 * trainable / total,
        "train_seconds": end_of_step.elapsed(), **artefacts, "loss_curve": str(out / "loss.png"),
        "config": asdict(cfg),
    }
    write_json_atomic(out / "summary.json", summary)
    return summary


# ----------------------------------------------------------------------------- CLI


def cmd_finetune(args: argparse.Namespace) -> int:
    cfg = FinetuneConfig(**{f.name: getattr(args, f.name) for f in fields(FinetuneConfig)})
    s = finetune(cfg)
    where = s.get("data") or f"held-out package {s.get('package')!r}"
    if "accuracy_after" in s:
        print(f"\nheld-out accuracy on {where}: {s['accuracy_before']:.3f} before -> {s['accuracy_after']:.3f} after "
              f"{s['steps']} steps ({s['method']}, {s['train_seconds']:.0f}s)\nsaved: {s['model_dir']}")
        return 0
    print(f"\nheld-out perplexity on {where}: {s['ppl_before']:.2f} before -> {s['ppl_after']:.2f} after "
          f"{s['steps']} steps ({s['method']}, {s['trainable_percent']:.3f}% of parameters trained, {s['train_seconds']:.0f}s)")
    print(f"saved: {s.get('adapter_dir') or s.get('model_dir')}" + (f" and {s['merged_dir']}" if s.get("merged_dir") else ""))
    print(f"loss curve: {s['loss_curve']}")
    return 0


_HELP = {
    "base": "model directory or hub id (default: runs/train/final, else a small model trained once)",
    "data": "text file, folder or .jsonl (text field); default: a standard-library package held out of pre-training",
    "package": "with no --data: the standard-library package (default: the largest one held out, e.g. http)",
    "method": f"one of {', '.join(METHODS)} (default: lora)",
    "lora": "LoRA settings, e.g. r=16,alpha=32,targets=q_proj,v_proj[,dropout=0.05][,rslora][,dora]; "
            "targets=all-linear or targets=re:<regex> work too; per-module ranks / alphas with r.<pattern>=N / "
            "alpha.<pattern>=N; lora_bias gives every adapted layer a bias (on lm_head: a logit offset, "
            "which cannot be merged into a bias-less head)",
    "lr": f"learning rate (default per method: {DEFAULT_LR})",
    "resume": "'auto' (latest checkpoint in --output-dir) or a checkpoint directory",
    "merge": "LoRA: also save the model with the adapter merged in (output-dir/merged)",
    "task": "lm (default: next-token loss) or classification (--data FILE.jsonl with text + label fields; "
            "a score head on the base; held-out accuracy; the classifier is saved to output-dir/final)",
    "grad_flow": "record per-layer gradient and update norms (output-dir/grad_flow.json, grad_flow.png)",
}


def register(subparsers) -> None:
    """Add ``seekdeep finetune`` (see the module docstring)."""
    from seekdeep.cli import add_recipe_command

    add_recipe_command(subparsers, "finetune", "fine-tune a model with LoRA / adapters / prompt tuning (or in full)",
                       FinetuneConfig, "base", _HELP, cmd_finetune)
