"""A shallower student initialised from its teacher: the same family and config with fewer
decoder layers, each a copy of a chosen teacher layer (attention backend state included),
plus copies of the embeddings, the final norm and the LM head."""

from __future__ import annotations

import copy
import dataclasses
import itertools
from typing import Any, Sequence

import torch
from torch import nn

from seekdeep.distill.config import select_layers
from seekdeep.errors import ConfigError
from seekdeep.models.base import CausalLM


def student_config(config: Any, layers: Sequence[int]):
    """``config`` with ``num_hidden_layers`` and every per-layer setting cut down to ``layers``
    (sorted teacher indices): llama's ``layer_types`` are subset, DeepSeek-V3's
    ``first_k_dense_replace`` becomes the number of kept layers that were dense (the kept layers
    are in order, so the dense ones still come first)."""
    from seekdeep.models.deepseek_v3 import DeepseekV3Config
    from seekdeep.models.llama import LlamaConfig

    updates: dict[str, Any] = {"num_hidden_layers": len(layers), "source": None}
    if isinstance(config, LlamaConfig):
        if config.layer_types is not None:
            updates["layer_types"] = [config.layer_types[i] for i in layers]
    elif isinstance(config, DeepseekV3Config):
        updates["first_k_dense_replace"] = sum(1 for i in layers if i < config.first_k_dense_replace)
    else:
        raise ConfigError("teacher", f"{type(config).__name__} has no known per-layer settings; make_student supports "
                          "llama-family (llama, mistral, qwen2, qwen3) and deepseek_v3 models")
    return dataclasses.replace(copy.deepcopy(config), **updates)


def make_student(teacher: CausalLM, layers: str | Sequence[int] = "every_other") -> CausalLM:
    """A student of ``teacher``'s class keeping the teacher layers ``layers`` (``"every_other"``
    = 0, 2, 4, ...; or sorted, distinct indices). The kept blocks, the embeddings, the final
    norm and the LM head are deep copies (ties such as tied embeddings are kept), on the
    teacher's device and dtype; the teacher is not modified. Every student parameter is
    trainable and the student is in the teacher's train / eval mode.

    Keeping every layer is allowed and gives an exact copy (``DistillConfig.student_layers``
    is what refuses a student that is not shallower). Teachers with adapters attached or
    quantised modules are refused: merge the adapters first; quantise the student afterwards.
    """
    if not isinstance(teacher, CausalLM):
        raise ConfigError("teacher", f"expected a seekdeep causal LM, got {type(teacher).__name__}")
    adapters = teacher.list_adapters()
    if adapters:
        raise ConfigError("teacher", f"has adapters attached ({', '.join(adapters)}); fold them in with "
                          "merge_and_unload() before building a student")
    if getattr(teacher, "quantization_config", None) is not None:
        raise ConfigError("teacher", "is quantised; distil from the float model and quantise the student afterwards")
    kept = select_layers(layers, len(teacher.model.layers))
    config = student_config(teacher.config, kept)

    with torch.device("meta"):  # the skeleton costs nothing: every tensor in it is replaced below
        student = type(teacher)(config)
    # One deepcopy call over all pieces, so tensors they share (a tied LM head) stay shared.
    embed, norm, lm_head, *blocks = copy.deepcopy(
        [teacher.model.embed_tokens, teacher.model.norm, teacher.lm_head, *(teacher.model.layers[i] for i in kept)]
    )
    student.model.embed_tokens, student.model.norm, student.lm_head = embed, norm, lm_head
    student.model.layers = nn.ModuleList(blocks)
    student.tie_weights()
    left_on_meta = [name for name, t in itertools.chain(student.named_parameters(), student.named_buffers()) if t.is_meta]
    if left_on_meta:  # a family with parts this function does not know how to copy
        raise ConfigError("teacher", f"{type(teacher).__name__} has parts make_student does not copy: {left_on_meta[:3]}")
    student.requires_grad_(True)
    student.train(teacher.training)
    return student

