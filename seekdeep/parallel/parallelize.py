"""One function lays an unmodified single-device model out over a device mesh.

``parallelize(model, mesh, ParallelConfig(...))`` applies, in torchtitan's order: pipeline
split (``pp``) -> tensor parallel (``tp``) -> activation checkpointing -> per-block compile ->
FSDP2 (``dp_shard``, or HSDP with ``dp_replicate``) or DDP (plain ``dp_replicate``). Build
the model under ``torch.device("meta")`` and call :meth:`ParallelModel.materialize` to
allocate only the local shards and initialise or load them.

Under torchrun::

    device = init_distributed()
    config = ParallelConfig(dp_shard=2, tp=2)
    mesh = build_mesh(config, device.type)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig.from_name("small"))
    pm = parallelize(model, mesh, config, device=device)
    pm.materialize()                      # or materialize(state_dict) / a DCP load
    loss = pm.forward_backward(pm.local_batch(batch))
"""

from __future__ import annotations

import contextlib
import os
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from seekdeep.errors import ConfigError
from seekdeep.parallel.config import ParallelConfig
from seekdeep.parallel.fsdp import apply_fsdp
from seekdeep.parallel.pipeline import build_schedule, causal_lm_loss, split_model
from seekdeep.parallel.tp import apply_tensor_parallel

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


# ----------------------------------------------------------------------------- process group and mesh


def init_distributed(backend: str | None = None) -> torch.device:
    """Join the process group torchrun describes in the environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``...): NCCL with one GPU per process when CUDA is present,
    else gloo. Returns this process's device. A no-op when already initialised."""
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ConfigError(
                "parallel", f"not started by torchrun ({', '.join(missing)} unset); run under "
                "`seekdeep launch --nproc N -- ...` or `torchrun --nproc-per-node N ...`",
            )
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend)
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def mesh_shape(config: ParallelConfig, world_size: int) -> list[tuple[str, int]]:
    """The named mesh dimensions this layout needs (sizes > 1 only, outermost first)."""
    cfg = config.resolved(world_size)
    dims = []
    if cfg.pp > 1:
        dims.append(("pp", cfg.pp))
    if cfg.dp_replicate > 1:
        dims.append(("dp_replicate", cfg.dp_replicate))
    if cfg.dp_shard > 1 or (cfg.dp_replicate > 1 and not cfg.uses_ddp):
        dims.append(("dp_shard", cfg.dp_shard))  # HSDP keeps a (possibly size-1) shard dimension
    if cfg.tp > 1:
        dims.append(("tp", cfg.tp))
    return dims


