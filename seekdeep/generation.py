"""Autoregressive generation with a KV cache.

Greedy or sampled decoding (temperature, top-k, top-p, repetition penalty), stop token ids
and stop strings, seeded sampling, batched prompts of different lengths (left padding with
an ``attention_mask``) and a streaming iterator. The loop is shaped like transformers'
``generate`` so the two can be swapped in tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Iterator, Sequence

import torch

from seekdeep.errors import GenerationError

_UNSET: Any = object()
MAX_NEW_TOKENS = 1 << 24
MAX_TEMPERATURE = 100.0  # past it sampling is uniform noise: a mistyped value, not a choice


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    stop_strings: list[str] | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) \
                or not 0 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise GenerationError("max_new_tokens", f"must be an integer in [0, {MAX_NEW_TOKENS}], got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool) \
                or not math.isfinite(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise GenerationError("temperature", f"must be a number in [0, {MAX_TEMPERATURE}] (0 = greedy), got "
                                  f"{self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or isinstance(self.top_k, bool)
                                       or not 0 <= self.top_k < 2**31):
            raise GenerationError("top_k", f"must be an integer in [0, 2**31) (0 disables), got {self.top_k!r}")
        if self.top_p is not None and (not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1):
            raise GenerationError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.repetition_penalty, (int, float)) or not math.isfinite(self.repetition_penalty) \
                or not 0 < self.repetition_penalty <= 100:
            raise GenerationError("repetition_penalty", f"must be a number in (0, 100] (1.0 disables), got "
                                  f"{self.repetition_penalty!r}")
        if isinstance(self.stop_strings, str):
            self.stop_strings = [self.stop_strings]
        for name in ("eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, (list, tuple)) else [value] if value is not None else []
            if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**31 for i in ids):
                raise GenerationError(name, f"must be a token id (an integer >= 0){' or a list of them' if name[0] == 'e' else ''}"
                                      f" or None, got {value!r}")
        if self.stop_strings is not None and (not all(isinstance(s, str) and s for s in self.stop_strings)):
            raise GenerationError("stop_strings", "must be a list of non-empty strings")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not 0 <= self.seed < 2**63):
            raise GenerationError("seed", f"must be an integer in [0, 2**63), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        """Greedy decoding: ``do_sample=False``, or temperature 0 (the OpenAI API's greedy)."""
        return not self.do_sample or self.temperature == 0

    @property
    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)


def _make_config(model, kwargs: dict[str, Any]) -> GenerationConfig:
    known = {f.name for f in fields(GenerationConfig)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise GenerationError(unknown[0], f"unknown generation argument; accepted: {', '.join(sorted(known))}")
    if kwargs.get("eos_token_id", _UNSET) is _UNSET:
        kwargs["eos_token_id"] = getattr(model.config, "eos_token_id", None)
    if kwargs.get("pad_token_id") is None:
        pad = getattr(model.config, "pad_token_id", None)
        eos = kwargs["eos_token_id"]
        kwargs["pad_token_id"] = pad if pad is not None else (eos if isinstance(eos, int) else (eos[0] if eos else 0))
    return GenerationConfig(**kwargs)


def process_logits(
    logits: torch.Tensor, seen_ids: torch.Tensor, cfg: GenerationConfig
) -> torch.Tensor:
    """Repetition penalty, then (when sampling) temperature, top-k and top-p. logits: (B, V)."""
    logits = logits.float()
    if cfg.repetition_penalty != 1.0:
        seen = logits.gather(1, seen_ids)
        seen = torch.where(seen < 0, seen * cfg.repetition_penalty, seen / cfg.repetition_penalty)
        logits = logits.scatter(1, seen_ids, seen)
    if cfg.greedy:
        return logits
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked above it already cover top_p (the first always stays)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= cfg.top_p
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _validate_inputs(model, input_ids, attention_mask, cfg: GenerationConfig):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32):
        raise GenerationError("input_ids", "must be an integer tensor of shape (batch, seq)")
    if input_ids.shape[1] == 0:
        raise GenerationError("input_ids", "the prompt is empty; pass at least one token")
    vocab = model.config.vocab_size
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
        raise GenerationError("input_ids", f"token ids must be in [0, {vocab}), got range [{int(input_ids.min())}, {int(input_ids.max())}]")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise GenerationError("attention_mask", f"shape {tuple(attention_mask.shape)} must equal input_ids' {tuple(input_ids.shape)}")
    limit = model.config.max_position_embeddings
    if input_ids.shape[1] + cfg.max_new_tokens > limit:
        raise GenerationError(
            "max_new_tokens",
            f"prompt ({input_ids.shape[1]}) + max_new_tokens ({cfg.max_new_tokens}) exceeds the model's "
            f"max_position_embeddings ({limit})",
        )


