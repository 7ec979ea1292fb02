"""Sequence classification: a causal LM's trunk with a linear ``score`` head read at the last
real token of each row, as transformers' ``LlamaForSequenceClassification`` (and its Mistral /
Qwen2 / Qwen3 twins) do. Weights and config.json are interchangeable with transformers: the
trunk keeps the ``model.*`` names, the head is ``score.weight`` (no bias), and the labels live
in ``id2label`` / ``label2id`` / ``problem_type``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seekdeep.errors import ConfigError
from seekdeep.models import family
from seekdeep.models.base import CausalLM

PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")


@dataclass
class ClassificationHeadConfig:
    """The head's settings, stored in config.json next to the trunk's (transformers' keys).

    ``id2label``: label names by class index (default ``LABEL_0`` ...); ``problem_type``: how
    ``labels`` are scored (None: regression for one output, else single- or multi-label from the
    labels' dtype, as transformers decides)."""

    num_labels: int = 2
    id2label: dict[int, str] = field(default_factory=dict)
    problem_type: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.num_labels, bool) or not isinstance(self.num_labels, int) or self.num_labels < 1:
            raise ConfigError("num_labels", f"must be an int >= 1, got {self.num_labels!r}")
        if not self.id2label:
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)}
        self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
        if sorted(self.id2label) != list(range(self.num_labels)):
            raise ConfigError("id2label", f"needs one name for each class 0..{self.num_labels - 1}, got keys "
                              f"{sorted(self.id2label)}")
        if len(set(self.id2label.values())) != self.num_labels:
            raise ConfigError("id2label", f"label names must be distinct, got {list(self.id2label.values())}")
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ConfigError("problem_type", f"got {self.problem_type!r}; accepted: None, {', '.join(PROBLEM_TYPES)}")

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in self.id2label.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"num_labels": self.num_labels, "id2label": {str(k): v for k, v in self.id2label.items()},
                "label2id": self.label2id, "problem_type": self.problem_type}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | None = None) -> "ClassificationHeadConfig":
        id2label = d.get("id2label") or {}
        if not isinstance(id2label, dict):
            raise ConfigError("id2label", f"must be an object, got {type(id2label).__name__}", source=source)
        num_labels = d.get("num_labels", len(id2label) or 2)
        return cls(num_labels=num_labels, id2label=id2label, problem_type=d.get("problem_type"))


@dataclass
class SequenceClassifierOutput:
    logits: torch.Tensor  # (B, num_labels)
    loss: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None  # (B, T, C) last layer, after the final norm
    aux_loss: torch.Tensor | None = None  # e.g. the DSA indexer's KL loss, summed over layers


def last_token_index(input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                     pad_token_id: int | None, batch: int, length: int, device) -> torch.Tensor:
    """Column of each row's last real token (B,). The attention mask decides when given (so
    ``inputs_embeds``, as gradient attributions pass, pool correctly too); otherwise the rightmost
    token that is not ``pad_token_id``, transformers' rule; with neither, the last column."""
    columns = torch.arange(length, device=device)
    if attention_mask is not None:
        return (columns * attention_mask.to(device).long()).argmax(-1)
    if input_ids is not None and pad_token_id is not None:
        return (columns * (input_ids != pad_token_id).long()).argmax(-1)
    if batch > 1 and input_ids is not None:
        raise ConfigError("pad_token_id", "a batch of several rows needs an attention_mask or a pad_token_id "
                          "in the config to find each row's last token")
    return torch.full((batch,), length - 1, device=device, dtype=torch.long)


