"""Distributed training on torch.distributed: one ``parallelize`` over an unmodified model.

- :class:`ParallelConfig` / :func:`build_mesh`: the layout (``pp x dp_replicate x dp_shard x tp``).
- :func:`parallelize`: pipeline stages (torch.distributed.pipelining), tensor parallel
  (DTensor), FSDP2 / HSDP or DDP, activation checkpointing, per-block compile.
- :mod:`~seekdeep.parallel.compression`: DDP communication hooks (bf16, PowerSGD, int4).
- :mod:`~seekdeep.parallel.checkpoint`: resharding checkpoints with torch.distributed.checkpoint.
- :mod:`~seekdeep.parallel.launch`: ``seekdeep launch`` (torchrun, elastic) and Kubeflow manifests.
- :mod:`~seekdeep.parallel.memory`: per-GPU memory estimate of a layout.
"""

from seekdeep.parallel.config import ParallelConfig
from seekdeep.parallel.parallelize import (
    DistributedDataParallel,
    ParallelModel,
    TensorParallel,
    build_mesh,
    clip_grad_norm_,
    init_distributed,
    parallelize,
    world_info,
)

__all__ = [
    "DistributedDataParallel",
    "ParallelConfig",
    "ParallelModel",
    "TensorParallel",
    "build_mesh",
    "clip_grad_norm_",
    "init_distributed",
    "parallelize",
    "world_info",
]
