"""Long-context retrieval: dynamic sparse attention vs dense on associative recall.

Trains the `seekdeep train` tiny llama from scratch on :class:`seekdeep.data.synthetic.CopyRecall`
(a source of ``--span`` distinct tokens, later its copy: each copy token's successor must be
recalled from the source, ``span`` to ``seq_len - span`` slots back) once per variant, same
steps, data, seed and optimiser, and reports the accuracy on the copy of held-out samples
(greedy argmax). The sequence is several times the sparse key budget (``--topk``) and every
answer lies beyond any local window: dsa only gets it right when its indexer selects the source. dsa variants follow the recipe's phases (dense, indexer warm-up,
sparse; see :mod:`seekdeep.recipes.train`) and are evaluated sparse.

Variants: ``sdpa`` (dense, the anchor), ``dsa`` (token-level top-k), ``dsa-block`` (block mode,
``--block-size``), ``gated``. One line per variant; sparse ones carry the dense accuracy as anchor.

Usage: python benchmarks/retrieval.py [--variants sdpa,dsa,dsa-block] [--seq-len 512] [--topk 64]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, emit  # noqa: E402

from seekdeep.data.synthetic import IGNORE_INDEX, CopyRecall  # noqa: E402
from seekdeep.recipes.train import TrainConfig, _dsa_options, apply_phase  # noqa: E402

VARIANTS = ("sdpa", "dsa", "dsa-block", "gated")
HELDOUT_SEED = 1_000_000  # training batches use seeds 0..steps-1
NOT_SETTINGS = {"variants", "out", "reuse", "log_interval"}  # flags that do not change a variant's result
DSA_SETTINGS = {"topk", "block_size", "local_window", "dense_fraction", "indexer_warmup_steps", "indexer_loss_weight"}


def attention_setup(variant: str, args) -> tuple[str, dict]:
    if variant == "sdpa" or variant == "gated":
        return variant, {}
    # The recipe's mapping of topk / block_size / local_window to backend options.
    block_size = args.block_size if variant == "dsa-block" else 1
    distance_bias = args.distance_bias if block_size == 1 else None
    return "dsa", _dsa_options(TrainConfig(topk=args.topk, block_size=block_size, local_window=args.local_window,
                                           seq_len=args.seq_len, distance_bias=distance_bias))


def build_model(task: CopyRecall, backend: str, options: dict, seed: int):
    from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_name("tiny", vocab_size=task.vocab_size, max_position_embeddings=max(1024, task.seq_len),
                                   bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=True,
                                   attention_backend=backend, attention_options=options)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.init_weights()
    return model


@torch.no_grad()
def accuracy(model, task: CopyRecall, samples: int, batch_size: int) -> float:
    """Share of the labelled copy tokens whose greedy prediction is right, on held-out samples."""
    model.eval()
    hits = total = 0
    for i in range(0, samples, batch_size):
        ids, labels, _, _ = task.sample(min(batch_size, samples - i), seed=HELDOUT_SEED + i)
        predicted = model(ids).logits[:, :-1].argmax(-1)  # (B, T-1): the token after each position
        target = labels[:, 1:]
        asked = target != IGNORE_INDEX
        hits += int(((predicted == target) & asked).sum())
        total += int(asked.sum())
    model.train()
    return hits / total


def train_variant(variant: str, task: CopyRecall, args) -> dict:
    from seekdeep.train import make_scheduler, param_groups

    backend, options = attention_setup(variant, args)
    model = build_model(task, backend, options, args.seed)
    # The recipe's phase schedule (dense -> indexer warm-up -> sparse) for dsa; always dense otherwise.
    schedule = TrainConfig(attention_backend=backend, steps=args.steps, dense_fraction=args.dense_fraction,
                           indexer_warmup_steps=args.indexer_warmup_steps)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=args.lr, betas=(0.9, 0.95))
    scheduler = make_scheduler(optimizer, min(args.warmup_steps, args.steps), args.steps, 0.1)
    started = time.perf_counter()
    log = []
    for step in range(args.steps):
        apply_phase(model, schedule.phase(step))
        ids, labels, _, _ = task.sample(args.batch_size, seed=args.seed * 7919 + step)
        output = model(ids, labels=labels)
        loss = output.loss
        if output.aux_loss is not None:
            loss = loss + args.indexer_loss_weight * output.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if (step + 1) % args.log_interval == 0:
            record = {"step": step + 1, "phase": schedule.phase(step), "loss": round(output.loss.item(), 4),
                      "seconds": round(time.perf_counter() - started, 1)}
            log.append(record)
            print(json.dumps({"variant": variant, **record}), file=sys.stderr, flush=True)
    apply_phase(model, schedule.phase(args.steps))
    train_seconds = time.perf_counter() - started
    acc = accuracy(model, task, args.eval_samples, args.batch_size)
    return {"variant": variant, "accuracy": acc, "train_seconds": train_seconds,
            "attention_options": options, "log": log}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="sdpa,dsa,dsa-block")
    parser.add_argument("--seq-len", type=int, default=CopyRecall.seq_len)
    parser.add_argument("--span", type=int, default=CopyRecall.span, help="source length: the least recall distance")
    parser.add_argument("--num-tokens", type=int, default=CopyRecall.num_tokens)
    parser.add_argument("--topk", type=int, default=32, help="dsa key budget per query (block mode: per query block)")
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--local-window", type=int, default=TrainConfig.local_window)
    parser.add_argument("--distance-bias", type=int, default=TrainConfig.distance_bias,
                        help="token-mode dsa: learned indexer score per key distance up to this many slots "
                             "(default: the sequence length; 0: off)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--dense-fraction", type=float, default=TrainConfig.dense_fraction)
    parser.add_argument("--indexer-warmup-steps", type=int, default=TrainConfig.indexer_warmup_steps)
    parser.add_argument("--indexer-loss-weight", type=float, default=TrainConfig.indexer_loss_weight)
    parser.add_argument("--eval-samples", type=int, default=256)
    parser.add_argument("--log-interval", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="also write each variant's result as JSON under this folder")
    parser.add_argument("--reuse", action="store_true",
                        help="take a variant's result from --out when it was made with the same settings")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; accepted: {', '.join(VARIANTS)}")
    task = CopyRecall(seq_len=args.seq_len, span=args.span, num_tokens=args.num_tokens)
    dev = device_name()
    common = dict(steps=args.steps, seq_len=args.seq_len, span=args.span, recall_distance=[args.span, args.seq_len - args.span],
                  topk=args.topk, context_over_budget=round(args.seq_len / args.topk, 2), batch_size=args.batch_size,
                  seed=args.seed)
    results = {}
    for variant in variants:
        settings = {k: v for k, v in vars(args).items()
                    if k not in NOT_SETTINGS and (variant.startswith("dsa") or k not in DSA_SETTINGS)}
        saved = Path(args.out or ".") / f"{variant}.json"
        if args.reuse and args.out and saved.exists() and json.loads(saved.read_text()).get("settings") == settings:
            results[variant] = json.loads(saved.read_text())
            continue
        results[variant] = result = train_variant(variant, task, args)
        if args.out:
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps({**result, "settings": settings}, indent=1))
    dense = results.get("sdpa")
    for variant, result in results.items():
        extra = dict(common, train_seconds=round(result["train_seconds"], 1), attention_options=result["attention_options"])
        if dense is not None and variant != "sdpa":
            emit(f"retrieval_accuracy_{variant.replace('-', '_')}_vs_dense", result["accuracy"], "accuracy", dense["accuracy"],
                 "sdpa (dense), same steps", dev, **extra)
        else:
            emit(f"retrieval_accuracy_{variant.replace('-', '_')}", result["accuracy"], "accuracy", None, "", dev, **extra)


if __name__ == "__main__":
    main()
