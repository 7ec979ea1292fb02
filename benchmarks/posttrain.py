"""Post-training measured: base vs SFT vs SFT+GRPO vs SFT+DPO on held-out modules' prompts.

1. The base is ``seekdeep.recipes.finetune.default_base()`` (runs/train/final, else the small
   model trained once). SFT is the default SFT recipe (``seekdeep.recipes.sft.default_sft_model``:
   full fine-tuning, lr 1e-3, the training modules' write-the-body tasks with bodies of at
   most ``--max-body-lines`` lines and prompts of at most ``--max-prompt-tokens`` tokens), run
   once (seed 0), or ``--sft-dir`` to reuse one.
2. From that SFT model, per seed: a GRPO run (LoRA, the reference = the adapter disabled;
   rewards parse + prefix + length) and a DPO run (pairs from the SFT policy's own best / worst
   samples, drawn within GRPO's sample budget: steps x batch x group), same steps.
3. Every model answers the held-out modules' prompts (the corpus split's held-out side, never
   trained on) with the same sample budget (``--samples`` per prompt, same temperature and
   sampling seeds; base and SFT too, so every row has a spread over seeds): share of
   completions that parse under their header (binary, whatever reward was trained on),
   doctest pass rate over the held-out prompts that carry doctests, mean completion length.
4. KL to the reference at the end of each GRPO / DPO run (from its metrics).
5. Tokens/s of the GRPO sampler (one batched call over prompts x group) vs ``model.generate``
   called one prompt at a time for the same completions.
6. When ``trl`` and ``datasets`` import: TRL's GRPOTrainer on the same SFT model (loaded by
   transformers from the same HF-layout directory), the same LoRA, prompts, reward (the same
   callable), group, batch, steps, learning rate, KL weight and clip: steps/s and the reward
   reached, next to seekdeep's run of the same seed. (trl is not in any extra of the project;
   ``pip install 'torch==2.13.0' trl==1.16.0 datasets==5.2.0 pyarrow==26.0.1`` into the venv.
   Installed with ``pip --target`` outside a ``site-packages`` directory, ``datasets`` fails:
   dill then takes pyarrow for user code and pickles it by value, and its ``MonthDayNano``
   type cannot be pickled.)

Seeds can run in separate processes (``--seeds 1 --raw-out r1.json``) and be merged
(``--from-raw r0.json r1.json r2.json``). Prints one JSON line per result (anchor: the SFT
model for quality, one-at-a-time generate for speed, TRL for the GRPO step).

    .venv/bin/python benchmarks/posttrain.py [--rl-steps 16 --seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
# run as a script, benchmarks/ is sys.path[0] and benchmarks/peft.py would shadow the peft package
# (which TRL imports): only appended
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]
from common import cpu_capability_fields, device_name, emit  # noqa: E402

REWARDS = "parse,prefix,length"


def _mean_std(values):
    values = [v for v in values if v == v]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def rl_config(args, **kw):
    from seekdeep.posttrain.config import RLConfig

    settings = dict(steps=args.rl_steps, max_new_tokens=args.max_new_tokens, length_budget=args.max_new_tokens // 2,
                    max_body_lines=args.max_body_lines, max_prompt_tokens=args.max_prompt_tokens,
                    group_size=args.group_size, batch_size=args.batch_size, lr=args.lr, kl_beta=args.kl_beta,
                    temperature=args.temperature, rewards=REWARDS, progress=False, overwrite=True,
                    checkpoint_interval=args.rl_steps)
    return RLConfig(**{**settings, **kw})


def trl_anchor(args, sft_dir: str, seed: int, out: Path) -> dict | None:
    """TRL's GRPOTrainer on the same model, LoRA, prompts, reward and settings; None without trl."""
    try:
        import datasets
        import trl
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        print(f"no TRL anchor: {exc}", file=sys.stderr)
        return None
    from seekdeep.posttrain.rewards import default_rewards
    from seekdeep.posttrain.rollout import default_prompts

    cfg = rl_config(args, base=sft_dir, seed=seed, output_dir=str(out))
    tok = AutoTokenizer.from_pretrained(sft_dir)
    model = AutoModelForCausalLM.from_pretrained(sft_dir, dtype=torch.float32)
    import seekdeep

    tasks = default_prompts("train", seekdeep.AutoTokenizer.from_pretrained(sft_dir), cfg.max_prompt_tokens,
                            cfg.max_body_lines)
    rewards = default_rewards(cfg.reward_names(), seekdeep.AutoTokenizer.from_pretrained(sft_dir), cfg.length_budget,
                              cfg.doctest_timeout)
    data = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": p.text}], "index": i}
                                       for i, p in enumerate(tasks)])

    def reward(prompts, completions, index, **_):  # the same RewardSet the seekdeep run scores with
        return [rewards.score(tasks[i], c[0]["content"])[0] for i, c in zip(index, completions)]

    reward.__name__ = "parse_prefix_length"
    config = trl.GRPOConfig(output_dir=str(out), per_device_train_batch_size=cfg.batch_size * cfg.group_size,
                            num_generations=cfg.group_size, max_completion_length=cfg.max_new_tokens,
                            learning_rate=cfg.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
                            beta=cfg.kl_beta, epsilon=cfg.clip_eps, temperature=cfg.temperature, top_k=0, top_p=1.0,
                            max_steps=cfg.steps, num_iterations=1, loss_type="grpo", scale_rewards="group",
                            max_grad_norm=cfg.grad_clip, weight_decay=0.0, adam_beta2=0.95, logging_steps=1,
                            save_strategy="no", report_to="none", use_cpu=True, seed=seed, disable_tqdm=True,
                            bf16=False, dataloader_num_workers=0,
                            gradient_checkpointing=False)  # TRL's GRPO default is True; seekdeep's run has none
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=data, processing_class=tok,
                              peft_config=lora)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    logs = [r for r in trainer.state.log_history if "reward" in r]
    quarter = max(1, len(logs) // 4)
    return {"steps": len(logs), "seconds": seconds, "reward_first_quarter": _mean_std([r["reward"] for r in logs[:quarter]])[0],
            "reward_last_quarter": _mean_std([r["reward"] for r in logs[-quarter:]])[0],
            "final_kl": logs[-1].get("kl", float("nan")) if logs else float("nan"), "trl": trl.__version__}


def run_seed(args, seed: int, base: str, sft_dir: str, eval_set, out: Path) -> dict:
    """Everything measured for one seed: the GRPO / DPO runs and every model's held-out scores."""
    import seekdeep
    from seekdeep.posttrain.rollout import evaluate_policy
    from seekdeep.recipes.rl import rl

    tok = seekdeep.AutoTokenizer.from_pretrained(sft_dir)

    def score(model_dir):
        model = seekdeep.AutoModel.from_pretrained(model_dir)
        return evaluate_policy(model, tok, eval_set, args.samples, args.max_new_tokens, args.temperature,
                               seed=1000 + seed)

    result = {"seed": seed, "scores": {"base": score(base), "sft": score(sft_dir)}, "runs": {}}
    for algorithm in ("grpo", "dpo"):
        lr = {"lr": args.dpo_lr} if algorithm == "dpo" else {}
        summary = rl(rl_config(args, base=sft_dir, algorithm=algorithm, seed=seed,
                               output_dir=str(out / f"{algorithm}-{seed}"), **lr))
        result["runs"][algorithm] = {k: summary[k] for k in summary if k != "config"}
        result["scores"][f"sft+{algorithm}"] = score(summary["model_dir"])
        print(f"seed {seed} {algorithm}: {summary['train_seconds']:.0f}s, parse rate "
              f"{result['scores'][f'sft+{algorithm}']['parse_rate']:.3f}", file=sys.stderr)
    if args.trl and seed == args.seeds[0]:
        result["trl"] = trl_anchor(args, sft_dir, seed, out / f"trl-{seed}")
    return result


def sampler_speed(args, sft_dir: str, eval_set) -> dict:
    import seekdeep
    from seekdeep.posttrain.rollout import prompt_ids, sample

    tok = seekdeep.AutoTokenizer.from_pretrained(sft_dir)
    model = seekdeep.AutoModel.from_pretrained(sft_dir)
    prompts, group = eval_set[:4], args.group_size
    t0 = time.perf_counter()
    rollout = sample(model, tok, prompts, group, args.max_new_tokens, args.temperature, seed=5)
    batched_s = time.perf_counter() - t0
    single_tokens, t0 = 0, time.perf_counter()
    for i, q in enumerate(prompts):
        ids = torch.tensor([prompt_ids(tok, q)])
        for j in range(group):
            gen = model.generate(ids, do_sample=True, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                                 seed=100 * i + j, eos_token_id=tok.eos_token_id)
            single_tokens += gen.shape[1] - ids.shape[1]
    return {"batched": float(rollout.lengths.sum()) / batched_s, "single": single_tokens / (time.perf_counter() - t0),
            "prompts": len(prompts), "group_size": group}


def report(args, results: list[dict], speed: dict | None, meta: dict) -> None:
    device = device_name("cpu")
    cpu = cpu_capability_fields()
    seeds = [r["seed"] for r in results]
    common = dict(seeds=seeds, **meta, samples_per_prompt=args.samples, max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, rl_steps=args.rl_steps, group_size=args.group_size,
                  batch_size=args.batch_size, lr=args.lr, dpo_lr=args.dpo_lr, kl_beta=args.kl_beta, rewards=REWARDS,
                  **cpu)
    rows = {name: [r["scores"][name] for r in results] for name in results[0]["scores"]}
    sft_parse = _mean_std([s["parse_rate"] for s in rows["sft"]])[0]
    sft_doc = _mean_std([s["doctest_pass_rate"] for s in rows["sft"]])[0]
    for name, scores in rows.items():
        for metric, anchor in (("parse_rate", sft_parse), ("doctest_pass_rate", sft_doc), ("mean_length", None)):
            values = [s[metric] for s in scores]
            mean, std = _mean_std(values)
            emit(f"posttrain/{name}/{metric}", mean, "tokens" if metric == "mean_length" else "fraction", anchor,
                 "" if anchor is None else "sft", device, std_over_seeds=std, per_seed=values, **common)
    for algorithm in ("grpo", "dpo"):
        runs = [r["runs"][algorithm] for r in results]
        kls = [s["final_kl"] for s in runs]
        emit(f"posttrain/{algorithm}/final_kl", _mean_std(kls)[0], "nats/token", None, "", device,
             std_over_seeds=_mean_std(kls)[1], per_seed=kls, **common)
        key = "reward" if algorithm == "grpo" else "accuracy"
        first, last = [s[f"{key}_first_quarter"] for s in runs], [s[f"{key}_last_quarter"] for s in runs]
        emit(f"posttrain/{algorithm}/train_{key}_last_quarter", _mean_std(last)[0], key, _mean_std(first)[0],
             f"{key} first quarter", device, per_seed_first=first, per_seed_last=last, **common)
        secs = [s["train_seconds"] / s["steps"] for s in runs]
        emit(f"posttrain/{algorithm}/seconds_per_step", _mean_std(secs)[0], "s", None, "", device, per_seed=secs,
             **({"pairs": [s["pairs"] for s in runs]} if algorithm == "dpo" else {}), **common)
    margin = _mean_std([s["parse_rate"] for s in rows["sft+grpo"]])[0] - sft_parse
    spread = max(_mean_std([s["parse_rate"] for s in rows[n]])[1] for n in ("sft", "sft+grpo"))
    emit("posttrain/grpo_parse_rate_gain_over_sft", margin, "fraction", spread, "largest seed std (sft, sft+grpo)",
         device, goal_met=bool(margin > spread), **common)
    for r in results:
        if r.get("trl"):
            ours, theirs = r.get("trl_ours") or r["runs"]["grpo"], r["trl"]
            emit("posttrain/grpo_steps_per_s", ours["steps"] / ours["train_seconds"], "steps/s",
                 theirs["steps"] / theirs["seconds"], f"trl {theirs['trl']} GRPOTrainer", device, seed=r["seed"],
                 **common)
            emit("posttrain/grpo_train_reward_last_quarter", ours["reward_last_quarter"], "reward",
                 theirs["reward_last_quarter"], f"trl {theirs['trl']} GRPOTrainer", device, seed=r["seed"],
                 first_quarter=ours["reward_first_quarter"], trl_first_quarter=theirs["reward_first_quarter"],
                 final_kl=ours["final_kl"], trl_final_kl=theirs["final_kl"], **common)
    if speed:
        emit("posttrain/grpo_sampler_tokens_per_s", speed["batched"], "tokens/s", speed["single"],
             "model.generate one prompt at a time", device, prompts=speed["prompts"], group_size=speed["group_size"],
             max_new_tokens=args.max_new_tokens, **cpu)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sft-dir", help="reuse this SFT model (default: train it with the default SFT recipe)")
    p.add_argument("--sft-steps", type=int, default=300)
    p.add_argument("--rl-steps", type=int, default=16)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--samples", type=int, default=4, help="completions per held-out prompt")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--max-body-lines", type=int, default=3)
    p.add_argument("--max-prompt-tokens", type=int, default=160)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3, help="GRPO's learning rate (LoRA)")
    p.add_argument("--dpo-lr", type=float, default=2e-4, help="DPO's (1e-3 ran its KL to 0.5-2 nats/token in 16 steps)")
    p.add_argument("--kl-beta", type=float, default=0.3)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--no-trl", dest="trl", action="store_false", help="skip the TRL anchor even when trl imports")
    p.add_argument("--no-speed", dest="speed", action="store_false")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the box is shared)")
    p.add_argument("--out-dir", default="runs/bench-posttrain")
    p.add_argument("--raw-out", help="write this process's raw results here (to merge with --from-raw)")
    p.add_argument("--from-raw", nargs="+", help="only report: merge raw result files of earlier runs")
    p.add_argument("--trl-only", action="store_true", help="only the TRL anchor for --seeds (merge with --from-raw)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    if args.from_raw:
        raws = [json.loads(Path(f).read_text()) for f in args.from_raw]
        results = [r for raw in raws for r in raw.get("results", [])]
        for raw in raws:  # --trl-only files: their anchor replaces the seed's
            for entry in raw.get("trl_only", []):
                for r in results:
                    if r["seed"] == entry["seed"]:
                        r["trl"], r["trl_ours"] = entry["trl"], entry["ours"]
        speed = next((raw["speed"] for raw in raws if raw.get("speed")), None)
        args.seeds = [r["seed"] for r in results]
        report(args, results, speed, next(raw["meta"] for raw in raws if "results" in raw))
        return

    import seekdeep
    from seekdeep.posttrain.config import SFTConfig
    from seekdeep.posttrain.rollout import default_prompts
    from seekdeep.recipes.finetune import default_base
    from seekdeep.recipes.sft import sft

    out = Path(args.out_dir)
    started = time.perf_counter()
    base = str(default_base(progress=False))
    sft_dir = args.sft_dir
    if sft_dir is None:  # the recipe of default_sft_model, into the benchmark's own directory
        s = sft(SFTConfig(base=base, steps=args.sft_steps, method="full", lr=1e-3, max_body_lines=args.max_body_lines,
                          seq_len=args.max_prompt_tokens, output_dir=str(out / "sft"), overwrite=True, progress=False,
                          checkpoint_interval=args.sft_steps))
        sft_dir = s["model_dir"]
        print(f"sft: held-out assistant loss {s['heldout_loss_before']:.3f} -> {s['heldout_loss_after']:.3f}",
              file=sys.stderr)
    tok = seekdeep.AutoTokenizer.from_pretrained(sft_dir)
    heldout = default_prompts("heldout", tok, args.max_prompt_tokens, args.max_body_lines)
    doctested = [q for q in default_prompts("heldout", tok, 320, 12) if q.task.doctest]
    eval_set = heldout + [q for q in doctested if q not in heldout]
    meta = {"eval_prompts": len(eval_set), "doctest_prompts": len([q for q in eval_set if q.task.doctest]),
            "max_body_lines": args.max_body_lines, "sft_dir": sft_dir, "base": base}
    if args.trl_only:
        from seekdeep.recipes.rl import rl

        anchors = []
        for seed in args.seeds:  # seekdeep's GRPO and TRL's back to back in one process: same load, same settings
            ours = rl(rl_config(args, base=sft_dir, seed=seed, output_dir=str(out / f"grpo-anchor-{seed}")))
            anchors.append({"seed": seed, "ours": {k: v for k, v in ours.items() if k != "config"},
                            "trl": trl_anchor(args, sft_dir, seed, out / f"trl-{seed}")})
        Path(args.raw_out or out / "trl.json").write_text(json.dumps({"trl_only": anchors}))
        print(json.dumps(anchors))
        return
    results = [run_seed(args, seed, base, sft_dir, eval_set, out) for seed in args.seeds]
    speed = sampler_speed(args, sft_dir, eval_set) if args.speed else None
    meta["seconds"] = round(time.perf_counter() - started, 1)
    if args.raw_out:
        Path(args.raw_out).write_text(json.dumps({"results": results, "speed": speed, "meta": meta}))
    report(args, results, speed, meta)


if __name__ == "__main__":
    main()