def build_mesh(config: ParallelConfig, device_type: str = "cpu") -> DeviceMesh | None:
    """The device mesh for ``config`` over the initialised process group (None for one process)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    dims = mesh_shape(config, world)
    if world == 1:
        return None
    return init_device_mesh(device_type, tuple(s for _, s in dims), mesh_dim_names=tuple(n for n, _ in dims))


def _check_mesh(mesh: DeviceMesh | None, cfg: ParallelConfig) -> None:
    want = mesh_shape(cfg, cfg.world_size)
    if mesh is None:
        if cfg.world_size != 1:
            raise ConfigError("mesh", f"None, but {cfg.describe()} needs {cfg.world_size} ranks; build it with build_mesh")
        return
    have = list(zip(mesh.mesh_dim_names or (), mesh.mesh.shape))
    if [(n, int(s)) for n, s in have] != want:
        raise ConfigError("mesh", f"has dimensions {have}, {cfg.describe()} needs {want}; build it with build_mesh(config)")


# ----------------------------------------------------------------------------- DDP


class DistributedDataParallel(nn.parallel.DistributedDataParallel):
    """torch's DDP with a ``compression`` hook by name ("none", "bf16", "fp16", "powersgd",
    "int4"; see :mod:`seekdeep.parallel.compression`). ``compression_state`` holds the hook's
    state (PowerSGD's, or the int4 hook's error-feedback residuals and byte counter)."""

    def __init__(self, module: nn.Module, *args: Any, compression: str = "none", **kwargs: Any):
        from seekdeep.parallel.compression import register_compression

        super().__init__(module, *args, **kwargs)
        self.compression_state = register_compression(self, compression, kwargs.get("process_group"))


def TensorParallel(  # noqa: N802 - the seed's name
    model: nn.Module, mesh: DeviceMesh | None = None, *, sequence_parallel: bool = True
) -> nn.Module:
    """Seed-shaped entry point: tensor-parallel ``model`` in place over ``mesh`` (default: all
    ranks of the initialised process group) and return it."""
    if mesh is None:
        device = init_distributed()
        mesh = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("tp",))
    if mesh.ndim != 1:
        mesh = mesh["tp"]
    ParallelConfig(tp=mesh.size()).check_model(model.config)
    return apply_tensor_parallel(model, mesh, sequence_parallel)


# ----------------------------------------------------------------------------- gradient clipping


def clip_grad_norm_(parameters, max_norm: float, *, norm_params=None, pp_group=None) -> float:
    """``torch.nn.utils.clip_grad_norm_`` for mixed layouts: gradients may be DTensors on
    different meshes / placements (FSDP x TP, sequence-parallel norms) or plain tensors
    (replicated). Each group's norm is reduced over its own mesh; ``pp_group`` sums the squares
    over pipeline stages. ``norm_params`` (default: ``parameters``) are the ones counted.
    Returns the total norm."""
    params = [p for p in parameters if p.grad is not None]
    counted = params if norm_params is None else [p for p in norm_params if p.grad is not None]
    groups: dict[Any, list[torch.Tensor]] = {}
    for p in counted:
        key = (id(p.grad.device_mesh), tuple(p.grad.placements)) if isinstance(p.grad, DTensor) else "local"
        groups.setdefault(key, []).append(p.grad)
    device = params[0].grad.device if params else torch.device("cpu")
    total_sq = torch.zeros((), dtype=torch.float32, device=device)
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        total_sq = total_sq + norm.float() ** 2
    if pp_group is not None:
        dist.all_reduce(total_sq, group=pp_group)
    total = float(total_sq.sqrt())
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for p in params:
            p.grad.mul_(coef)
    return total


# ----------------------------------------------------------------------------- the result


def _retie(part: nn.Module) -> None:
    """``to_empty`` gives every module its own new parameter, which unties ``lm_head`` from
    the embedding; tie them again (a no-op when FSDP kept the tie or nothing is tied)."""
    embed = getattr(part.model, "embed_tokens", None)
    if (getattr(part.config, "tie_word_embeddings", False) and isinstance(embed, nn.Embedding)
            and isinstance(part.lm_head, nn.Linear) and part.lm_head.weight is not embed.weight):
        part.lm_head.weight = embed.weight


class ParallelModel:
    """What :func:`parallelize` returns: this rank's part(s) of the model and how to run them.

    ``parts``: the local modules holding parameters (one, or one per local pipeline stage;
    build one optimizer per part, e.g. :class:`~seekdeep.parallel.optim.PartsOptimizer`);
    ``module``: what a forward calls (the DDP wrapper or the model; not under pipelining).
    Calling it like the model (``pm(input_ids, labels=...)``) works in every layout; under
    pipelining it runs an evaluation pass and returns an object with ``loss`` only. Train with
    :meth:`forward_backward` (any layout), :meth:`clip_grad_norm_`, the optimizer step, and
    for a pipelined model with tied embeddings :meth:`sync_tied_weights` after the step.
    """

    def __init__(self, config: ParallelConfig, mesh: DeviceMesh | None, parts: list[tuple[int | None, nn.Module]],
                 device: torch.device, tied: bool, loss_fn: Callable = causal_lm_loss):
        self.config, self.mesh, self.device = config, mesh, device
        self._parts = parts
        self._loss_fn = loss_fn
        self._module: nn.Module | None = None if config.pp > 1 else parts[0][1]
        self._schedule = None
        self._loss_scale = 1.0
        self.tied = tied and config.pp > 1
        self._tied_group = self._make_tied_group() if self.tied else None
        self.materialized = not any(p.is_meta for _, m in parts for p in m.parameters())
        if self.materialized:
            self._finish()

    # -- structure
    @property
    def parts(self) -> list[nn.Module]:
        return [m for _, m in self._parts]

    @property
    def stages(self) -> list[int | None]:
        return [s for s, _ in self._parts]

    @property
    def is_pipelined(self) -> bool:
        return self.config.pp > 1

    @property
    def module(self) -> nn.Module:
        if self.is_pipelined:
            raise ConfigError("module", "a pipelined model has no single module; use forward_backward / __call__")
        self._require_materialized()
        return self._module

    @property
    def model(self) -> nn.Module:
        """The local (sharded) model when not pipelined: parameters, state dicts, eval."""
        if self.is_pipelined:
            raise ConfigError("model", "a pipelined model has one part per local stage; use .parts")
        return self._parts[0][1]

    def parameters(self) -> Iterator[nn.Parameter]:
        seen: set[int] = set()
        for part in self.parts:
            for p in part.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def _coord(self, name: str) -> tuple[int, int]:
        names = self.mesh.mesh_dim_names if self.mesh is not None else ()
        if name not in names:
            return 0, 1
        return self.mesh.get_local_rank(name), self.mesh.size(names.index(name))

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def dp_rank(self) -> int:
        rep, _ = self._coord("dp_replicate")
        shard, shard_size = self._coord("dp_shard")
        return rep * shard_size + shard

    @property
    def dp_size(self) -> int:
        return self._coord("dp_replicate")[1] * self._coord("dp_shard")[1]

    @property
    def pp_rank(self) -> int:
        return self._coord("pp")[0]

    def local_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """This data-parallel rank's rows of a global batch (every rank reads the same global
        batch; the slices of all dp ranks together are exactly that batch)."""
        rows, dp = batch.shape[0], self.dp_size
        if rows % dp:
            raise ConfigError("batch_size", f"{rows} rows do not split over {dp} data-parallel ranks; "
                              f"accepted: a multiple of {dp}")
        per = rows // dp
        return batch[self.dp_rank * per:(self.dp_rank + 1) * per]

    # -- materialisation
    def materialize(self, init: Callable[[nn.Module], None] | dict[str, torch.Tensor] | None = None) -> "ParallelModel":
        """Allocate the local shards on ``device`` and fill them: ``None`` runs each part's
        ``init_weights()``; a callable is called on each part; a dict is a full (unsharded)
        state dict each rank slices its shards from."""
        from seekdeep.parallel.checkpoint import load_full_state_dict

        for part in self.parts:
            part.to_empty(device=self.device)
            _retie(part)
            if init is None:
                part.init_weights()
            elif callable(init):
                init(part)
            else:
                load_full_state_dict(part, init)
        if self.tied:
            self._broadcast_tied_weights()
        self.materialized = True
        self._finish()
        return self

    def _finish(self) -> None:
        if self.config.uses_ddp and not isinstance(self._module, nn.parallel.DistributedDataParallel):
            kwargs = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
            if self.config.compression == "powersgd" and dist.get_backend() == "gloo":
                # PowerSGD chains a second all-reduce inside each bucket's callback; with several
                # buckets gloo can see them in different orders on different ranks. One bucket.
                kwargs["bucket_cap_mb"] = 1 << 14
            self._module = DistributedDataParallel(
                self._parts[0][1], process_group=self.mesh.get_group("dp_replicate"),
                compression=self.config.compression, **kwargs,
            )

    def _require_materialized(self) -> None:
        if not self.materialized:
            raise ConfigError("model", "still on the meta device; call materialize() (or load a checkpoint) first")

    # -- train / eval mode
    @property
    def training(self) -> bool:
        return self.parts[0].training

    def train(self, mode: bool = True) -> "ParallelModel":
        for part in self.parts:
            part.train(mode)
        return self

    def eval(self) -> "ParallelModel":
        return self.train(False)

    # -- running
    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **kwargs: Any):
        self._require_materialized()
        if not self.is_pipelined:
            return self._module(input_ids, labels=labels, **kwargs)
        if torch.is_grad_enabled() and self.training:
            raise ConfigError("forward", "a pipelined model trains through forward_backward(), not a plain forward")
        if labels is None:
            raise ConfigError("labels", "a pipelined evaluation returns the loss only; pass labels")
        return SimpleNamespace(loss=self._pipeline(input_ids, labels, 1.0, None, train=False), logits=None)

    def forward_backward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, loss_scale: float = 1.0,
                         autocast: Callable[[], contextlib.AbstractContextManager] | None = None) -> torch.Tensor:
        """Forward and backward of one (local) batch; gradients of ``loss * loss_scale``
        accumulate into ``.grad``. Returns the detached, unscaled LM loss of this rank's batch
        (under pipelining: the batch's loss on every pipeline rank)."""
        self._require_materialized()
        labels = input_ids if labels is None else labels
        if self.is_pipelined:
            return self._pipeline(input_ids, labels, loss_scale, autocast, train=True)
        with autocast() if autocast is not None else contextlib.nullcontext():
            output = self._module(input_ids, labels=labels)
        (output.loss * loss_scale).backward()
        return output.loss.detach()

    def _pipeline(self, input_ids, labels, loss_scale, autocast, train: bool) -> torch.Tensor:
        n = self.config.microbatches
        rows = input_ids.shape[0]
        weights = None
        if rows % n:
            if train:
                raise ConfigError("pp_microbatches", f"{n} micro-batches do not split a batch of {rows} rows; "
                                  f"accepted: a divisor of the local batch size")
            # evaluation of a ragged last batch: pad with ignored rows, weight micro-batches by real tokens
            pad = n - rows % n
            input_ids = torch.cat([input_ids, input_ids[-1:].expand(pad, -1)])
            labels = torch.cat([labels, torch.full_like(labels[-1:], -100).expand(pad, -1)])
            weights = (labels[:, 1:] != -100).reshape(n, -1).sum(1).float()  # real tokens per micro-batch
        if self._schedule is None:
            self._schedule = build_schedule(self._parts, self.config, self.mesh["pp"], self.device, self._scaled_loss)
        self._loss_scale = loss_scale
        first, last = self.pp_rank == 0, self.pp_rank == self.config.pp - 1
        losses: list[torch.Tensor] = []
        args = (input_ids.to(self.device),) if first else ()
        kwargs = {"target": labels.to(self.device), "losses": losses} if last else {}
        with autocast() if autocast is not None else contextlib.nullcontext():
            if train:
                self._schedule.step(*args, return_outputs=False, **kwargs)
            else:
                with torch.no_grad():
                    self._schedule.eval(*args, return_outputs=False, **kwargs)
        if train and self.tied:
            self._sync_tied_grads()
        if last and weights is not None:
            per_micro = torch.stack([x.detach().float() for x in losses]) * n  # each was scaled by 1/n
            keep = weights > 0
            loss = (per_micro[keep] * weights[keep].to(per_micro.device)).sum() / weights.sum()
        elif last:
            loss = torch.stack([x.detach().float() for x in losses]).sum() / loss_scale
        else:
            loss = torch.zeros((), device=self.device)
        dist.all_reduce(loss, group=self.mesh.get_group("pp"))  # only the last stage holds it
        return loss

    def _scaled_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self._loss_fn(logits, labels) * (self._loss_scale / self.config.microbatches)

    # -- reductions
    def global_mean(self, value: torch.Tensor | float) -> float:
        """Mean of a per-rank value over the data-parallel ranks (the loss of the global
        batch); tensor- and pipeline-parallel ranks hold the same value."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return float(value)
        t = torch.as_tensor(value, dtype=torch.float64, device=self.device).clone()
        dist.all_reduce(t)
        return float(t) / dist.get_world_size()

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip the global gradient norm (all shards, all stages) to ``max_norm``; returns it."""
        params = [p for p in self.parameters() if p.grad is not None]
        norm_params = params
        if self.tied:  # the last stage's lm_head copy carries the same gradient as the embedding
            copy = {id(part.lm_head.weight) for s, part in self._parts if s == self.config.num_stages - 1}
            norm_params = [p for p in params if id(p) not in copy]
        group = self.mesh.get_group("pp") if self.is_pipelined else None
        return clip_grad_norm_(params, max_norm, norm_params=norm_params, pp_group=group)

    # -- tied embeddings across pipeline stages
    def _make_tied_group(self):
        pp_dim = self.mesh.mesh_dim_names.index("pp")
        ranks = self.mesh.mesh.movedim(pp_dim, 0).reshape(self.config.pp, -1)  # (pp, rest)
        mine = None
        for col in range(ranks.shape[1]):
            pair = [int(ranks[0, col]), int(ranks[-1, col])]
            group = dist.new_group(pair)
            if dist.get_rank() in pair:
                mine = (group, pair[0])
        return mine

    def _tied_tensors(self, grads: bool) -> list[torch.Tensor]:
        out = []
        last = self.config.num_stages - 1
        for stage, part in self._parts:
            holders = []
            if stage == 0:
                holders.append(part.model.embed_tokens.weight)
            if stage == last:
                holders.append(part.lm_head.weight)
            for p in holders:
                if grads:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    elif isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
                        # e.g. a vocab-sharded embedding's gradient comes back replicated
                        p.grad = p.grad.redistribute(p.device_mesh, p.placements)
                    t = p.grad
                else:
                    t = p.data
                out.append(t.to_local() if isinstance(t, DTensor) else t)
        return out

    def _sync_tied_grads(self) -> None:
        group, _ = self._tied_group
        for t in self._tied_tensors(grads=True):
            dist.all_reduce(t, group=group)

    def sync_tied_weights(self) -> None:
        """Copy the first stage's embedding into the last stage's ``lm_head`` (no-op unless a
        tied model is pipelined). Call after each optimizer step: the two copies receive the same
        summed gradient, but an optimizer may treat them differently by name (no weight decay
        on embeddings), and the embedding's rule is the one a single process applies."""
        if self.tied:
            self._broadcast_tied_weights()

    def _broadcast_tied_weights(self) -> None:
        group, src = self._tied_group
        with torch.no_grad():
            for t in self._tied_tensors(grads=False):
                dist.broadcast(t, src=src, group=group)


# ----------------------------------------------------------------------------- the entry point


def parallelize(model: nn.Module, mesh: DeviceMesh | None, config: ParallelConfig, *,
                device: torch.device | str | None = None, loss_fn: Callable = causal_lm_loss) -> ParallelModel:
    """Apply ``config`` to ``model`` (a seekdeep ``CausalLM``, ideally on the meta device) over
    ``mesh`` (from :func:`build_mesh`). The model object is modified in place (and, under
    pipelining, becomes this rank's first stage). ``loss_fn(logits, labels)`` is the
    pipeline's loss (the model's own loss otherwise)."""
    world = mesh.size() if mesh is not None else 1
    cfg = config.resolved(world)
    cfg.check_model(model.config)
    _check_mesh(mesh, cfg)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    tp_mesh = mesh["tp"] if cfg.tp > 1 else None

    if cfg.pp > 1:
        parts = split_model(model, mesh.get_local_rank("pp"), cfg, tp_mesh)
    else:
        parts = [(None, model)]
    use_fsdp = cfg.dp_shard > 1 or (cfg.dp_replicate > 1 and not cfg.uses_ddp)
    if use_fsdp:
        dp_mesh = mesh["dp_replicate", "dp_shard"] if cfg.dp_replicate > 1 else mesh["dp_shard"]
    for _, part in parts:
        if tp_mesh is not None:
            apply_tensor_parallel(part, tp_mesh, cfg.sequence_parallel)
        if cfg.activation_checkpointing:
            part.gradient_checkpointing = True
        if cfg.compile:
            for layer in part.model.layers:
                layer.compile()
        if use_fsdp:
            apply_fsdp(part, dp_mesh, cfg.precision, reshard_after_forward=cfg.pp == 1)
    return ParallelModel(cfg, mesh, parts, device, tied, loss_fn)


def world_info() -> tuple[int, int]:
    """(rank, world size), (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1

