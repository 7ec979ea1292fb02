"""Tensor parallelism (Megatron-style) with DTensor, applied to an unmodified model.

Each block's attention shards its heads: the query/key/value projections are column-parallel
(each rank computes its own heads), the output projection row-parallel (partial sums
all-reduced, or reduce-scattered along the sequence with sequence parallelism). The SwiGLU
MLP shards its intermediate width the same way. The token embedding is row-parallel over the
vocabulary and ``lm_head`` column-parallel, gathered back so the loss sees full logits.

Sequence parallelism (optional) keeps the residual stream and the norms sharded along the
sequence between the tensor-parallel regions: the stream is a ``DTensor`` placed
``Shard(1)``, so the model code still sees the global shape.

The attention modules keep their head counts in ``num_heads`` / ``num_kv_heads``; after
sharding those are set to the local counts (as torchtitan does), so the model's own
``view(b, t, num_heads, head_dim)`` reshapes the local slice.

MoE layers: the router and the routed experts are left unsharded (every tensor-parallel rank
runs all experts on the full token set; FSDP still shards them over data-parallel ranks);
the shared experts are column/row-parallel like a dense MLP.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from seekdeep.errors import ConfigError

# Attention blocks are called as self_attn(x, cos, sin, mask, cache, layer_idx).
_ATTN_ARGS = 6


class _SumGradSlice(torch.autograd.Function):
    """Identity forward; backward all-reduces ``grad[..., start:]`` over ``group``.

    MLA's shared RoPE key ``k_pe`` is computed once (replicated) and then used by the local
    heads only, so each rank holds a partial gradient for it; the latent part of the same
    projection output already receives a complete gradient through ``kv_b_proj``'s
    column-parallel boundary."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, start: int, group) -> torch.Tensor:
        ctx.start, ctx.group = start, group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        part = grad[..., ctx.start:].contiguous()
        dist.all_reduce(part, group=ctx.group)
        grad[..., ctx.start:] = part
        return grad, None, None


