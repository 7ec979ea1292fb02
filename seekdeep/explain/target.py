"""The number an explanation explains, for the two kinds of model users have.

* a sequence classifier (``score`` head): the log-odds of the target class,
  ``logit_c - logsumexp(other logits)`` (the raw output for a one-output regression head);
* a causal LM (``lm_head``): the log-probability of each token of a continuation given the
  prompt, one output per continuation token (the token x token matrix of a generation).

:class:`Scorer` evaluates that number on many token-id rows at once (batched, left-padded)
and, for gradient methods, on input embeddings."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from seekdeep.errors import ConfigError
from seekdeep.explain.config import DEFAULT_BATCH
from seekdeep.explain.units import Units, split_units
from seekdeep.validate import MAX_BATCH, check_int


def model_kind(model) -> str:
    if hasattr(model, "score") and hasattr(model, "num_labels"):
        return "classifier"
    if hasattr(model, "lm_head"):
        return "causal_lm"
    raise ConfigError("model", f"{type(model).__name__} has neither a classification head (score) nor an LM head "
                      "(lm_head); accepted: AutoModelForSequenceClassification or AutoModelForCausalLM models")


def context_length(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 1 << 30))


@dataclass
class Prepared:
    """One input ready to explain: its units, the target and the names of the outputs."""

    units: Units
    target: int | None = None  # classifier: class index
    continuation: list[int] = field(default_factory=list)  # causal LM: ids scored after the prompt
    output_names: list[str] = field(default_factory=list)


class Scorer:
    """Batched evaluation of the explained output (see the module docstring).

    ``target``: classifier — a label name, a class index (int or digit string) or None (the class
    predicted on the full text); causal LM — the continuation text, or None to explain the
    model's own greedy continuation of ``max_new_tokens`` tokens."""

    def __init__(self, model, tokenizer, target=None, batch_size: int = DEFAULT_BATCH, granularity: str = "word",
                 max_new_tokens: int = 8):
        check_int("batch_size", batch_size, 1, MAX_BATCH)
        check_int("max_new_tokens", max_new_tokens, 1, 1 << 16)
        self.model, self.tokenizer = model, tokenizer
        self.kind = model_kind(model)
        self.target, self.batch_size, self.granularity, self.max_new_tokens = target, batch_size, granularity, max_new_tokens
        pad = getattr(tokenizer, "pad_token_id", None)
        eos = getattr(tokenizer, "eos_token_id", None)
        self.pad_id = pad if pad is not None else (eos if eos is not None else 0)
        bos = getattr(tokenizer, "bos_token_id", None)
        # An input with every unit deleted still needs one token to run the model on.
        self.empty_row = [bos if bos is not None else self.pad_id]
        self.calls = 0
        self.rows = 0
        self.tokens = 0  # real tokens in the rows scored (padding excluded): cost beyond the row count

    # -- targets
    def resolve_class(self, target) -> int:
        labels = self.model.id2label
        if isinstance(target, str) and target.strip().lstrip("-").isdigit():
            target = int(target)
        if isinstance(target, int) and not isinstance(target, bool):
            if 0 <= target < self.model.num_labels:
                return target
        elif isinstance(target, str) and target in self.model.label2id:
            return self.model.label2id[target]
        accepted = ", ".join(f"{i} / {name!r}" for i, name in labels.items())
        raise ConfigError("target", f"{target!r} is not a class of this model; accepted: {accepted}")

    def prepare(self, text: str) -> Prepared:
        units = split_units(text, self.tokenizer, self.granularity)
        limit = context_length(self.model)
        if self.kind == "classifier":
            self._check_length(len(units.token_ids), limit)
            if self.target is None:
                logits = self.logits([units.token_ids])[0]
                target = int(logits.argmax())
            else:
                target = self.resolve_class(self.target)
            name = self.model.id2label[target] if self.model.num_labels > 1 else "output"
            return Prepared(units, target=target, output_names=[name])
        if self.target is None:
            self._check_length(len(units.token_ids) + self.max_new_tokens, limit)
            prompt = torch.tensor([units.token_ids], device=self.model.device)
            with torch.no_grad():
                out = self.model.generate(prompt, max_new_tokens=self.max_new_tokens, do_sample=False)
            continuation = out[0, prompt.shape[1]:].tolist()
        else:
            if not isinstance(self.target, str) or not self.target:
                raise ConfigError("target", f"for a causal LM: the continuation text to score, or None; got {self.target!r}")
            continuation = self.tokenizer.encode(self.target, add_special_tokens=False)
            if not continuation:
                raise ConfigError("target", f"{self.target!r} encodes to no tokens")
        if not continuation:
            raise ConfigError("target", "the model generated no tokens to explain (it stopped at once)")
        self._check_length(len(units.token_ids) + len(continuation), limit)
        names = [self.tokenizer.decode([i]) for i in continuation]
        return Prepared(units, continuation=continuation, output_names=names)

    def _check_length(self, n: int, limit: int) -> None:
        if n > limit:
            raise ConfigError("text", f"needs {n} positions (continuation included) but the model's context is "
                              f"{limit} tokens (max_position_embeddings); accepted: a shorter text. It is refused "
                              "rather than truncated, so no part of it is silently left unexplained")

    # -- evaluation
    def _batch(self, rows: list[list[int]]):
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # left padding: positions follow the mask, the last column is real
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
        return ids.to(self.model.device), mask.to(self.model.device)

    @torch.no_grad()
    def logits(self, rows: list[list[int]]) -> torch.Tensor:
        ids, mask = self._batch(rows)
        return self.model(input_ids=ids, attention_mask=mask).logits.float()

    def outputs_from_logits(self, logits: torch.Tensor, prepared: Prepared, lengths=None) -> torch.Tensor:
        """(B, n_outputs) explained values from the model's logits."""
        if self.kind == "classifier":
            if self.model.num_labels == 1:
                return logits[:, :1]
            c = prepared.target
            others = torch.cat([logits[:, :c], logits[:, c + 1:]], dim=-1)
            return (logits[:, c] - torch.logsumexp(others, dim=-1))[:, None]
        n = len(prepared.continuation)
        # the continuation occupies the last n columns; column t-1 predicts token t
        logp = F.log_softmax(logits[:, -n - 1:-1].float(), dim=-1)  # (B, n, V)
        target = torch.tensor(prepared.continuation, device=logits.device)
        return logp.gather(-1, target.expand(logits.shape[0], n)[..., None])[..., 0]  # (B, n)

    def score_rows(self, rows: list[list[int]], prepared: Prepared) -> np.ndarray:
        """Explained outputs (n_rows, n_outputs) for prompt rows (the continuation is appended)."""
        # Masked rows differ in length by up to the whole input; batching them in length order
        # keeps the padding (compute spent on nothing) small.
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        results = np.zeros((len(rows), len(prepared.output_names)), dtype=np.float64)
        for start in range(0, len(order), self.batch_size):
            picked = order[start:start + self.batch_size]
            chunk = [(rows[i] or self.empty_row) + prepared.continuation for i in picked]
            ids, mask = self._batch(chunk)
            with torch.no_grad():
                logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
            self.calls += 1
            self.rows += len(chunk)
            self.tokens += sum(len(r) for r in chunk)
            results[picked] = self.outputs_from_logits(logits, prepared).cpu().numpy()
        return results

    def score_units(self, keep_masks: np.ndarray, prepared: Prepared) -> np.ndarray:
        """Outputs for boolean unit masks (n_rows, n_units): True keeps a unit."""
        units = prepared.units
        rows = [units.keep([u for u in range(len(units)) if m[u]]) for m in keep_masks]
        return self.score_rows(rows, prepared)

    def forward_embeds(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, prepared: Prepared) -> torch.Tensor:
        """Outputs (B, n_outputs) from prompt+continuation embeddings (B, T, C) — for captum."""
        logits = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask).logits.float()
        return self.outputs_from_logits(logits, prepared)

    def full_ids(self, prepared: Prepared) -> list[int]:
        return prepared.units.token_ids + prepared.continuation
