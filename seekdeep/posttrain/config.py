"""Configs of the post-training recipes: ``seekdeep sft`` (instruction tuning on chat data) and
``seekdeep rl`` (GRPO with verifiable rewards, or DPO from preference pairs).

Kept apart from the recipes so that reading or validating a config imports no training code."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from seekdeep.errors import ConfigError
from seekdeep.files import check_data_path, check_model_path
from seekdeep.validate import MAX_SEED, check_device, check_float, check_int

METHODS = ("lora", "full")
PRECISIONS = ("fp32", "bf16", "fp16")
ALGORITHMS = ("grpo", "dpo")
REWARDS = ("parse", "prefix", "length", "doctest")
#: longest example / prompt + completion the recipes accept, in tokens
MAX_TOKENS = 1 << 16
MAX_BATCH = 1 << 12


class _Serialisable:
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(sorted(unknown)[0], f"not a field of {cls.__name__}; accepted: {', '.join(sorted(known))}")
        return cls(**data)


def _check_common(cfg) -> None:
    if cfg.method not in METHODS:
        raise ConfigError("method", f"unknown {cfg.method!r}; accepted: {', '.join(METHODS)}")
    if cfg.precision not in PRECISIONS:
        raise ConfigError("precision", f"unknown {cfg.precision!r}; accepted: {', '.join(PRECISIONS)}")
    for name in ("steps", "grad_accum", "checkpoint_interval", "keep_last"):
        check_int(name, getattr(cfg, name))
    check_int("batch_size", cfg.batch_size, 1, MAX_BATCH)
    check_int("warmup_steps", cfg.warmup_steps, 0)
    check_int("seed", cfg.seed, 0, MAX_SEED)
    check_float("lr", cfg.lr, 0, 10, lo_open=True, optional=True)
    check_float("min_lr_ratio", cfg.min_lr_ratio, 0, 1)
    check_float("weight_decay", cfg.weight_decay, 0, 10)
    check_float("grad_clip", cfg.grad_clip, 0, lo_open=True)
    check_float("max_time", cfg.max_time, 0, lo_open=True, optional=True)
    check_model_path("base", cfg.base)
    check_data_path("data", cfg.data)
    check_device("device", cfg.device)
    if cfg.method == "lora":
        from seekdeep.peft.config import parse_lora_spec

        parse_lora_spec(cfg.lora)  # names --lora when it is malformed


@dataclass
class SFTConfig(_Serialisable):
    """Supervised fine-tuning on conversations; loss on assistant tokens only."""

    base: str | None = None  # model directory; None: runs/train/final, else the small default base
    data: str | None = None  # JSONL of {"messages": [...]} or {"prompt", "completion"}; None: stdlib function bodies
    method: str = "lora"
    lora: str = "r=16,alpha=32,targets=all-linear"
    seq_len: int = 384  # longest example in tokens; longer ones are dropped (and counted); packed: the row length
    pack: bool = False  # lay conversations end to end in rows of seq_len tokens (block-diagonal mask: none sees another)
    max_examples: int | None = None  # cap on training examples (None: all)
    max_body_lines: int = 3  # default data: longest function body used (the default base is tiny: short bodies)
    batch_size: int = 8
    grad_accum: int = 1
    steps: int = 200
    max_time: float | None = None
    lr: float | None = None  # None: 2e-3 for LoRA, 5e-4 for full
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    precision: str = "fp32"
    eval_interval: int = 50
    eval_batches: int = 8
    checkpoint_interval: int = 50
    keep_last: int = 2
    output_dir: str = "runs/sft"
    resume: str | None = None  # "auto" (latest in output_dir) or a checkpoint path
    overwrite: bool = False
    device: str | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        _check_common(self)
        check_int("seq_len", self.seq_len, 8, MAX_TOKENS)
        check_int("max_examples", self.max_examples, 1, optional=True)
        check_int("max_body_lines", self.max_body_lines, 1, 10_000)
        check_int("eval_interval", self.eval_interval)
        check_int("eval_batches", self.eval_batches)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (2e-3 if self.method == "lora" else 5e-4)


@dataclass
class RLConfig(_Serialisable):
    """GRPO (sample a group per prompt, reward, group-normalised advantages, clipped ratio + KL to
    the reference) or DPO (preference pairs against the same reference)."""

    base: str | None = None  # the policy to start from; None: runs/sft/final, else the SFT'd default model
    algorithm: str = "grpo"
    data: str | None = None  # grpo: JSONL of {"prompt"[, "header", "module"]}; dpo: {"prompt", "chosen", "rejected"}
    method: str = "lora"
    lora: str = "r=16,alpha=32,targets=all-linear"
    steps: int = 20
    batch_size: int = 4  # grpo: prompts per step; dpo: pairs per step
    group_size: int = 8  # grpo: completions sampled per prompt (>= 2: the advantage is relative to the group)
    grad_accum: int = 1
    ppo_epochs: int = 1  # grpo: optimisation passes over each step's samples (ratio != 1 from the second on)
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    clip_eps: float = 0.2
    kl_beta: float = 0.3  # measured on the default model: 0.04 at lr 2e-3 let the KL run to 2.5 nats/token in 20 steps
    dpo_beta: float = 0.1
    dpo_pairs: int = 32  # dpo with no data: pairs built from the policy's own best / worst samples
    rewards: str = "parse,prefix,length,doctest"
    length_budget: int = 32  # tokens; the length reward falls off past it, to 0 at twice it (= max_new_tokens)
    doctest_timeout: float = 2.0  # seconds per sandboxed doctest run
    max_prompt_tokens: int = 160
    max_body_lines: int = 3  # default prompts: as the default SFT data
    lr: float | None = None  # None: LoRA 1e-3 (grpo) / 2e-4 (dpo: 1e-3 ran its KL away), full 5e-5
    min_lr_ratio: float = 1.0  # RL runs are short: a constant rate after warm-up
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    precision: str = "fp32"
    max_time: float | None = None
    checkpoint_interval: int = 10
    keep_last: int = 2
    output_dir: str = "runs/rl"
    resume: str | None = None
    overwrite: bool = False
    device: str | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ConfigError("algorithm", f"unknown {self.algorithm!r}; accepted: {', '.join(ALGORITHMS)}")
        _check_common(self)
        check_int("group_size", self.group_size, 2, 1024)
        check_int("ppo_epochs", self.ppo_epochs, 1, 100)
        check_int("max_new_tokens", self.max_new_tokens, 1, MAX_TOKENS)
        check_int("top_k", self.top_k, 0, 1 << 20)
        check_int("dpo_pairs", self.dpo_pairs, 1, 1 << 20)
        check_int("length_budget", self.length_budget, 1, MAX_TOKENS)
        check_int("max_prompt_tokens", self.max_prompt_tokens, 8, MAX_TOKENS)
        check_int("max_body_lines", self.max_body_lines, 1, 10_000)
        # temperature 0 would make every completion of a group equal: no advantage, no signal
        check_float("temperature", self.temperature, 0, 10, lo_open=True)
        check_float("clip_eps", self.clip_eps, 0, 1, lo_open=True, hi_open=True)
        check_float("kl_beta", self.kl_beta, 0, 100)
        check_float("dpo_beta", self.dpo_beta, 0, 100, lo_open=True)
        check_float("doctest_timeout", self.doctest_timeout, 0, 600, lo_open=True)
        self.reward_names()

    def reward_names(self) -> list[str]:
        names = [n.strip() for n in str(self.rewards).split(",") if n.strip()]
        bad = [n for n in names if n not in REWARDS]
        if not names or bad:
            raise ConfigError("rewards", f"got {self.rewards!r}; accepted: a comma-separated subset of {', '.join(REWARDS)}")
        return names

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        if self.method == "lora":
            return 1e-3 if self.algorithm == "grpo" else 2e-4
        return 5e-5