@torch.no_grad()
def stream_generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    tokenizer=None,
    model_inputs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), one step at a time.

    Rows that already finished (eos or a stop string) receive ``pad_token_id``; the iterator
    ends when every row has finished or ``max_new_tokens`` tokens were produced.
    ``model_inputs``: extra forward arguments of the prompt step only (e.g. ``pixel_values``).
    """
    cfg = _make_config(model, kwargs)
    _validate_inputs(model, input_ids, attention_mask, cfg)
    if cfg.stop_strings and tokenizer is None:
        raise GenerationError("stop_strings", "need a tokenizer (pass tokenizer=...) to match text")
    device = model.device
    input_ids = input_ids.to(device=device, dtype=torch.long)
    batch = input_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device)
    generator = None
    if not cfg.greedy:
        generator = torch.Generator(device=device)
        generator.manual_seed(cfg.seed if cfg.seed is not None else int(torch.randint(0, 2**62, (1,))))
    eos = torch.tensor(cfg.eos_ids, device=device, dtype=torch.long)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    seen = input_ids
    new_tokens: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    try:
        out = model(input_ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=1, **(model_inputs or {}))
        cache = out.past_key_values
        for step in range(cfg.max_new_tokens):
            logits = process_logits(out.logits[:, -1], seen, cfg)
            if not cfg.greedy:
                probs = logits.softmax(-1)
                next_ids = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                next_ids = logits.argmax(-1)
            next_ids = torch.where(finished, torch.full_like(next_ids, cfg.pad_token_id), next_ids)
            new_tokens.append(next_ids)
            yield next_ids
            if eos.numel():
                finished |= torch.isin(next_ids, eos)
            if cfg.stop_strings:
                finished |= _hits_stop_string(tokenizer, torch.stack(new_tokens, 1), cfg.stop_strings)
            if bool(finished.all()) or step == cfg.max_new_tokens - 1:
                break
            seen = torch.cat([seen, next_ids[:, None]], dim=1)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
            out = model(next_ids[:, None], attention_mask=attention_mask, past_key_values=cache, use_cache=True)
    finally:
        model.train(was_training)


def _hits_stop_string(tokenizer, generated: torch.Tensor, stop_strings: Sequence[str]) -> torch.Tensor:
    # Only the tail can contain a new match: decode a window of the last tokens per row.
    window = generated[:, -max(8, max(len(s) for s in stop_strings)) :]
    texts = [tokenizer.decode(row.tolist()) for row in window]
    return torch.tensor([any(s in t for s in stop_strings) for t in texts], device=generated.device)


def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    tokenizer=None,
    model_inputs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Prompt followed by the generated ids, (B, T + new). See :class:`GenerationConfig`."""
    steps = list(stream_generate(model, input_ids, attention_mask=attention_mask, tokenizer=tokenizer, model_inputs=model_inputs, **kwargs))
    if not steps:
        return input_ids
    return torch.cat([input_ids.to(steps[0].device), torch.stack(steps, dim=1)], dim=1)
