"""Prompt tuning: learned virtual-token embeddings placed before the input.

The model code is not edited: a forward pre-hook on the causal LM swaps ``input_ids`` for
``inputs_embeds`` with the virtual tokens in front (attention mask, labels and explicit
position ids are extended to match), and a forward hook drops the virtual positions from the
logits and hidden states, so callers -- ``generate`` included -- see outputs for their own
tokens only. With a KV cache the virtual tokens enter once, in the prefill; later steps only
get the attention mask widened.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn

from seekdeep.errors import ConfigError
from seekdeep.peft.config import PromptTuningConfig


class PromptEmbedding(nn.Module):
    """``embedding.weight`` (num_virtual_tokens, hidden): peft's ``prompt_embeddings``."""

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Module, tokenizer_loader: Callable[[str], Any] | None = None):
        super().__init__()
        weight = word_embeddings.weight  # (V, C)
        n = config.num_virtual_tokens
        self.embedding = nn.Embedding(n, weight.shape[1], device=weight.device, dtype=torch.float32)
        with torch.no_grad():
            if config.prompt_tuning_init == "SAMPLE_VOCAB":
                rows = torch.randint(0, weight.shape[0], (n,), device=weight.device)
                self.embedding.weight.copy_(weight[rows].float())
            elif config.prompt_tuning_init == "TEXT":
                from seekdeep.auto import AutoTokenizer

                load = tokenizer_loader or AutoTokenizer.from_pretrained
                ids = load(config.tokenizer_name_or_path).encode(config.prompt_tuning_init_text)
                if not ids or max(ids) >= weight.shape[0]:
                    raise ConfigError("tokenizer_name_or_path", f"the tokenizer gives ids {ids[:8]} for the init text; "
                                      f"expected at least one id, all below the model's vocabulary size {weight.shape[0]}")
                ids = (ids * (n // len(ids) + 1))[:n]
                self.embedding.weight.copy_(weight[torch.tensor(ids, device=weight.device)].float())
            # RANDOM: nn.Embedding's normal(0, 1), as peft does

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.weight.shape[0]

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.embedding.weight[None].expand(batch_size, -1, -1)  # (B, n, C)


class PromptHooks:
    """The pre / post forward hooks that apply the active prompt-tuning adapter to a model.

    ``select(model)`` returns the PromptEmbedding to apply (or None) at each call."""

    def __init__(self, model: nn.Module, select: Callable[[nn.Module], PromptEmbedding | None]):
        self.select = select
        self._signature = inspect.signature(model.forward)
        self._added: int = 0
        self._handles = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            model.register_forward_hook(self._after, with_kwargs=True),
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _before(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]):
        self._added = 0
        prompt = self.select(model)
        if prompt is None:
            return None
        call = dict(self._signature.bind(*args, **kwargs).arguments)
        n = prompt.num_virtual_tokens
        mask = call.get("attention_mask")
        cache = call.get("past_key_values")
        if cache is not None and cache.seq_len > 0:  # decode step: the virtual tokens are in the cache
            if mask is not None:
                call["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
            return (), call
        embeds = call.get("inputs_embeds")
        if embeds is None:
            ids = call.get("input_ids")
            if ids is None:
                return None  # let forward raise its own error
            embeds = model.get_submodule("model.embed_tokens")(ids)  # (B, T, C)
        batch = embeds.shape[0]
        call["input_ids"] = None
        call["inputs_embeds"] = torch.cat([prompt(batch).to(embeds.dtype), embeds], dim=1)  # (B, n + T, C)
        if mask is not None:
            call["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        labels = call.get("labels")
        if labels is not None:
            call["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
        positions = call.get("position_ids")
        if positions is not None:
            start = torch.arange(n, device=positions.device).expand(positions.shape[0], n)
            call["position_ids"] = torch.cat([start, positions + n], dim=1)
        self._added = n
        return (), call

    def _after(self, model: nn.Module, args: tuple, kwargs: dict[str, Any], output):
        n, self._added = self._added, 0
        if not n:
            return None
        if output.hidden_states is not None:
            output.hidden_states = output.hidden_states[:, n:]
        if not kwargs.get("logits_to_keep"):
            output.logits = output.logits[:, n:]
        return output
