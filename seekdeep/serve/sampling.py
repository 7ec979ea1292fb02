"""Per-request sampling parameters and the sampler the engine applies to each step's logits.

Logit processing (repetition penalty, temperature, top-k, top-p) is
:func:`seekdeep.generation.process_logits`; every request carries its own
``torch.Generator``, so a seeded request draws the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from seekdeep.errors import GenerationError
from seekdeep.generation import MAX_NEW_TOKENS, MAX_TEMPERATURE, GenerationConfig, process_logits

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    """``temperature=0`` is greedy. ``stop`` (strings) is matched on text by the layer that
    detokenizes (the server); the engine itself stops on ``stop_token_ids``, the model's eos
    (unless ``ignore_eos``) and ``max_tokens``. ``logprobs``: None, or how many top
    alternatives to return besides the sampled token's own log-probability."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None

    def __post_init__(self) -> None:
        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.max_tokens) or not 1 <= self.max_tokens <= MAX_NEW_TOKENS:
            raise GenerationError("max_tokens", f"must be an integer in [1, {MAX_NEW_TOKENS}], got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool) \
                or not math.isfinite(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise GenerationError("temperature", f"must be a number in [0, {MAX_TEMPERATURE}] (0 = greedy), got "
                                  f"{self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise GenerationError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not is_int(self.top_k) or not 0 <= self.top_k < 2**31:
            raise GenerationError("top_k", f"must be an integer >= 0 (0 disables), got {self.top_k!r}")
        if not isinstance(self.repetition_penalty, (int, float)) or not math.isfinite(self.repetition_penalty) \
                or not 0 < self.repetition_penalty <= 100:
            raise GenerationError("repetition_penalty", f"must be in (0, 100] (1.0 disables), got {self.repetition_penalty!r}")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise GenerationError("seed", f"must be an integer in [0, 2**63), got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not all(isinstance(s, str) and s for s in self.stop):
            raise GenerationError("stop", f"must be a list of non-empty strings, got {self.stop!r}")
        if not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise GenerationError("stop_token_ids", f"must be token ids >= 0, got {self.stop_token_ids!r}")
        if not is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise GenerationError("min_tokens", f"must be an integer in [0, max_tokens], got {self.min_tokens!r}")
        if self.logprobs is not None and (not is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise GenerationError("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generation_config(self) -> GenerationConfig:
        return GenerationConfig(
            do_sample=not self.greedy,
            temperature=self.temperature if not self.greedy else 1.0,
            top_k=self.top_k or None,
            top_p=self.top_p if self.top_p < 1 else None,
            repetition_penalty=self.repetition_penalty,
        )


@dataclass
class TokenLogprobs:
    """The sampled token's log-probability and the top alternatives (id -> logprob)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


class RequestSampler:
    """Sampling state of one request: its processed config and its random generator."""

    def __init__(self, params: SamplingParams, device: torch.device):
        self.params = params
        self.config = params.generation_config()
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
            self.generator.manual_seed(seed)

    @property
    def plain_greedy(self) -> bool:
        return self.params.greedy and self.params.repetition_penalty == 1.0


def sample(
    logits: torch.Tensor,
    samplers: list[RequestSampler],
    token_ids: list[list[int]],
    suppress: list[list[int]],
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """One next token per row. ``logits``: (N, V) fp32 or lower; ``token_ids``: each row's
    prompt + output so far (for the repetition penalty); ``suppress``: token ids a row may not
    pick yet (eos before ``min_tokens``)."""
    if not any(suppress) and all(s.plain_greedy and s.params.logprobs is None for s in samplers):
        return logits.argmax(-1).tolist(), [None] * len(samplers)  # the common case, without copies
    logits = logits.float().clone()
    for row, banned in enumerate(suppress):
        if banned:
            logits[row, banned] = float("-inf")
    chosen = [0] * len(samplers)
    fast = [i for i, s in enumerate(samplers) if s.plain_greedy]
    if fast:
        picks = logits[fast].argmax(-1).tolist()
        for i, tok in zip(fast, picks):
            chosen[i] = tok
    for i, s in enumerate(samplers):
        if s.plain_greedy:
            continue
        seen = torch.tensor([token_ids[i]], device=logits.device)
        row = process_logits(logits[i : i + 1], seen, s.config)  # (1, V)
        if s.generator is None:
            chosen[i] = int(row.argmax(-1))
        else:
            probs = row.softmax(-1)
            chosen[i] = int(torch.multinomial(probs, 1, generator=s.generator))
    logprobs: list[TokenLogprobs | None] = [None] * len(samplers)
    wanted = [i for i, s in enumerate(samplers) if s.params.logprobs is not None]
    if wanted:
        # Log-probabilities of the model's distribution (before temperature / top-p), as OpenAI reports them.
        logp = torch.log_softmax(logits[wanted], dim=-1)  # (W, V)
        for row, i in enumerate(wanted):
            k = samplers[i].params.logprobs
            top = []
            if k:
                values, ids = logp[row].topk(k)
                top = list(zip(ids.tolist(), values.tolist()))
            logprobs[i] = TokenLogprobs(chosen[i], float(logp[row, chosen[i]]), top)
    return chosen, logprobs
