"""``seekdeep rl``: reinforcement learning with verifiable rewards (GRPO), or DPO from preferences.

GRPO (``--algorithm grpo``, the default): every step samples ``--group-size`` completions of
``--batch-size`` prompts with the KV-cached generator (one batched call), scores them with the
reward functions (parses under its header, length budget, sandboxed doctests), normalises the
rewards within each prompt's group into advantages and minimises the clipped policy-ratio
objective with a KL penalty to the reference. The policy is a LoRA adapter on the starting
model and the reference is that model with the adapter disabled, so no second model is held in
memory (``--method full`` keeps a frozen copy instead). DPO (``--algorithm dpo``) trains on
``prompt`` / ``chosen`` / ``rejected`` pairs against the same reference; with no data the pairs
are the starting policy's own best and worst sample of each prompt's group.

With no arguments: a short GRPO on the SFT'd default model (``runs/sft/final``, else the
default base instruction-tuned once) over the training side's function tasks; progress shows
mean reward, KL and completion length per step; ``rewards.png`` and ``final/`` (the LoRA merged
in, the Hugging Face layout ``seekdeep serve`` loads) are written, summary.json last.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from seekdeep.errors import DataError
from seekdeep.posttrain.config import RLConfig


def _seed(cfg: RLConfig, step: int, what: int = 0) -> int:
    return (cfg.seed * 1_000_003 + step * 101 + what) % (2**62)


def _pick(items: list, count: int, cfg: RLConfig, step: int) -> list:
    """The step's prompts / pairs: a deterministic function of (seed, step), so a resumed run
    sees what the uninterrupted one saw."""
    rng = random.Random(_seed(cfg, step, 7))
    return rng.sample(items, min(count, len(items)))


def _sequence_logprobs(model, ids, attention, completion_mask, prompt_width):
    from seekdeep.posttrain.losses import token_logprobs

    # token t+1's log-prob sits at t: the completion's tokens start at prompt_width - 1
    return token_logprobs(model, ids, attention)[:, prompt_width - 1:] * completion_mask  # (B, C)


def _pairs(cfg: RLConfig, model, tokenizer, prompts, rewards) -> list[dict[str, str]]:
    """DPO pairs: the data's, or for each default prompt the best and worst of a sampled group
    (when their rewards differ), sampled from the starting policy before training. The sampling
    budget is GRPO's for the same run: at most ``steps`` rounds of ``batch_size`` prompts x
    ``group_size`` completions (fewer when ``dpo_pairs`` pairs are found sooner)."""
    from seekdeep.posttrain.chat import read_jsonl
    from seekdeep.posttrain.rollout import sample

    if cfg.data is not None:
        pairs = []
        for where, record in read_jsonl(cfg.data):
            if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("prompt", "chosen", "rejected")):
                raise DataError(where, "expected an object with string 'prompt', 'chosen' and 'rejected'")
            pairs.append({"prompt": record["prompt"], "chosen": record["chosen"], "rejected": record["rejected"]})
        return pairs
    pairs, round_ = [], 0
    pool = list(prompts)
    while len(pairs) < cfg.dpo_pairs and round_ < cfg.steps:
        chunk = _pick(pool, cfg.batch_size, cfg, -1 - round_)
        rollout = sample(model, tokenizer, chunk, cfg.group_size, cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                         seed=_seed(cfg, -1 - round_))
        for j, prompt in enumerate(chunk):
            group = rollout.texts[j * cfg.group_size:(j + 1) * cfg.group_size]
            scored = [(rewards.score(prompt, text)[0], text) for text in group]
            scored = [(s, t) for s, t in scored if s is not None]
            if len(scored) >= 2:
                best, worst = max(scored, key=lambda x: x[0]), min(scored, key=lambda x: x[0])
                if best[0] > worst[0]:
                    pairs.append({"prompt": prompt.text, "chosen": best[1], "rejected": worst[1],
                                  "margin": best[0] - worst[0]})
        round_ += 1
    if not pairs:
        raise DataError("dpo_pairs", "the starting policy's samples all scored the same: no preference pairs to learn from")
    return pairs[:cfg.dpo_pairs]


def _pair_batch(tokenizer, pairs: list[dict[str, str]], device):
    """(ids, attention, completion_mask, prompt_width) of chosen rows then rejected rows."""
    from seekdeep.posttrain.rollout import left_pad

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p["prompt"]}], add_generation_prompt=True)
               for p in pairs]
    completions = [tokenizer.encode(p[side], add_special_tokens=False) + [eos] for side in ("chosen", "rejected")
                   for p in pairs]
    ids, mask = left_pad(prompts + prompts, pad)
    width = max(len(c) for c in completions)
    comp = torch.full((len(completions), width), pad, dtype=torch.long)
    cmask = torch.zeros_like(comp)
    for i, c in enumerate(completions):
        comp[i, :len(c)] = torch.tensor(c)
        cmask[i, :len(c)] = 1
    seq = torch.cat([ids, comp], 1).to(device)
    return seq, torch.cat([mask, cmask], 1).to(device), cmask.to(device), ids.shape[1]


def plot_rewards(metrics_path: Path, out_png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    train = [r for r in records if r.get("kind") == "train"]
    fig, ax = plt.subplots(figsize=(7, 4))
    key = "reward" if train and "reward" in train[0] else "accuracy"
    ax.plot([r["step"] for r in train], [r[key] for r in train], label=f"mean {key}")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in train], [r["kl"] for r in train], color="tab:red", linewidth=1, label="KL to reference")
    ax2.set_ylabel("KL (nats / token)")
    fig.legend(loc="upper left")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def rl(cfg: RLConfig, extra_rewards: dict[str, tuple[Any, float]] | None = None) -> dict[str, Any]:
    """Run (or resume) a GRPO / DPO job; returns the summary (also in summary.json).

    ``extra_rewards``: name -> (callable(prompt, completion) -> float | None, weight), added to
    the embedded rewards named by ``cfg.rewards``."""
    from seekdeep.files import write_json_atomic
    from seekdeep.posttrain.losses import dpo_loss, group_advantages, grpo_loss
    from seekdeep.posttrain.policy import (attach, checkpoint_artifact, frozen_reference, make_optimizer, publish_final,
                                           restore)
    from seekdeep.posttrain.rewards import default_rewards
    from seekdeep.posttrain.rollout import default_prompts, read_prompts, sample, write_samples
    from seekdeep.recipes.sft import default_sft_model, load_base
    from seekdeep.recipes.train import MetricsLog
    from seekdeep.train import PrecisionPolicy, prepare_run_dir, resume_checkpoint, resumed_config, save_checkpoint
    from seekdeep.train.loop import StepEnd, optimizer_step

    out = prepare_run_dir(cfg.output_dir, command="rl", overwrite=cfg.overwrite, resume=cfg.resume)
    ckpt_dir = out / "checkpoints"
    resume_path = resume_checkpoint(cfg.resume, ckpt_dir)
    if resume_path is not None:
        cfg = resumed_config(resume_path, cfg, command="rl", marker="group_size")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    policy = PrecisionPolicy(cfg.precision, device.type)
    base = cfg.base or str(default_sft_model(cfg.progress))
    model, tokenizer, base_dir = load_base(base, cfg.progress, device)
    if cfg.base is None:
        cfg = RLConfig(**{**asdict(cfg), "base": str(base_dir)})
    rewards = default_rewards(cfg.reward_names(), tokenizer, cfg.length_budget, cfg.doctest_timeout)
    rewards.rewards.update(extra_rewards or {})
    prompts: list = []
    if cfg.algorithm == "grpo" and cfg.data is not None:
        prompts = read_prompts(cfg.data, tokenizer, cfg.max_prompt_tokens)
    elif cfg.data is None:
        prompts = default_prompts("train", tokenizer, cfg.max_prompt_tokens, cfg.max_body_lines)
    pairs = _pairs(cfg, model, tokenizer, prompts, rewards) if cfg.algorithm == "dpo" else []
    if pairs and cfg.data is None:
        (out / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))

    torch.manual_seed(cfg.seed)
    reference = frozen_reference(model, cfg.method)
    attach(model, cfg.method, cfg.lora, cfg.base)
    trainable, total = model.get_nb_trainable_parameters()
    optimizer, scheduler = make_optimizer(model, cfg, device)
    scaler = policy.make_scaler()
    start_step = 0
    if resume_path is not None:
        start_step = restore(resume_path, model, cfg.method, optimizer, scheduler, scaler).step

    def ref_logprobs(ids, attention, cmask, width):
        with torch.no_grad(), policy.autocast():
            if reference is not None:
                return _sequence_logprobs(reference, ids, attention, cmask, width)
            with model.disable_adapters():
                return _sequence_logprobs(model, ids, attention, cmask, width)

    artifact = checkpoint_artifact(model, cfg.method)
    metrics = MetricsLog(out / "metrics.jsonl", start_step if resume_path is not None else None)
    samples = MetricsLog(out / "samples.jsonl", start_step if resume_path is not None else None, use_tensorboard=False)
    what = f"{len(prompts)} prompts" if cfg.algorithm == "grpo" else f"{len(pairs)} preference pairs"
    print(f"{cfg.algorithm} on {base_dir} ({cfg.method}, {what}): {trainable:,d} of {total:,d} parameters trainable",
          file=sys.stderr)
    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(total=cfg.steps, initial=start_step, desc=cfg.algorithm, disable=not cfg.progress, dynamic_ncols=True)
    step, skipped = start_step, 0
    end_of_step = StepEnd(steps=cfg.steps, checkpoint_interval=cfg.checkpoint_interval, max_time=cfg.max_time,
                          say=bar.write, hint="lower --lr")
    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            record: dict[str, Any] = {"kind": "train", "step": step + 1}
            if cfg.algorithm == "grpo":
                chunk = _pick(prompts, cfg.batch_size, cfg, step)
                rollout = sample(model, tokenizer, chunk, cfg.group_size, cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                                 seed=_seed(cfg, step))
                sample_s = time.perf_counter() - t0
                scores = [rewards.score(chunk[i // cfg.group_size], text) for i, text in enumerate(rollout.texts)]
                values = torch.tensor([s if s is not None else float("nan") for s, _ in scores])
                skipped += int(torch.isnan(values).sum())
                adv = group_advantages(values, cfg.group_size)
                ids, attention = rollout.sequences, rollout.attention_mask
                cmask = rollout.completion_mask * (~torch.isnan(values)).long().to(ids.device)[:, None]
                width = rollout.prompt_width
                ref_lp = ref_logprobs(ids, attention, cmask, width)
                model.train()
                with torch.no_grad(), policy.autocast():
                    old_lp = _sequence_logprobs(model, ids, attention, cmask, width)
                rows = torch.arange(ids.shape[0]).chunk(cfg.grad_accum)
                for _ in range(cfg.ppo_epochs):
                    loss_total, kl_total, clip_total = 0.0, 0.0, 0.0
                    for part in rows:
                        with policy.autocast():
                            lp = _sequence_logprobs(model, ids[part], attention[part], cmask[part], width)
                            loss, stats = grpo_loss(lp, old_lp[part], ref_lp[part], adv[part].to(lp.device), cmask[part],
                                                    cfg.clip_eps, cfg.kl_beta)
                        scaler.scale(loss / len(rows)).backward()
                        loss_total += float(loss.detach()) / len(rows)
                        kl_total += stats["kl"] / len(rows)
                        clip_total += stats["clip_fraction"] / len(rows)
                    grad_norm, _ = optimizer_step(optimizer, None, scaler, params, cfg.grad_clip)
                valid = values[~torch.isnan(values)]
                parts = {name: [v[name] for _, v in scores if name in v] for name in rewards.rewards}
                record.update({"reward": float(valid.mean()) if valid.numel() else float("nan"),
                               "reward_std": float(valid.std()) if valid.numel() > 1 else 0.0,
                               **{f"reward_{k}": sum(v) / len(v) for k, v in parts.items() if v},
                               "kl": kl_total, "clip_fraction": clip_total,
                               "length": float(rollout.lengths.float().mean()), "loss": loss_total,
                               "skipped": int(torch.isnan(values).sum()), "sample_seconds": sample_s,
                               "sample_tokens_per_s": float(rollout.lengths.sum()) / sample_s})
                write_samples(samples, step + 1, chunk, rollout, values.tolist())
                postfix = {"reward": f"{record['reward']:.3f}", "kl": f"{kl_total:.4f}", "len": f"{record['length']:.1f}"}
            else:
                batch = _pick(pairs, cfg.batch_size, cfg, step)
                ids, attention, cmask, width = _pair_batch(tokenizer, batch, device)
                ref_lp = ref_logprobs(ids, attention, cmask, width).sum(1)
                model.train()
                with policy.autocast():
                    lp = _sequence_logprobs(model, ids, attention, cmask, width)
                    seq_lp = lp.sum(1)
                    n = len(batch)
                    loss, stats = dpo_loss(seq_lp[:n], seq_lp[n:], ref_lp[:n], ref_lp[n:], cfg.dpo_beta)
                scaler.scale(loss).backward()
                grad_norm, _ = optimizer_step(optimizer, None, scaler, params, cfg.grad_clip)
                with torch.no_grad():  # per-token KL estimate to the reference on the pairs' tokens
                    d = (ref_lp - seq_lp.detach()) / cmask.sum(1).clamp(min=1)
                    kl = float((torch.exp(d) - d - 1).mean())
                record.update({"loss": float(loss.detach()), **stats, "kl": kl, "length": float(cmask.sum(1).float().mean())})
                postfix = {"loss": f"{record['loss']:.3f}", "acc": f"{stats['accuracy']:.2f}", "kl": f"{kl:.4f}"}
            scheduler.step()
            step += 1
            record.update({"lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                           "seconds": time.perf_counter() - t0})
            metrics.write(record)
            bar.update(1)
            bar.set_postfix(postfix)
            if end_of_step(step, record["loss"], checkpoint=lambda: save_checkpoint(
                    ckpt_dir, step, artifact, optimizer, scheduler, scaler, data_state={"step": step},
                    extra={"config": asdict(cfg)}, keep_last=cfg.keep_last)):
                break
    finally:
        bar.close()
        metrics.close()
        samples.close()

    model.eval()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    train = [r for r in records if r.get("kind") == "train"]
    plot_rewards(out / "metrics.jsonl", out / "rewards.png", f"seekdeep rl: {cfg.algorithm} ({cfg.method})")
    written = publish_final(out, model, tokenizer, cfg.method)
    head, tail = train[:max(1, len(train) // 4)], train[-max(1, len(train) // 4):]
    key = "reward" if cfg.algorithm == "grpo" else "accuracy"
    summary = {"algorithm": cfg.algorithm, "base": str(base_dir), "method": cfg.method, "steps": step,
               "stopped_early": end_of_step.stopped_early,
               f"{key}_first_quarter": sum(r[key] for r in head) / len(head) if train else float("nan"),
               f"{key}_last_quarter": sum(r[key] for r in tail) / len(tail) if train else float("nan"),
               "final_kl": train[-1]["kl"] if train else float("nan"),
               "events": rewards.all_events(), "trainable_parameters": trainable, "total_parameters": total,
               "prompts": len(prompts) if cfg.algorithm == "grpo" else None,
               "pairs": len(pairs) if cfg.algorithm == "dpo" else None,
               "train_seconds": end_of_step.elapsed(), **written, "rewards_plot": str(out / "rewards.png"),
               "config": asdict(cfg)}
    write_json_atomic(out / "summary.json", summary)
    return summary


# ----------------------------------------------------------------------------- CLI


def cmd_rl(args: argparse.Namespace) -> int:
    s = rl(RLConfig(**{f.name: getattr(args, f.name) for f in fields(RLConfig)}))
    key = "reward" if s["algorithm"] == "grpo" else "accuracy"
    print(f"\n{s['algorithm']}: mean {key} {s[f'{key}_first_quarter']:.3f} (first quarter of steps) -> "
          f"{s[f'{key}_last_quarter']:.3f} (last quarter), KL to the reference {s['final_kl']:.4f}, {s['steps']} steps, "
          f"{s['train_seconds']:.0f}s; events: {s['events'] or 'none'}")
    print(f"saved: {s['model_dir']}; rewards plot: {s['rewards_plot']}")
    return 0


_HELP = {
    "base": "the starting policy, a model directory (default: runs/sft/final, else the SFT'd default model)",
    "algorithm": "grpo (sample, reward, group-relative advantages) or dpo (preference pairs)",
    "data": "grpo: JSONL of {\"prompt\"[, \"header\", \"module\"]}; dpo: JSONL of {\"prompt\", \"chosen\", \"rejected\"}; "
            "default: the standard library's function tasks (dpo: pairs from the policy's own samples)",
    "method": "lora (the reference is the model with the adapter disabled) or full (a frozen copy)",
    "lora": "LoRA settings as for `seekdeep finetune --lora`",
    "batch_size": "grpo: prompts per step; dpo: pairs per step",
    "group_size": "grpo: completions sampled per prompt (>= 2)",
    "kl_beta": "weight of the KL penalty to the reference (0: none)",
    "rewards": "comma-separated embedded rewards: parse, length, doctest",
    "length_budget": "completion tokens before the length reward falls off (to 0 at twice this)",
    "resume": "'auto' (latest checkpoint in --output-dir) or a checkpoint directory",
}


def register(subparsers) -> None:
    """Add ``seekdeep rl`` (see the module docstring)."""
    from seekdeep.cli import add_recipe_command

    add_recipe_command(subparsers, "rl", "GRPO with verifiable rewards, or DPO from preference pairs",
                       RLConfig, "base", _HELP, cmd_rl)
