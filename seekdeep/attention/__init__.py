"""Attention backends, chosen by name from one registry.

``eager`` is the reference; ``sdpa`` uses torch's fused kernel; ``dsa`` is dynamic sparse
attention (a small indexer picks the top-k keys per query, or with ``block_size`` > 1 the top
key blocks per query block, see :mod:`seekdeep.attention.block_sparse`); ``gated`` multiplies each head's
output by a learned gate. All share the signature documented in :mod:`seekdeep.attention.base`.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from seekdeep.attention.base import AttentionMask, AttentionSpec, repeat_kv
from seekdeep.errors import UnknownBackendError

_BACKENDS: dict[str, Callable[[AttentionSpec], nn.Module]] = {}


def register_attention(name: str):
    """Class decorator / function registering a backend factory under ``name``."""

    def wrap(factory):
        _BACKENDS[name] = factory
        return factory

    return wrap


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def build_attention(name: str, spec: AttentionSpec) -> nn.Module:
    if name not in _BACKENDS:
        raise UnknownBackendError(
            "attention_backend", f"unknown backend {name!r}; accepted: {', '.join(available_backends())}"
        )
    return _BACKENDS[name](spec)


def _register_builtin() -> None:
    from seekdeep.attention.dense import EagerAttention, SDPAAttention
    from seekdeep.attention.dsa import DynamicSparseAttention
    from seekdeep.attention.gated import GatedAttention

    register_attention("eager")(EagerAttention)
    register_attention("sdpa")(SDPAAttention)
    register_attention("dsa")(DynamicSparseAttention)
    register_attention("gated")(GatedAttention)


_register_builtin()

__all__ = [
    "AttentionMask",
    "AttentionSpec",
    "available_backends",
    "build_attention",
    "register_attention",
    "repeat_kv",
]
