"""ZeRO-style sharding with FSDP2 (``fully_shard``): parameters, gradients and optimizer state
are sharded over the data-parallel ranks; each block all-gathers its parameters just before
it runs and reduce-scatters its gradients as soon as its backward is done.

On a 2-D ``(dp_replicate, dp_shard)`` mesh this is HSDP: sharded inside a group, replicated
(gradients all-reduced) across groups.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from seekdeep.train.precision import PRECISIONS


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    """FSDP2's policy for a run's precision (the same names as ``PrecisionPolicy``):
    parameters are all-gathered and computed in that dtype, gradients reduced in fp32, and
    the sharded master weights stay fp32."""
    dtype = PRECISIONS[precision]
    if dtype == torch.float32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def apply_fsdp(
    model: nn.Module, dp_mesh: DeviceMesh, precision: str = "fp32", reshard_after_forward: bool = True
) -> nn.Module:
    """Shard each decoder block as its own FSDP unit, then the rest (embeddings, final norm,
    ``lm_head``) as the root unit. ``reshard_after_forward=False`` keeps parameters gathered
    between forward and backward (used under pipelining, where the micro-batches would
    otherwise all-gather again each time)."""
    policy = mixed_precision_policy(precision)
    for layer in model.model.layers:
        fully_shard(layer, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model