class ForSequenceClassification(CausalLM):
    """Trunk of any seekdeep family (by ``config.model_type``) + ``score`` head.

    ``model(input_ids=..., attention_mask=...).logits`` is (batch, num_labels). ``head``: a
    :class:`ClassificationHeadConfig` (default: two labels)."""

    def __init__(self, config, head: ClassificationHeadConfig | None = None):
        super().__init__(config)
        _, causal_cls = family(config.model_type)
        causal = causal_cls(config)  # built for its trunk only; the LM head is dropped
        self.model = causal.model
        self.adapter_class = causal.adapter_class
        self._sliding_windows = causal.sliding_windows()
        self._causal_name = type(causal).__name__
        self.head_config = head if head is not None else ClassificationHeadConfig()
        self.score = nn.Linear(config.hidden_size, self.head_config.num_labels, bias=False)

    @property
    def num_labels(self) -> int:
        return self.head_config.num_labels

    @property
    def id2label(self) -> dict[int, str]:
        return self.head_config.id2label

    @property
    def label2id(self) -> dict[str, int]:
        return self.head_config.label2id

    def sliding_windows(self) -> list[int | None] | None:
        return self._sliding_windows

    def tie_weights(self) -> None:  # no LM head to tie
        return None

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> SequenceClassifierOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("input_ids / inputs_embeds: pass exactly one of them")
        if input_ids is not None and input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected shape (batch, seq), got {tuple(input_ids.shape)}")
        hidden = self.model(input_ids, attention_mask, position_ids, None, inputs_embeds, self.sliding_windows())  # (B, T, C)
        batch, length = hidden.shape[:2]
        last = last_token_index(input_ids, attention_mask, self.config.pad_token_id, batch, length, hidden.device)
        # Pool before the head: one (B, C) row per sequence instead of scoring every position.
        pooled = hidden[torch.arange(batch, device=hidden.device), last]  # (B, C)
        logits = self.score(pooled)  # (B, num_labels)
        loss = None if labels is None else self.loss(logits, labels)
        aux = [m.indexer_loss for m in self.modules() if getattr(m, "indexer_loss", None) is not None]
        return SequenceClassifierOutput(logits=logits, loss=loss, hidden_states=hidden,
                                        aux_loss=torch.stack(aux).sum() if aux else None)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """transformers' choice: MSE for one output, cross-entropy for integer labels, BCE
        with logits for multi-hot float labels (unless ``problem_type`` says otherwise)."""
        kind = self.head_config.problem_type
        if kind is None:
            if self.num_labels == 1:
                kind = "regression"
            elif labels.dtype in (torch.long, torch.int):
                kind = "single_label_classification"
            else:
                kind = "multi_label_classification"
        labels = labels.to(logits.device)
        if kind == "regression":
            return F.mse_loss(logits.float().squeeze(-1), labels.float().view(-1)) if self.num_labels == 1 \
                else F.mse_loss(logits.float(), labels.float())
        if kind == "single_label_classification":
            bad = (labels < 0) | (labels >= self.num_labels)
            if bool(bad.any()):
                raise ConfigError("labels", f"class indices must lie in 0..{self.num_labels - 1}, got "
                                  f"{labels[bad][:5].tolist()}")
            return F.cross_entropy(logits.float(), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())

    def generate(self, *args, **kwargs):
        raise ConfigError("model", f"{type(self).__name__} scores whole sequences and cannot generate; "
                          "load the checkpoint with AutoModelForCausalLM to generate text")

    stream_generate = generate

    # -- persistence
    def hf_architecture(self) -> str:
        return self._causal_name.replace("ForCausalLM", "ForSequenceClassification")

    def save_pretrained(self, save_directory: str | os.PathLike, max_shard_size: int | str = "5GB") -> None:
        from seekdeep.files import write_json_atomic
        from seekdeep.models.loading import CONFIG_NAME, save_pretrained

        save_pretrained(self, save_directory, max_shard_size=max_shard_size)
        # The shared writer names the causal LM class; add the head's keys and its own class.
        config = self.config.to_hf_dict()
        config["dtype"] = str(self.dtype).removeprefix("torch.")
        config.update(self.head_config.to_dict())
        config["architectures"] = [self.hf_architecture()]
        write_json_atomic(Path(save_directory) / CONFIG_NAME, config)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, dtype=None, device=None, num_labels: int | None = None,
                        id2label: dict[int, str] | None = None, **overrides: Any) -> "ForSequenceClassification":
        """Load a sequence-classification checkpoint, or a causal LM checkpoint whose trunk gets a
        fresh (normal(0, initializer_range)) head of ``num_labels`` / ``id2label`` classes, as
        transformers does when a base model is fine-tuned for classification."""
        from seekdeep.files import read_json
        from seekdeep.models.loading import (
            CONFIG_NAME,
            _materialise_fresh,
            config_from_dict,
            load_pretrained,
            parse_dtype,
            read_checkpoint_state,
            resolve_model_dir,
        )

        model_dir = resolve_model_dir(path_or_id)
        config_path = model_dir / CONFIG_NAME
        raw = read_json(config_path)
        raw.update(overrides)
        head_keys = {k: raw[k] for k in ("num_labels", "id2label", "problem_type") if k in raw}
        is_classifier = any(str(a).endswith("ForSequenceClassification") for a in raw.get("architectures") or [])
        if num_labels is not None or id2label is not None:
            head_keys = {"num_labels": num_labels or len(id2label or {}) or 2, "id2label": id2label or {},
                         "problem_type": head_keys.get("problem_type")}
        head = ClassificationHeadConfig.from_dict(head_keys, source=str(config_path))
        if not is_classifier:  # a causal LM: keep its trunk, give it a fresh head
            return cls.from_causal_lm(load_pretrained(model_dir, dtype=dtype, device=device, **overrides), head)
        config = config_from_dict(raw, source=str(config_path))
        torch_dtype = parse_dtype(dtype, raw)
        device = torch.device(device) if device is not None else torch.device("cpu")
        with torch.device("meta"):
            model = cls(config, head)
        state, fresh = read_checkpoint_state(model, model_dir, dtype=torch_dtype, device=device)
        if state["score.weight"].shape[0] != head.num_labels:
            raise ConfigError("num_labels", f"the checkpoint's head has {state['score.weight'].shape[0]} classes, "
                              f"not {head.num_labels}", source=str(config_path))
        model.load_state_dict(state, strict=False, assign=True)
        if fresh:  # backend parameters (DSA indexer, attention gate) a plain checkpoint has no values for
            _materialise_fresh(model, fresh, device, torch_dtype)
        model.eval()
        return model

    @classmethod
    def from_causal_lm(cls, causal: CausalLM, head: ClassificationHeadConfig | None = None) -> "ForSequenceClassification":
        """A classifier sharing ``causal``'s trunk (its modules, not a copy) with a fresh head."""
        with torch.device("meta"):
            model = cls(causal.config, head)
        model.model = causal.model
        model.score = nn.Linear(causal.config.hidden_size, model.num_labels, bias=False,
                                device=causal.device, dtype=causal.dtype)
        with torch.no_grad():
            nn.init.normal_(model.score.weight, std=getattr(causal.config, "initializer_range", 0.02))
        model.train(causal.training)
        return model


# transformers' name for the llama family's class.
LlamaForSequenceClassification = ForSequenceClassification
