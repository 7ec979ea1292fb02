"""The ``seekdeep`` command: a thin table of sub-commands mapped to functions."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

from seekdeep.errors import SeekdeepError

#: modules adding their own sub-command (see build_parser); only commands that work are listed.
PLUGGED_COMMANDS: list[str] = ["seekdeep.recipes.finetune", "seekdeep.recipes.distill", "seekdeep.recipes.compress",
                               "seekdeep.serve.cli", "seekdeep.profiler.cli", "seekdeep.parallel.launch"]

DEFAULT_MODEL_DIR = Path(os.environ.get("SEEKDEEP_HOME", Path.home() / ".cache" / "seekdeep")) / "default-model"


def make_default_model(model_dir: Path, backend: str = "dsa"):
    """Build the small default code model: a byte-level BPE tokenizer trained on a slice of
    the standard library and a randomly initialised llama-family model with dynamic sparse
    attention. (``seekdeep train`` is what gives it useful weights.)"""
    import torch

    from seekdeep.data import stdlib_files
    from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM
    from seekdeep.tokenizer import train_tokenizer

    files = stdlib_files(limit_bytes=2_000_000)
    tokenizer = train_tokenizer([str(p) for p in files], vocab_size=2048)
    config = LlamaConfig.from_name(
        "tiny",
        vocab_size=tokenizer.vocab_size,
        max_position_embeddings=1024,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attention_backend=backend,
        attention_options={"topk": 64},
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.init_weights()
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model, tokenizer


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from seekdeep.auto import AutoModel, AutoTokenizer

    trained = Path("runs/train/final")  # what `seekdeep train` writes by default
    model_dir = Path(args.model) if args.model else (trained if (trained / "config.json").is_file() else DEFAULT_MODEL_DIR)
    if args.model is None and not (model_dir / "config.json").is_file():
        print(f"No model given: creating the default model in {model_dir} (random weights; `seekdeep train` trains one)", file=sys.stderr)
        make_default_model(model_dir)
    overrides = {"attention_backend": args.attention_backend} if args.attention_backend else {}
    model = AutoModel.from_pretrained(model_dir, dtype=args.dtype, device=args.device, **overrides)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    enc = tokenizer(args.prompt, return_tensors="pt")
    gen_kwargs = dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature if args.temperature > 0 else 1.0,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop_strings=args.stop or None,
    )
    start = time.perf_counter()
    n_new = 0
    if args.stream:
        sys.stdout.write(args.prompt)
        ids: list[int] = []
        printed = ""
        for step in model.stream_generate(enc["input_ids"], attention_mask=enc["attention_mask"], tokenizer=tokenizer, **gen_kwargs):
            ids.append(int(step[0]))
            text = tokenizer.decode(ids, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for a complete UTF-8 character
                sys.stdout.write(text[len(printed):])
                sys.stdout.flush()
                printed = text
        n_new = len(ids)
        sys.stdout.write("\n")
    else:
        out = model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], tokenizer=tokenizer, **gen_kwargs)
        n_new = out.shape[1] - enc["input_ids"].shape[1]
        print(tokenizer.decode(out[0].tolist(), skip_special_tokens=True))
    elapsed = time.perf_counter() - start
    print(f"[{n_new} tokens in {elapsed:.2f}s, {n_new / max(elapsed, 1e-9):.1f} tok/s, model {model_dir}]", file=sys.stderr)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from seekdeep.recipes.train import TrainConfig, train

    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    summary = train(cfg)
    print(f"\nheld-out perplexity: {summary['heldout_ppl']:.2f} (loss {summary['heldout_loss']:.4f} nats/token) "
          f"after {summary['steps']} steps, {summary['train_seconds']:.0f}s")
    print(f"sample:\n{summary['sample']}\n")
    print(f"model: {summary['model_dir']}  (try: seekdeep generate {summary['model_dir']} --prompt 'def ')")
    print(f"loss curve: {summary['loss_curve']}")
    return 0


def _flag_type(annotation: str) -> type:
    """argparse type from a field annotation as a string (``from __future__ import annotations``):
    ``"float | None"`` -> float."""
    for name, kind in (("bool", bool), ("int", int), ("float", float)):
        if annotation.startswith(name):
            return kind
    return str


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, help_overrides: dict[str, str],
                        skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per dataclass field, typed by its annotation, so the CLI is not a second
    config system. Fields in ``skip`` are left to the caller (e.g. a positional argument)."""
    from dataclasses import MISSING, fields

    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        help_text = help_overrides.get(f.name, f"(default: {default})")
        kind = _flag_type(str(f.type))
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=default, help=help_text)


def add_recipe_command(subparsers, name: str, help_text: str, config_cls, positional: str,
                       help_overrides: dict[str, str], func) -> argparse.ArgumentParser:
    """A recipe's sub-command: an optional positional model argument (the config field
    ``positional``), one flag per other field of ``config_cls``, and ``func`` to run it."""
    parser = subparsers.add_parser(name, help=help_text)
    parser.add_argument(positional, nargs="?", default=None, help=help_overrides.get(positional))
    add_dataclass_flags(parser, config_cls, help_overrides, skip=(positional,))
    parser.set_defaults(func=func)
    return parser


def _probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seekdeep", description="Efficient LLMs with dynamic sparse attention.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text from a model directory (or the default model)")
    gen.add_argument("model", nargs="?", help="model directory or hub id (default: runs/train/final when `seekdeep train` "
                     f"made it, else {DEFAULT_MODEL_DIR}, created with random weights if missing)")
    gen.add_argument("--prompt", default="def fibonacci(n):\n", help="prompt text")
    gen.add_argument("--max-new-tokens", type=_non_negative_int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=_non_negative_int, default=None)
    gen.add_argument("--top-p", type=_probability, default=None)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--seed", type=_non_negative_int, default=None)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    gen.add_argument("--attention-backend", default=None, help="override the model's attention backend")
    gen.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16 or auto")
    gen.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, ...")
    gen.set_defaults(func=cmd_generate)

    from seekdeep.recipes.train import TrainConfig

    tr = sub.add_parser("train", help="train a code model on the embedded corpus (the Python standard library) or --data")
    add_dataclass_flags(tr, TrainConfig, {
        "data": "text file, folder or .jsonl (text field); default: the Python standard library",
        "resume": "'auto' (latest checkpoint in --output-dir) or a checkpoint directory",
        "max_time": "seconds of training after which the run evaluates, saves and stops",
        "preset": "model size: tiny, small, base, 125m (default: tiny)",
        "attention_backend": "eager, sdpa, dsa (default) or gated",
        "local_window": "dsa: most recent keys every query always keeps, counted in --topk (default: topk // 2; "
                        "block mode: rounded up to blocks)",
        "distance_bias": "dsa token mode: the indexer learns a score per query-key distance up to this many slots "
                         "(default: --seq-len; 0: off)",
        "precision": "fp32 (default), bf16 or fp16 (with dynamic loss scaling)",
    })
    tr.set_defaults(func=cmd_train)

    # Sub-commands that live beside their recipe: each module exposes
    # ``register(subparsers)`` adding its parser with ``set_defaults(func=...)``.
    for module_name in PLUGGED_COMMANDS:
        importlib.import_module(module_name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SeekdeepError as exc:
        print(f"seekdeep {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
