"""The ``seekdeep`` command: a thin table of sub-commands mapped to functions."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from dataclasses import fields
from pathlib import Path

from seekdeep.errors import ConfigError, SeekdeepError

#: modules adding their own sub-command (see build_parser); only commands that work are listed.
PLUGGED_COMMANDS: list[str] = ["seekdeep.recipes.finetune", "seekdeep.recipes.distill", "seekdeep.recipes.compress",
                               "seekdeep.serve.cli", "seekdeep.profiler.cli", "seekdeep.parallel.launch",
                               "seekdeep.explain.cli", "seekdeep.recipes.fl", "seekdeep.recipes.vlm",
                               "seekdeep.recipes.sft", "seekdeep.recipes.rl", "seekdeep.recipes.align"]

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
    from seekdeep.auto import AutoModel, AutoTokenizer
    from seekdeep.files import check_model_path
    from seekdeep.generation import GenerationConfig
    from seekdeep.models.loading import parse_dtype
    from seekdeep.validate import check_device

    # every flag goes to the config that owns it, unchanged, before anything is loaded or written:
    # temperature 0 is greedy in GenerationConfig itself (as in the OpenAI API)
    gen_cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=True, temperature=args.temperature,
                               top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                               seed=args.seed, stop_strings=args.stop or None)
    check_model_path("model", args.model)
    check_device("device", args.device)
    if args.dtype is not None:
        parse_dtype(args.dtype)
    if args.attention_backend is not None:
        from seekdeep.attention import available_backends

        if args.attention_backend not in available_backends():
            raise ConfigError("attention_backend", f"unknown {args.attention_backend!r}; accepted: "
                              f"{', '.join(available_backends())}")
    trained = Path("runs/train/final")  # what `seekdeep train` writes by default
    model_dir = Path(args.model) if args.model else (trained if (trained / "config.json").is_file() else DEFAULT_MODEL_DIR)
    if args.model is None and not (model_dir / "config.json").is_file():
        print(f"No model given: creating the default model in {model_dir} (random weights; `seekdeep train` trains one)", file=sys.stderr)
        make_default_model(model_dir)
    overrides = {"attention_backend": args.attention_backend} if args.attention_backend else {}
    model = AutoModel.from_pretrained(model_dir, dtype=args.dtype, device=args.device, **overrides)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    enc = tokenizer(args.prompt, return_tensors="pt")
    gen_kwargs = {f.name: getattr(gen_cfg, f.name) for f in fields(GenerationConfig)
                  if f.name not in ("eos_token_id", "pad_token_id")}  # the model's own unless given
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
    parser.set_defaults(func=func, config_cls=config_cls)
    return parser


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (``seekdeep train: error: argument --steps: ...``) instead of
    the usage block, like every other error of the CLI; sub-parsers inherit it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="seekdeep", description="Efficient LLMs with dynamic sparse attention.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text from a model directory (or the default model)")
    gen.add_argument("model", nargs="?", help="model directory or hub id (default: runs/train/final when `seekdeep train` "
                     f"made it, else {DEFAULT_MODEL_DIR}, created with random weights if missing)")
    gen.add_argument("--prompt", default="def fibonacci(n):\n", help="prompt text")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    gen.add_argument("--top-k", type=int, default=None, help="sampling: keep the k most likely tokens (0: off)")
    gen.add_argument("--top-p", type=float, default=None, help="sampling: nucleus mass in (0, 1]")
    gen.add_argument("--repetition-penalty", type=float, default=1.0, help="> 0; 1.0 disables")
    gen.add_argument("--seed", type=int, default=None)
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
    tr.set_defaults(func=cmd_train, config_cls=TrainConfig)

    # Sub-commands that live beside their recipe: each module exposes
    # ``register(subparsers)`` adding its parser with ``set_defaults(func=...)``.
    for module_name in PLUGGED_COMMANDS:
        importlib.import_module(module_name).register(sub)
    return parser


def describe_error(exc: SeekdeepError, parser: argparse.ArgumentParser | None = None) -> str:
    """The error's text with a config field written as the flag a user types (``steps`` ->
    ``--steps``) when the sub-command has that flag."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    field = getattr(exc, "field", None)
    if field and parser is not None and text.startswith(field):
        flag = "--" + field.replace("_", "-")
        options = {s for action in parser._actions for s in action.option_strings}
        positionals = {action.dest for action in parser._actions if not action.option_strings}
        if flag in options:
            text = flag + text[len(field):]
        elif field in positionals:
            text = field.upper() + text[len(field):]
    return text


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SeekdeepError as exc:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices.get(args.command)
        print(f"seekdeep {args.command}: error: {describe_error(exc, sub)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
