"""Per-GPU memory of a training layout, on paper: parameters, gradients and AdamW state after
pipeline / tensor / FSDP sharding, plus activations, the logits and FSDP's gathered blocks.

The model is what :func:`seekdeep.parallel.parallelize` does (see ``docs/scaling.md``):

- fp32 master weights, fp32 gradients (FSDP reduces in fp32), AdamW's two fp32 moments;
  FSDP divides all three by ``dp_shard``; DDP keeps full copies plus a gradient bucket copy.
- Tensor parallel divides the attention / MLP projections, the embedding and ``lm_head`` by
  ``tp``; norms, MLA's down-projections, the MoE router and the routed experts stay whole.
- The pipeline rank holding the most layers (plus the embedding or the head) is reported.
- Activations per micro-batch, per layer, in the compute dtype (Korthikanti et al. 2022 style,
  fused attention so no score matrix): the norm inputs/outputs (divided by ``tp`` with
  sequence parallelism), q/k/v and the attention output, the four SwiGLU intermediates; with
  activation checkpointing only each layer's input plus one layer being recomputed. 1F1B keeps
  up to ``pp`` micro-batches in flight on the first stage, GPipe all of them.
- Logits are gathered (not vocab-parallel), so they are not divided by ``tp``.

It is an estimate: allocator fragmentation, communication buffers and the CUDA context
(~1-2 GiB) come on top.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from seekdeep.errors import ConfigError
from seekdeep.parallel.config import ParallelConfig
from seekdeep.parallel.pipeline import stage_indices, stage_layer_ranges

GIB = 1024**3
_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class ParamCounts:
    """Parameters by where they live: ``*_sharded`` are divided by ``tp``, ``*_replicated`` not."""

    embed: int
    head: int  # lm_head (0 when tied to the embedding) + final norm
    layer_sharded: list[int]
    layer_replicated: list[int]

    @property
    def total(self) -> int:
        return self.embed + self.head + sum(self.layer_sharded) + sum(self.layer_replicated)


def count_parameters(config: Any) -> ParamCounts:
    """Exact parameter counts of a seekdeep Llama-family or DeepSeek-V3 config (sdpa/eager
    attention; backends with their own parameters add a little)."""
    h, v = config.hidden_size, config.vocab_size
    embed = v * h
    head = h + (0 if config.tie_word_embeddings else v * h)
    sharded, replicated = [], []
    if getattr(config, "model_type", "") == "deepseek_v3":
        heads, d_qk = config.num_attention_heads, config.qk_nope_head_dim + config.qk_rope_head_dim
        bias = 1 if config.attention_bias else 0
        for layer in range(config.num_hidden_layers):
            rep = 2 * h  # the two block norms
            if config.q_lora_rank is None:
                shard = h * heads * d_qk
            else:
                rep += (h + bias) * config.q_lora_rank + config.q_lora_rank
                shard = config.q_lora_rank * heads * d_qk
            rep += (h + bias) * (config.kv_lora_rank + config.qk_rope_head_dim) + config.kv_lora_rank
            shard += config.kv_lora_rank * heads * (config.qk_nope_head_dim + config.v_head_dim)
            shard += heads * config.v_head_dim * h
            rep += bias * h  # o_proj bias is added after the all-reduce: replicated
            if layer >= config.first_k_dense_replace:
                e, i = config.n_routed_experts, config.moe_intermediate_size
                rep += e * h + e * 3 * h * i  # router + routed experts (unsharded)
                shard += 3 * h * i * config.n_shared_experts
            else:
                shard += 3 * h * config.intermediate_size
            sharded.append(shard)
            replicated.append(rep)
        return ParamCounts(embed, head, sharded, replicated)
    heads, kv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    qkv_bias = 1 if (config.attention_bias or config.qkv_bias) else 0
    mlp_bias = 1 if config.mlp_bias else 0
    i = config.intermediate_size
    for _ in range(config.num_hidden_layers):
        shard = (h + qkv_bias) * (heads + 2 * kv) * d + heads * d * h + 2 * (h + mlp_bias) * i + i * h
        rep = 2 * h + (h if config.attention_bias else 0) + (h if mlp_bias else 0) + (2 * d if config.qk_norm else 0)
        sharded.append(shard)
        replicated.append(rep)
    return ParamCounts(embed, head, sharded, replicated)


@dataclass
class MemoryEstimate:
    """Bytes per GPU (the most loaded rank)."""

    parameters: int
    gradients: int
    optimizer: int
    gathered: int  # FSDP's unsharded blocks in flight (or DDP's gradient buckets)
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.gathered + self.activations + self.logits

    @property
    def total_gib(self) -> float:
        return self.total / GIB

    def to_gib(self) -> dict[str, float]:
        out = {k: round(val / GIB, 2) for k, val in asdict(self).items()}
        out["total"] = round(self.total_gib, 2)
        return out


def _layer_activation_bytes(config: Any, layer: int, tokens: int, tp: int, sp: bool, elem: int) -> int:
    h = config.hidden_size
    h_sp = h // tp if sp else h
    norms = 4 * h_sp  # input and output of both block norms
    if getattr(config, "model_type", "") == "deepseek_v3":
        heads = config.num_attention_heads // tp
        d_qk = config.qk_nope_head_dim + config.qk_rope_head_dim
        attn = (config.q_lora_rank or 0) * 2 + config.kv_lora_rank * 2 + heads * (2 * d_qk + 2 * config.v_head_dim)
        if layer >= config.first_k_dense_replace:
            i = config.moe_intermediate_size
            k = config.num_experts_per_tok
            mlp = k * (h + 4 * i) + 4 * i * config.n_shared_experts // tp
        else:
            mlp = 4 * config.intermediate_size // tp
    else:
        heads, kv, d = config.num_attention_heads // tp, config.num_key_value_heads // tp, config.head_dim
        attn = (2 * heads + 2 * kv) * d  # q, k, v and the attention output
        mlp = 4 * config.intermediate_size // tp
    return tokens * (elem * (norms + attn + mlp) + 4 * config.num_attention_heads // tp)  # + fp32 softmax stats


def estimate_memory(config: Any, layout: ParallelConfig, *, seq_len: int, micro_batch_size: int,
                    activation_checkpointing: bool | None = None) -> MemoryEstimate:
    """Per-GPU bytes for training ``config`` with ``layout`` (its ``precision`` is the compute
    dtype; ``activation_checkpointing`` defaults to the layout's flag)."""
    for name, value in (("seq_len", seq_len), ("micro_batch_size", micro_batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(name, f"must be an integer >= 1, got {value!r}")
    if layout.dp_shard == -1:
        raise ConfigError("dp_shard", "is -1; resolve the layout for a world size first (layout.resolved(world))")
    layout.check_model(config)
    ac = layout.activation_checkpointing if activation_checkpointing is None else activation_checkpointing
    tp, pp, shard = layout.tp, layout.pp, layout.dp_shard
    sp = layout.sequence_parallel and tp > 1
    elem = _DTYPE_BYTES[layout.precision]
    counts = count_parameters(config)
    ranges = stage_layer_ranges(config.num_hidden_layers, layout.num_stages)

    worst = None
    for pp_rank in range(pp):
        stages = stage_indices(pp_rank, layout)
        layers = [i for s in stages for i in range(*ranges[s])]
        params = sum(counts.layer_sharded[i] for i in layers) / tp + sum(counts.layer_replicated[i] for i in layers)
        if 0 in stages:
            params += counts.embed / tp
        last = layout.num_stages - 1 in stages
        if last:
            params += counts.head / tp if not config.tie_word_embeddings or pp > 1 else counts.head
            if config.tie_word_embeddings and pp > 1:
                params += config.vocab_size * config.hidden_size / tp  # the last stage's copy
        block = max((counts.layer_sharded[i] / tp + counts.layer_replicated[i] for i in layers), default=0)
        tokens = seq_len * micro_batch_size
        per_layer = [_layer_activation_bytes(config, i, tokens, tp, sp, elem) for i in layers]
        if ac:
            h_sp = config.hidden_size // tp if sp else config.hidden_size
            acts = len(layers) * tokens * h_sp * elem + max(per_layer, default=0)
        else:
            acts = sum(per_layer)
        if pp > 1:
            n = layout.microbatches
            acts *= n if layout.pp_schedule == "GPipe" else min(n, pp)
        logits = tokens * config.vocab_size * (elem + 8) if last else 0
        local = params / shard
        if shard > 1 or layout.dp_replicate > 1 and not layout.uses_ddp:
            gathered = 3 * elem * block  # prefetched + current unsharded block, its unsharded grads
        elif layout.uses_ddp:
            gathered = 4 * params  # DDP's gradient buckets
        else:
            gathered = 0
        estimate = MemoryEstimate(
            parameters=int(4 * local), gradients=int(4 * local), optimizer=int(8 * local),
            gathered=int(gathered), activations=int(acts), logits=int(logits),
        )
        if worst is None or estimate.total > worst.total:
            worst = estimate
    return worst
