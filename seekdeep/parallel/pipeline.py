"""Pipeline parallelism with ``torch.distributed.pipelining``: manual stage splitting of an
unmodified ``CausalLM`` plus a schedule (1F1B, interleaved 1F1B or GPipe).

A stage is the model itself with the layers of other stages removed: the first stage keeps
the token embedding, the last the final norm and ``lm_head``; parameter names stay those of
the full model (``model.layers.5...`` stays ``5``), so distributed checkpoints move between
pipeline and non-pipeline layouts. Two hooks adapt the stage's call to what the schedule
passes around (a tensor in, a tensor out): later stages feed the hidden state in as
``inputs_embeds``, and every stage returns ``logits`` (the hidden state, for all but the
last stage, whose norm and head are identities).

Tied embeddings: the first stage's embedding and the last stage's ``lm_head`` are two copies
of one matrix; their gradients are summed across the two stages after each backward (as
Megatron-LM does), so both copies stay equal.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from seekdeep.errors import ConfigError
from seekdeep.parallel.config import ParallelConfig


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, the same as ``CausalLM.forward(labels=...)`` computes."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def stage_layer_ranges(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` layer ranges per stage: as even as possible, earlier stages take the
    remainder (the last stage also runs the norm, ``lm_head`` and the loss)."""
    if num_stages > num_layers:
        raise ConfigError("pp", f"{num_stages} stages for {num_layers} layers; accepted: at most {num_layers} stages")
    base, extra = divmod(num_layers, num_stages)
    ranges, lo = [], 0
    for s in range(num_stages):
        hi = lo + base + (1 if s < extra else 0)
        ranges.append((lo, hi))
        lo = hi
    return ranges


def stage_indices(pp_rank: int, config: ParallelConfig) -> list[int]:
    """Stages held by a pipeline rank: one for 1F1B / GPipe, ``pp_virtual_stages`` in a loop
    (rank r holds r, r + pp, r + 2pp, ...) for the interleaved schedule."""
    return [pp_rank + v * config.pp for v in range(config.pp_virtual_stages)]


class _KeptLayers(nn.ModuleList):
    """A ``ModuleList`` of some layers that keeps their original indices as names."""

    def __init__(self, layers: dict[int, nn.Module]):
        super().__init__()
        for index, layer in layers.items():
            self._modules[str(index)] = layer


def make_stage(model: nn.Module, stage: int, num_stages: int, tp_mesh: DeviceMesh | None = None,
               sequence_parallel: bool = False) -> nn.Module:
    """Turn ``model`` (in place) into pipeline stage ``stage`` of ``num_stages``."""
    decoder = model.model
    num_layers = len(decoder.layers)
    lo, hi = stage_layer_ranges(num_layers, num_stages)[stage]
    first, last = stage == 0, stage == num_stages - 1
    full_windows = model.sliding_windows()
    decoder.layers = _KeptLayers({i: decoder.layers[i] for i in range(lo, hi)})
    if full_windows is not None:  # the decoder indexes windows by position in its own layer list
        model.sliding_windows = lambda windows=full_windows[lo:hi]: windows
    if getattr(model.config, "tie_word_embeddings", False):
        # each stage holds its own copy (see the module docstring); init_weights must not re-tie
        model.config = copy.copy(model.config)
        model.config.tie_word_embeddings = False
    if not first:
        decoder.embed_tokens = None
    if not last:
        decoder.norm = nn.Identity()
        model.lm_head = nn.Identity()
    model.pipeline_stage = stage
    model.register_forward_pre_hook(_stage_inputs(first, tp_mesh, sequence_parallel), with_kwargs=True)
    model.register_forward_hook(_stage_output)
    return model


def _stage_inputs(first: bool, tp_mesh: DeviceMesh | None, sequence_parallel: bool):
    def hook(module, args, kwargs):
        (x,) = args
        if first:
            return (), {"input_ids": x}
        if tp_mesh is not None and sequence_parallel:
            # the previous stage sent this tensor-parallel rank's slice of the sequence
            x = DTensor.from_local(x, tp_mesh, (Shard(1),), run_check=False)
        return (), {"inputs_embeds": x}

    return hook


def _stage_output(module, args, output):
    # With sequence parallelism each tensor-parallel rank sends only its slice of the
    # sequence to its peer in the next stage (no gather, 1/tp of the bytes).
    out = output.logits
    return out.to_local() if isinstance(out, DTensor) else out


def split_model(
    model: nn.Module, pp_rank: int, config: ParallelConfig, tp_mesh: DeviceMesh | None = None
) -> list[tuple[int, nn.Module]]:
    """The (stage index, stage module) pairs this pipeline rank holds. The first reuses
    ``model``; further (virtual) stages are deep copies, so build the model on the meta
    device when it is large."""
    indices = stage_indices(pp_rank, config)
    parts = []
    for k, stage in enumerate(indices):
        source = model if k == len(indices) - 1 else copy.deepcopy(model)
        parts.append((stage, make_stage(source, stage, config.num_stages, tp_mesh, config.sequence_parallel and config.tp > 1)))
    return parts


def build_schedule(parts: list[tuple[int, nn.Module]], config: ParallelConfig, pp_mesh: DeviceMesh,
                   device: torch.device, loss_fn: Callable):
    """PipelineStage objects for the local parts and the configured schedule over them.
    Gradients are not rescaled by the schedule: ``loss_fn`` divides by the micro-batch count
    itself, so gradient accumulation across steps stays exact."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    group = pp_mesh.get_group()
    stages = [PipelineStage(part, stage, config.num_stages, device, group=group) for stage, part in parts]
    n = config.microbatches
    if config.pp_schedule == "Interleaved1F1B":
        return ScheduleInterleaved1F1B(stages, n, loss_fn=loss_fn, scale_grads=False)
    cls = Schedule1F1B if config.pp_schedule == "1F1B" else ScheduleGPipe
    return cls(stages[0], n, loss_fn=loss_fn, scale_grads=False)
