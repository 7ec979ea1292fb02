"""Post-training measured: base vs SFT vs SFT+GRPO vs SFT+DPO on held-out modules' prompts.

1. The base is ``seekdeep.recipes.finetune.default_base()`` (runs/train/final, else the small
   model trained once). ``seekdeep sft`` tunes it on the default write-the-body tasks of the
   training modules (LoRA merged; one run, seed 0).
2. From that SFT model, for every seed: a GRPO run (default rewards: parses under the header,
   length budget, sandboxed doctests; the training modules' prompts) and a DPO run (pairs from
   the SFT policy's own best / worst samples), same steps.
3. Every model answers the held-out modules' prompts (the corpus split's held-out side, never
   trained on) with the same sample budget (``--samples`` per prompt, same temperature, same
   sampling seeds): share of completions that parse, doctest pass rate (over the held-out
   prompts that carry doctests; few exist), mean completion length. Base and SFT are scored
   with each seed's sampling seed, so every row has a spread over seeds.
4. KL to the reference at the end of each GRPO / DPO run (from its metrics).
5. Tokens/s of the GRPO sampler (one batched call over prompts x group) vs ``model.generate``
   called one prompt at a time for the same completions.

No TRL anchor: trl 1.16.0 installs here without another torch (datasets 5.2.0, pyarrow 26.0.1,
dill 0.4.1, multiprocess, xxhash), but ``datasets.Dataset.from_list`` fails in this stack
(``PicklingError: Can't pickle <class 'MonthDayNano'>`` while fingerprinting; also with pyarrow
21.0.0), so GRPOTrainer never gets a dataset.

Prints one JSON line per result (anchor: the SFT model for quality, one-at-a-time generate for
speed). Runs in ~15-25 min on 2 shared cores at the defaults.

    .venv/bin/python benchmarks/posttrain.py [--sft-steps 120 --rl-steps 16 --seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent))  # appended: benchmarks/peft.py must not shadow peft
from common import cpu_capability_fields, device_name, emit  # noqa: E402


def _mean_std(values):
    values = [v for v in values if v == v]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sft-steps", type=int, default=120)
    p.add_argument("--rl-steps", type=int, default=16)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval-prompts", type=int, default=32)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the box is shared)")
    p.add_argument("--out-dir", default="runs/bench-posttrain")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import seekdeep
    from seekdeep.posttrain.config import RLConfig, SFTConfig
    from seekdeep.posttrain.rollout import default_prompts, evaluate_policy, prompt_ids, sample
    from seekdeep.recipes.finetune import default_base
    from seekdeep.recipes.rl import rl
    from seekdeep.recipes.sft import sft

    out = Path(args.out_dir)
    device = device_name("cpu")
    cpu = cpu_capability_fields()
    started = time.perf_counter()
    base = default_base(progress=False)
    t0 = time.perf_counter()
    s = sft(SFTConfig(base=str(base), steps=args.sft_steps, output_dir=str(out / "sft"), overwrite=True,
                      progress=False, eval_interval=args.sft_steps, checkpoint_interval=args.sft_steps))
    sft_seconds = time.perf_counter() - t0
    sft_dir = s["model_dir"]
    print(f"sft: held-out assistant loss {s['heldout_loss_before']:.3f} -> {s['heldout_loss_after']:.3f} "
          f"({sft_seconds:.0f}s)", file=sys.stderr)

    rl_common = dict(base=sft_dir, steps=args.rl_steps, max_new_tokens=args.max_new_tokens, progress=False,
                     overwrite=True, checkpoint_interval=args.rl_steps)
    runs: dict[str, list[tuple[int, str, dict]]] = {"grpo": [], "dpo": []}
    for seed in args.seeds:
        for algorithm in ("grpo", "dpo"):
            t0 = time.perf_counter()
            summary = rl(RLConfig(algorithm=algorithm, seed=seed, output_dir=str(out / f"{algorithm}-{seed}"), **rl_common))
            summary["seconds"] = time.perf_counter() - t0
            runs[algorithm].append((seed, summary["model_dir"], summary))
            print(f"{algorithm} seed {seed}: {summary['train_seconds']:.0f}s, events {summary['events']}", file=sys.stderr)

    tok = seekdeep.AutoTokenizer.from_pretrained(sft_dir)
    heldout = default_prompts("heldout", tok, 320, 12)
    doctested = [q for q in heldout if q.task.doctest]
    eval_set = doctested + [q for q in heldout if not q.task.doctest][:max(0, args.eval_prompts - len(doctested))]

    def score(model_dir, seed):
        model = seekdeep.AutoModel.from_pretrained(model_dir)
        return evaluate_policy(model, tok, eval_set, args.samples, args.max_new_tokens, 1.0, seed=1000 + seed)

    results = {"base": [score(base, seed) for seed in args.seeds], "sft": [score(sft_dir, seed) for seed in args.seeds]}
    for algorithm in ("grpo", "dpo"):
        results[f"sft+{algorithm}"] = [score(d, seed) for seed, d, _ in runs[algorithm]]
    sft_parse, _ = _mean_std([r["parse_rate"] for r in results["sft"]])
    sft_doc, _ = _mean_std([r["doctest_pass_rate"] for r in results["sft"]])
    common = dict(seeds=args.seeds, eval_prompts=len(eval_set), doctest_prompts=len(doctested), samples_per_prompt=args.samples,
                  max_new_tokens=args.max_new_tokens, sft_steps=args.sft_steps, rl_steps=args.rl_steps, **cpu)
    for name, rows in results.items():
        for metric, anchor in (("parse_rate", sft_parse), ("doctest_pass_rate", sft_doc), ("mean_length", None)):
            mean, std = _mean_std([r[metric] for r in rows])
            emit(f"posttrain/{name}/{metric}", mean, "fraction" if metric != "mean_length" else "tokens",
                 anchor if metric != "mean_length" else None, "sft" if metric != "mean_length" else "", device,
                 std_over_seeds=std, per_seed=[r[metric] for r in rows], **common)
    for algorithm in ("grpo", "dpo"):
        kls = [summ["final_kl"] for _, _, summ in runs[algorithm]]
        mean, std = _mean_std(kls)
        emit(f"posttrain/{algorithm}/final_kl", mean, "nats/token", None, "", device, std_over_seeds=std, per_seed=kls, **common)
        key = "reward" if algorithm == "grpo" else "accuracy"
        first = [summ[f"{key}_first_quarter"] for _, _, summ in runs[algorithm]]
        last = [summ[f"{key}_last_quarter"] for _, _, summ in runs[algorithm]]
        emit(f"posttrain/{algorithm}/train_{key}_last_quarter", _mean_std(last)[0], key, _mean_std(first)[0],
             f"{key} first quarter", device, per_seed_first=first, per_seed_last=last, **common)
        secs = [summ["train_seconds"] / summ["steps"] for _, _, summ in runs[algorithm]]
        emit(f"posttrain/{algorithm}/seconds_per_step", _mean_std(secs)[0], "s", None, "", device, per_seed=secs, **common)

    # sampler throughput: one batched call (prompts x group) vs one prompt at a time
    model = seekdeep.AutoModel.from_pretrained(sft_dir)
    prompts, group = eval_set[:4], 4
    t0 = time.perf_counter()
    rollout = sample(model, tok, prompts, group, args.max_new_tokens, 1.0, seed=5)
    batched_s = time.perf_counter() - t0
    batched_tokens = float(rollout.lengths.sum())
    single_tokens, t0 = 0, time.perf_counter()
    for i, q in enumerate(prompts):
        ids = torch.tensor([prompt_ids(tok, q)])
        for j in range(group):
            gen = model.generate(ids, do_sample=True, temperature=1.0, max_new_tokens=args.max_new_tokens,
                                 seed=100 * i + j, eos_token_id=tok.eos_token_id)
            single_tokens += gen.shape[1] - ids.shape[1]
    single_s = time.perf_counter() - t0
    emit("posttrain/grpo_sampler_tokens_per_s", batched_tokens / batched_s, "tokens/s", single_tokens / single_s,
         "model.generate one prompt at a time", device, prompts=len(prompts), group_size=group,
         max_new_tokens=args.max_new_tokens, **cpu)
    print(json.dumps({"name": "posttrain/total_seconds", "value": round(time.perf_counter() - started, 1),
                      "sft_seconds": round(sft_seconds, 1), "unit": "s"}), flush=True)


if __name__ == "__main__":
    main()
