"""``seekdeep sft``: supervised instruction fine-tuning on conversations, loss on the assistant
turns only.

Data: JSONL with ``messages`` (OpenAI chat shape) or ``prompt`` / ``completion``, rendered by
the base tokenizer's chat template (seekdeep tokenizers carry ``DEFAULT_CHAT_TEMPLATE``); every
20th conversation is held out for the evaluation loss. With no data: "write the body of this
function" tasks cut from the standard library, training on the default corpus split's
training modules and evaluating on its held-out modules. Batches are padded and grouped by
length, or packed with ``--pack`` (rows of ``--seq-len`` tokens, a block-diagonal causal mask
so no conversation sees another; dense attention backends only). LoRA (merged into ``final/``
at the end) or full fine-tuning;
checkpoints, ``--resume auto`` and the run-directory rule as the other recipes.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from seekdeep.posttrain.config import SFTConfig

SFT_BASE_STEPS = 300


def sft_records(cfg: SFTConfig) -> tuple[list, list, dict[str, Any]]:
    """(train, held-out) lists of (where, messages) and a description of the data."""
    from seekdeep.posttrain.chat import read_jsonl, record_messages

    if cfg.data is None:
        from seekdeep.posttrain.instructions import default_tasks

        train = [(f"{t.module}.{t.qualname}", t.messages()) for t in default_tasks("train", cfg.max_body_lines)]
        heldout = [(f"{t.module}.{t.qualname}", t.messages()) for t in default_tasks("heldout", cfg.max_body_lines)]
        info = {"data": "stdlib function bodies (default corpus split)", "heldout_rule": "held-out modules"}
    else:
        records = [(where, record_messages(record, where)) for where, record in read_jsonl(cfg.data)]
        heldout = records[19::20]
        train = [r for i, r in enumerate(records) if i % 20 != 19]
        info = {"data": cfg.data, "heldout_rule": "every 20th conversation"}
    if cfg.max_examples is not None:
        train = train[:cfg.max_examples]
    return train, heldout, info


def load_base(base: str | None, progress: bool, device):
    """(model, tokenizer, path) of the base: ``base``, else runs/train/final, else the small default."""
    from seekdeep.auto import AutoModel, AutoTokenizer
    from seekdeep.posttrain.policy import ensure_chat_template
    from seekdeep.recipes.finetune import default_base

    path = Path(base) if base else default_base(progress)
    model = AutoModel.from_pretrained(path, device=device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ensure_chat_template(tokenizer)
    return model, tokenizer, path


def sft(cfg: SFTConfig) -> dict[str, Any]:
    """Run (or resume) an SFT job; returns the summary (also in summary.json)."""
    from seekdeep.files import write_json_atomic
    from seekdeep.posttrain.chat import ChatBatches, assistant_loss, eval_batches, render_records
    from seekdeep.posttrain.policy import attach, checkpoint_artifact, make_optimizer, publish_final, restore
    from seekdeep.recipes.train import MetricsLog, plot_losses
    from seekdeep.train import PrecisionPolicy, prepare_run_dir, resume_checkpoint, resumed_config, save_checkpoint
    from seekdeep.train.loop import StepEnd, optimizer_step

    out = prepare_run_dir(cfg.output_dir, command="sft", overwrite=cfg.overwrite, resume=cfg.resume)
    ckpt_dir = out / "checkpoints"
    resume_path = resume_checkpoint(cfg.resume, ckpt_dir)
    if resume_path is not None:
        cfg = resumed_config(resume_path, cfg, command="sft", marker="max_body_lines")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    policy = PrecisionPolicy(cfg.precision, device.type)
    model, tokenizer, base_dir = load_base(cfg.base, cfg.progress, device)
    if cfg.base is None:
        cfg = SFTConfig(**{**asdict(cfg), "base": str(base_dir)})
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_records, heldout_records, data_info = sft_records(cfg)
    train_examples, train_counts = render_records(tokenizer, train_records, cfg.seq_len)
    heldout_examples, heldout_counts = render_records(tokenizer, heldout_records, cfg.seq_len)
    data_info.update({"train": train_counts, "heldout": heldout_counts})
    batches = ChatBatches(train_examples, cfg.batch_size, pad_id, seed=cfg.seed, pack_len=cfg.seq_len if cfg.pack else None)

    def heldout_loss() -> float:
        return assistant_loss(model, eval_batches(heldout_examples, cfg.batch_size, pad_id, cfg.eval_batches), policy)

    loss_before = heldout_loss() if heldout_examples else float("nan")
    torch.manual_seed(cfg.seed)
    attach(model, cfg.method, cfg.lora, cfg.base)
    trainable, total = model.get_nb_trainable_parameters()
    optimizer, scheduler = make_optimizer(model, cfg, device)
    scaler = policy.make_scaler()
    start_step = 0
    if resume_path is not None:
        state = restore(resume_path, model, cfg.method, optimizer, scheduler, scaler)
        batches.load_state_dict(state.data_state)
        start_step = state.step
    artifact = checkpoint_artifact(model, cfg.method)
    metrics = MetricsLog(out / "metrics.jsonl", start_step if resume_path is not None else None)
    print(f"sft {base_dir} ({cfg.method}): {train_counts['examples']} conversations "
          f"({train_counts['dropped_too_long']} longer than {cfg.seq_len} tokens dropped), {trainable:,d} of {total:,d} "
          f"parameters trainable; held-out assistant loss before: {loss_before:.3f}", file=sys.stderr)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    bar = tqdm(total=cfg.steps, initial=start_step, desc="sft", disable=not cfg.progress, dynamic_ncols=True)
    step = start_step

    def run_eval(at: int) -> None:
        eval_loss = heldout_loss()
        metrics.write({"kind": "eval", "step": at, "eval_loss": eval_loss})
        bar.write(f"step {at}: held-out assistant loss {eval_loss:.3f}")

    end_of_step = StepEnd(steps=cfg.steps, eval_interval=cfg.eval_interval, checkpoint_interval=cfg.checkpoint_interval,
                          max_time=cfg.max_time, say=bar.write)
    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            total_loss, tokens = 0.0, 0
            for _ in range(cfg.grad_accum):
                ids, mask, labels, *docs = (t.to(device) for t in batches.next_batch())  # docs: [document_ids] when packed
                with policy.autocast():
                    loss = model(ids, attention_mask=mask, labels=labels, document_ids=docs[0] if docs else None).loss
                total_loss += float(loss.detach()) / cfg.grad_accum
                tokens += int(mask.sum())
                scaler.scale(loss / cfg.grad_accum).backward()
            grad_norm, _ = optimizer_step(optimizer, scheduler, scaler, params, cfg.grad_clip)
            step += 1
            metrics.write({"kind": "train", "step": step, "loss": total_loss, "lr": scheduler.get_last_lr()[0],
                           "grad_norm": grad_norm, "tokens_per_s": tokens / (time.perf_counter() - t0)})
            bar.update(1)
            bar.set_postfix(loss=f"{total_loss:.3f}")
            if end_of_step(step, total_loss, evaluate=(lambda: run_eval(step)) if heldout_examples else None,
                           checkpoint=lambda: save_checkpoint(ckpt_dir, step, artifact, optimizer, scheduler, scaler,
                                                              data_state=batches.state_dict(),
                                                              extra={"config": asdict(cfg)}, keep_last=cfg.keep_last)):
                break
    finally:
        bar.close()
        metrics.close()

    loss_after = heldout_loss() if heldout_examples else float("nan")
    metrics_file = out / "metrics.jsonl"
    with open(metrics_file, "a", encoding="utf-8") as f:
        import json

        f.write(json.dumps({"kind": "eval", "step": step, "eval_loss": loss_after, "final": True}) + "\n")
    model.eval()
    written = publish_final(out, model, tokenizer, cfg.method)
    plot_losses(metrics_file, out / "loss.png", f"seekdeep sft: {cfg.method}")
    summary = {"base": str(base_dir), "method": cfg.method, **data_info, "steps": step, "stopped_early": end_of_step.stopped_early,
               "heldout_loss_before": loss_before, "heldout_loss_after": loss_after,
               "trainable_parameters": trainable, "total_parameters": total,
               "train_seconds": end_of_step.elapsed(), **written, "loss_curve": str(out / "loss.png"),
               "config": asdict(cfg)}
    write_json_atomic(out / "summary.json", summary)
    return summary


def default_sft_model(progress: bool = True, steps: int = SFT_BASE_STEPS) -> Path:
    """``runs/sft/final`` when ``seekdeep sft`` made it; else the default base instruction-tuned
    once on the default data into ``$SEEKDEEP_HOME/sft-default/final``: full fine-tuning (the
    default base is tiny: a LoRA of it learned too little to write a body that parses) on
    bodies of up to 3 lines with prompts of up to 160 tokens."""
    from seekdeep.recipes.finetune import seekdeep_home

    made = Path("runs/sft/final")
    if (made / "config.json").is_file():
        return made
    out = seekdeep_home() / "sft-default"
    if (out / "final" / "config.json").is_file():
        return out / "final"
    print(f"no policy given and no {made}: instruction-tuning the default model into {out} ({steps} steps, once)",
          file=sys.stderr)
    sft(SFTConfig(steps=steps, method="full", lr=1e-3, max_body_lines=3, seq_len=160, output_dir=str(out),
                  progress=progress, resume="auto"))
    return out / "final"


# ----------------------------------------------------------------------------- CLI


def cmd_sft(args: argparse.Namespace) -> int:
    s = sft(SFTConfig(**{f.name: getattr(args, f.name) for f in fields(SFTConfig)}))
    print(f"\nheld-out assistant loss: {s['heldout_loss_before']:.3f} before -> {s['heldout_loss_after']:.3f} after "
          f"{s['steps']} steps ({s['method']}, {s['train']['examples']} conversations, {s['train_seconds']:.0f}s)")
    print(f"saved: {s['model_dir']} (serve it with `seekdeep serve {s['model_dir']}`)")
    return 0


_HELP = {
    "base": "model directory (default: runs/train/final, else a small model trained once)",
    "data": "JSONL of {\"messages\": [...]} or {\"prompt\", \"completion\"} (file or folder); "
            "default: write-the-body tasks from the standard library",
    "method": "lora (merged into final/ at the end) or full",
    "lora": "LoRA settings as for `seekdeep finetune --lora`",
    "seq_len": "longest conversation in tokens; longer ones are dropped and counted (with --pack: the row length)",
    "pack": "pack conversations end to end in rows of --seq-len tokens, none attending to another (dense attention only)",
    "resume": "'auto' (latest checkpoint in --output-dir) or a checkpoint directory",
}


def register(subparsers) -> None:
    """Add ``seekdeep sft`` (see the module docstring)."""
    from seekdeep.cli import add_recipe_command

    add_recipe_command(subparsers, "sft", "instruction-tune a model on chat data (loss on assistant turns only)",
                       SFTConfig, "base", _HELP, cmd_sft)
