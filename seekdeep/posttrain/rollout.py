"""Sampling completions for RL and evaluation: chat-rendered prompts, left-padded and repeated
``group_size`` times, decoded in one batched, KV-cached ``model.generate`` call; and scoring
a policy on a prompt set (parse rate, doctest pass rate, length)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from seekdeep.errors import DataError
from seekdeep.posttrain.instructions import FunctionTask
from seekdeep.posttrain.rewards import DoctestReward, RLPrompt, parse_reward


def prompt_ids(tokenizer, prompt: RLPrompt) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt.text}], add_generation_prompt=True)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), each (B, T), padded on the left (generation's convention)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


@dataclass
class Rollout:
    """``sequences`` = left-padded prompts + completions, (B, P + C); ``attention_mask`` the same
    shape; ``completion_mask`` (B, C) marks each completion's tokens up to and including its
    eos; ``texts`` the completions decoded without the eos."""

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    prompt_width: int
    texts: list[str]

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(1)


def completion_mask(completions: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """(B, C) -> (B, C) 1 up to and including the first eos of each row (all of a row without one)."""
    if eos_id is None:
        return torch.ones_like(completions)
    is_eos = (completions == eos_id).long()
    before_or_at = (is_eos.cumsum(1) - is_eos) == 0  # no eos strictly before this position
    return before_or_at.long()


@torch.no_grad()
def sample(model, tokenizer, prompts: list[RLPrompt], group_size: int, max_new_tokens: int, temperature: float,
           top_k: int = 0, seed: int = 0) -> Rollout:
    """``group_size`` completions of every prompt (rows grouped per prompt), one batched call."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rows = [prompt_ids(tokenizer, p) for p in prompts for _ in range(group_size)]
    ids, mask = left_pad(rows, pad)
    ids, mask = ids.to(model.device), mask.to(model.device)
    extra = {"top_k": top_k} if top_k else {}
    out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=temperature, max_new_tokens=max_new_tokens,
                         seed=seed, eos_token_id=eos, pad_token_id=pad, **extra)
    completions = out[:, ids.shape[1]:]  # (B, C)
    cmask = completion_mask(completions, eos)
    texts = []
    for row, m in zip(completions.tolist(), cmask.tolist()):
        kept = [t for t, keep in zip(row, m) if keep and t != eos]
        texts.append(tokenizer.decode(kept))
    return Rollout(out, torch.cat([mask, cmask], 1), cmask, ids.shape[1], texts)


def default_prompts(side: str, tokenizer, max_prompt_tokens: int, max_body_lines: int) -> list[RLPrompt]:
    """The embedded function tasks of one side of the corpus split whose prompt fits."""
    from seekdeep.posttrain.instructions import default_tasks

    prompts = [RLPrompt(t.prompt, t) for t in default_tasks(side, max_body_lines)]
    return [p for p in prompts if len(prompt_ids(tokenizer, p)) <= max_prompt_tokens]


def read_prompts(path: str | Path, tokenizer, max_prompt_tokens: int) -> list[RLPrompt]:
    """JSONL of ``{"prompt": str}``; with ``"header"`` (a def line + docstring) the completion is
    a body scored under it, and with ``"module"`` too its doctests run in that module's namespace."""
    from seekdeep.posttrain.chat import read_jsonl

    prompts = []
    for where, record in read_jsonl(path):
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise DataError(where, "expected an object with a string 'prompt' (and optionally 'header', 'module')")
        task = None
        if isinstance(record.get("header"), str):
            header = record["header"] if record["header"].endswith("\n") else record["header"] + "\n"
            name = header.split("def ", 1)[-1].split("(", 1)[0].strip()
            module = record.get("module") or "builtins"
            task = FunctionTask(module, name, header, "", "    ", doctest=">>>" in header and "module" in record)
        prompt = RLPrompt(record["prompt"], task)
        if len(prompt_ids(tokenizer, prompt)) <= max_prompt_tokens:
            prompts.append(prompt)
    if not prompts:
        raise DataError(str(path), "no prompt fits --max-prompt-tokens (or the file is empty)")
    return prompts


@torch.no_grad()
def evaluate_policy(model, tokenizer, prompts: list[RLPrompt], samples: int, max_new_tokens: int, temperature: float,
                    seed: int, batch_prompts: int = 8, doctest_timeout: float = 2.0) -> dict[str, float]:
    """Parse rate, doctest pass rate (over prompts that carry doctests) and mean completion length
    of ``samples`` completions per prompt."""
    doctest = DoctestReward(doctest_timeout)
    parsed, total, lengths, passes, doctested = 0.0, 0, 0.0, 0.0, 0
    for start in range(0, len(prompts), batch_prompts):
        chunk = prompts[start:start + batch_prompts]
        rollout = sample(model, tokenizer, chunk, samples, max_new_tokens, temperature, seed=seed + start)
        for i, text in enumerate(rollout.texts):
            prompt = chunk[i // samples]
            parsed += parse_reward(prompt, text)
            total += 1
            score = doctest(prompt, text)
            if score is not None:
                passes += score
                doctested += 1
        lengths += float(rollout.lengths.sum())
    return {"parse_rate": parsed / max(total, 1), "doctest_pass_rate": passes / doctested if doctested else float("nan"),
            "doctest_samples": doctested, "mean_length": lengths / max(total, 1), "samples": total,
            "sandbox": dict(doctest.events)}


def write_samples(log, step: int, prompts: list[RLPrompt], rollout: Rollout, rewards: list) -> None:
    """A readable record of what was sampled at ``step``, for looking at the policy's answers.
    ``log``: a ``MetricsLog`` on samples.jsonl, which on resume drops the lines of the steps
    that are redone, so the file reads as one uninterrupted run."""
    group = len(rollout.texts) // max(len(prompts), 1)
    for i, text in enumerate(rollout.texts):
        log.write({"step": step, "prompt": prompts[i // group].name, "completion": text, "reward": rewards[i]})