def _attention_plan(attn: nn.Module, prefix: str, sp: bool) -> tuple[dict, bool]:
    """Plan for one attention module; returns (plan, whether its input must be a local tensor)."""
    from seekdeep.models.llama import LlamaAttention
    from seekdeep.models.mla import MultiHeadLatentAttention

    out_layout = Shard(1) if sp else Replicate()
    plan: dict = {f"{prefix}.o_proj": RowwiseParallel(output_layouts=out_layout, use_local_output=not sp)}
    if isinstance(attn, LlamaAttention):
        for name in ("q_proj", "k_proj", "v_proj"):
            plan[f"{prefix}.{name}"] = ColwiseParallel()
        if attn.q_norm is not None:  # per-head norms: weights shared by heads on every rank
            plan[f"{prefix}.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
            plan[f"{prefix}.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        # A backend with its own parameters (the gate) reads the attention input as a plain tensor.
        needs_local = any(True for _ in attn.inner.parameters())
        if needs_local:
            plan[f"{prefix}.inner.gate_out"] = ColwiseParallel()
        return plan, needs_local
    if isinstance(attn, MultiHeadLatentAttention):
        plan[f"{prefix}.q_proj" if attn.q_lora_rank is None else f"{prefix}.q_b_proj"] = ColwiseParallel()
        plan[f"{prefix}.kv_b_proj"] = ColwiseParallel()
        if any(True for _ in attn.inner.parameters()):
            plan[f"{prefix}.inner.gate_out"] = ColwiseParallel()
        return plan, True
    raise ConfigError("tp", f"no tensor-parallel plan for attention module {type(attn).__name__}; accepted: "
                      "LlamaAttention, MultiHeadLatentAttention")


def _mlp_plan(mlp: nn.Module, prefix: str, sp: bool) -> dict:
    from seekdeep.models.llama import SwiGLU
    from seekdeep.models.moe import DeepseekV3MoE

    def swiglu(p: str, output_layout) -> dict:
        return {
            f"{p}.gate_proj": ColwiseParallel(),
            f"{p}.up_proj": ColwiseParallel(),
            f"{p}.down_proj": RowwiseParallel(output_layouts=output_layout, use_local_output=output_layout == Replicate()),
        }

    if isinstance(mlp, SwiGLU):
        plan = swiglu(prefix, Shard(1) if sp else Replicate())
        if sp:
            plan[prefix] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
        return plan
    if isinstance(mlp, DeepseekV3MoE):
        plan = swiglu(f"{prefix}.shared_experts", Replicate()) if mlp.shared_experts is not None else {}
        if sp:
            plan[prefix] = PrepareModuleInputOutput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_input=True,
                output_layouts=(Replicate(),), desired_output_layouts=(Shard(1),), use_local_output=False,
            )
        return plan
    raise ConfigError("tp", f"no tensor-parallel plan for MLP module {type(mlp).__name__}; accepted: SwiGLU, DeepseekV3MoE")


def _localize_heads(attn: nn.Module, tp: int) -> None:
    for name in ("num_heads", "num_kv_heads"):
        value = getattr(attn, name, None)
        if value is not None:
            if value % tp:
                raise ConfigError("tp", f"{tp} does not divide {type(attn).__name__}.{name}={value}")
            setattr(attn, name, value // tp)


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = True) -> nn.Module:
    """Shard ``model`` (a seekdeep ``CausalLM``, possibly one pipeline stage of it) over
    ``tp_mesh`` in place and return it. Works on the meta device (before ``to_empty``)."""
    from seekdeep.attention.dsa import DynamicSparseAttention
    from seekdeep.models.mla import MultiHeadLatentAttention

    tp = tp_mesh.size()
    sp = sequence_parallel
    decoder = model.model
    embed = decoder.embed_tokens
    lm_head = model.lm_head
    tied = isinstance(embed, nn.Embedding) and isinstance(lm_head, nn.Linear) and lm_head.weight is embed.weight

    top: dict = {}
    if isinstance(embed, nn.Embedding):
        top["model.embed_tokens"] = RowwiseParallel(
            input_layouts=Replicate(), output_layouts=Shard(1) if sp else Replicate(), use_local_output=not sp
        )
    if sp and not isinstance(decoder.norm, nn.Identity):
        top["model.norm"] = SequenceParallel()
    if isinstance(lm_head, nn.Linear):
        top["lm_head"] = ColwiseParallel(
            input_layouts=Shard(1) if sp else Replicate(), output_layouts=Replicate(), use_local_output=True
        )
    if top:
        parallelize_module(model, tp_mesh, top)
    if tied:  # both are sharded over the vocabulary (Shard(0)): share one DTensor again
        model.lm_head.weight = decoder.embed_tokens.weight

    for layer in decoder.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if any(isinstance(m, DynamicSparseAttention) for m in attn.modules()):
            raise ConfigError("tp", "attention_backend 'dsa' cannot be head-sharded; accepted with tp > 1: eager, sdpa, gated")
        plan, attn_local = _attention_plan(attn, "self_attn", sp)
        plan.update(_mlp_plan(mlp, "mlp", sp))
        if sp:
            plan["input_layernorm"] = SequenceParallel()
            plan["post_attention_layernorm"] = SequenceParallel()
            plan["self_attn"] = PrepareModuleInput(
                input_layouts=(Shard(1),) + (None,) * (_ATTN_ARGS - 1),
                desired_input_layouts=(Replicate(),) + (None,) * (_ATTN_ARGS - 1),
                use_local_output=attn_local,
            )
        parallelize_module(layer, tp_mesh, plan)
        _localize_heads(attn, tp)
        if isinstance(attn, MultiHeadLatentAttention):
            group, start = tp_mesh.get_group(), attn.kv_lora_rank
            attn.kv_a_proj_with_mqa.register_forward_hook(
                lambda mod, args, out, start=start, group=group: _SumGradSlice.apply(out, start, group)
            )
    return model
