"""What a training recipe needs to run under torchrun: the process group and mesh from a
``--parallel`` spec, the model laid out over it, rank-0-first data preparation and
rank-aware logging. ``seekdeep train`` uses it; the loop stays the recipe's own."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from seekdeep.errors import ConfigError
from seekdeep.parallel.config import ParallelConfig
from seekdeep.parallel.optim import PartsOptimizer
from seekdeep.parallel.parallelize import ParallelModel, build_mesh, init_distributed, parallelize


class DistributedRun:
    """One process's view of a distributed run: ``rank``, ``world_size``, ``device``,
    ``is_main`` (rank 0: logs, progress bars, metrics and the final model)."""

    def __init__(self, config: ParallelConfig, device: torch.device):
        self.device = device
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.config = config.resolved(self.world_size)
        self.mesh = build_mesh(self.config, device.type)
        self.model: ParallelModel | None = None

    @classmethod
    def start(cls, spec: str, precision: str = "fp32", activation_checkpointing: bool = False,
              compile: bool = False) -> "DistributedRun":
        """Parse ``spec`` (checked before the process group is joined), join the group."""
        config = ParallelConfig.from_string(spec, precision=precision)
        if activation_checkpointing or compile:
            config = ParallelConfig(**{**config.to_dict(),
                                       "activation_checkpointing": config.activation_checkpointing or activation_checkpointing,
                                       "compile": config.compile or compile})
        device = init_distributed()
        run = cls(config, device)
        if not run.is_main:
            # rank-0-only output: the other ranks' stdout (summaries, samples) goes nowhere;
            # stderr (warnings, errors) stays
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
        return run

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. builds a shared cache), the others after it."""
        if not self.is_main:
            dist.barrier()
        try:
            yield
        finally:
            if self.is_main:
                dist.barrier()

    def barrier(self) -> None:
        dist.barrier()

    def parallelize(self, model: nn.Module) -> ParallelModel:
        """Lay out a fully built (seeded, CPU) model: a meta-device shell of the same class is
        parallelized, then each rank copies its shards from ``model`` (so every layout starts
        from exactly the weights one process would train)."""
        self.config.check_model(model.config)
        with torch.device("meta"):
            shell = type(model)(model.config)
        shell.gradient_checkpointing = model.gradient_checkpointing
        self.model = parallelize(shell, self.mesh, self.config, device=self.device)
        self.model.materialize({k: v for k, v in model.state_dict().items()})
        return self.model

    def optimizer(self, make: Callable[[nn.Module], torch.optim.Optimizer]) -> PartsOptimizer:
        if self.model is None:
            raise ConfigError("model", "call parallelize() before optimizer()")
        optimizer = PartsOptimizer(self.model.parts, make)
        if self.model.tied:
            optimizer.register_step_post_hook(lambda *args: self.model.sync_tied_weights())
        return optimizer

    def mean(self, value: float) -> float:
        """The global-batch value of a per-rank loss."""
        return self.model.global_mean(value) if self.model is not None else float(value)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def check_recipe_config(parallel: str | None, attention_backend: str, indexer_warmup_steps: int,
                        fp8: bool = False) -> None:
    """Refuse, before anything starts, what a distributed ``train`` run cannot do."""
    if not parallel:
        return
    ParallelConfig.from_string(parallel)
    if fp8:
        raise ConfigError("fp8", "float8 training is not combined with --parallel yet; accepted: --no-fp8")
    if attention_backend == "dsa" and indexer_warmup_steps > 0:
        raise ConfigError(
            "indexer_warmup_steps",
            f"{indexer_warmup_steps} with --parallel: the indexer warm-up freezes the trunk mid-run, which DDP and FSDP "
            "gradient reduction do not allow; accepted: --indexer-warmup-steps 0, or another --attention-backend",
        )
