"""The parallelism layout of a run: one dataclass, validated before any process starts.

A layout is a 4-D device mesh ``pp x dp_replicate x dp_shard x tp`` (outermost first, as in
torchtitan: tensor-parallel ranks are neighbours, so on GPUs they share a node's NVLink).
``--parallel`` on the command line is the same thing as text: ``"dp_shard=2,tp=2"``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from seekdeep.errors import ConfigError

PP_SCHEDULES = ("1F1B", "Interleaved1F1B", "GPipe")
COMPRESSIONS = ("none", "allreduce", "bf16", "fp16", "powersgd", "int4")
PRECISIONS = ("fp32", "bf16", "fp16")
#: attention backends whose parameters are shared by all heads in a way a head-sharded plan
#: cannot express (the DSA indexer scores keys for every head at once).
TP_UNSUPPORTED_BACKENDS = ("dsa",)


MAX_RANKS = 1 << 20  # per mesh dimension; far past any cluster, short of overflow


def _positive_int(value: Any, name: str, allow_fill: bool = False) -> None:
    if allow_fill and value == -1:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RANKS:
        accepted = f"an integer in [1, {MAX_RANKS}]" + (" or -1 (all ranks left over)" if allow_fill else "")
        raise ConfigError(name, f"got {value!r}; accepted: {accepted}")


@dataclass
class ParallelConfig:
    """How to lay one model out over ``world_size`` processes.

    ``dp_replicate``: copies of the (possibly sharded) model that all-reduce gradients (DDP,
    or the replicate dimension of HSDP); ``dp_shard``: ranks that shard parameters, gradients
    and optimizer state with FSDP2 (ZeRO-3); -1 takes every rank the other sizes leave over.
    ``tp``: tensor-parallel ranks (DTensor column/row-parallel linears); ``pp``: pipeline
    stages (torch.distributed.pipelining) with ``pp_schedule`` over ``pp_microbatches``
    micro-batches (default: ``pp * pp_virtual_stages``); ``pp_virtual_stages``: stages
    per rank (``Interleaved1F1B`` needs >= 2).
    ``sequence_parallel``: shard norms and the residual stream along the sequence between
    tensor-parallel regions. ``precision``: FSDP2's parameter dtype (from the run's
    precision policy; gradients are reduced in fp32). ``compression``: DDP communication hook
    (plain replication only).
    """

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    activation_checkpointing: bool = False
    compile: bool = False
    sequence_parallel: bool = True
    pp_schedule: str = "1F1B"
    pp_microbatches: int | None = None
    pp_virtual_stages: int = 1
    precision: str = "fp32"
    compression: str = "none"

    def __post_init__(self) -> None:
        _positive_int(self.dp_replicate, "dp_replicate")
        _positive_int(self.dp_shard, "dp_shard", allow_fill=True)
        _positive_int(self.tp, "tp")
        _positive_int(self.pp, "pp")
        _positive_int(self.pp_virtual_stages, "pp_virtual_stages")
        if self.pp_microbatches is not None:
            _positive_int(self.pp_microbatches, "pp_microbatches")
        for name in ("activation_checkpointing", "compile", "sequence_parallel"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"got {getattr(self, name)!r}; accepted: true or false")
        if self.pp_schedule not in PP_SCHEDULES:
            raise ConfigError("pp_schedule", f"unknown schedule {self.pp_schedule!r}; accepted: {', '.join(PP_SCHEDULES)}")
        if self.pp_schedule == "Interleaved1F1B" and self.pp > 1 and self.pp_virtual_stages < 2:
            raise ConfigError("pp_virtual_stages", f"Interleaved1F1B needs >= 2 stages per rank, got {self.pp_virtual_stages}")
        if self.pp_schedule != "Interleaved1F1B" and self.pp_virtual_stages != 1:
            raise ConfigError("pp_virtual_stages", f"{self.pp_schedule} runs one stage per rank; use pp_schedule=Interleaved1F1B "
                              f"for {self.pp_virtual_stages} stages per rank")
        if self.precision not in PRECISIONS:
            raise ConfigError("precision", f"unknown {self.precision!r}; accepted: {', '.join(PRECISIONS)}")
        if self.compression not in COMPRESSIONS:
            raise ConfigError("compression", f"unknown hook {self.compression!r}; accepted: {', '.join(COMPRESSIONS)}")
        if self.compression != "none" and not self.uses_ddp:
            raise ConfigError(
                "compression",
                f"{self.compression!r} is a DDP communication hook: it needs plain replication (dp_replicate > 1 with "
                f"dp_shard=1, tp=1, pp=1), got {self.describe()}",
            )

    # -- sizes
    def resolved(self, world_size: int) -> "ParallelConfig":
        """A copy with ``dp_shard=-1`` replaced by the ranks left over; checks the product."""
        _positive_int(world_size, "world_size")
        others = self.dp_replicate * self.tp * self.pp
        shard = self.dp_shard
        if shard == -1:
            if world_size % others:
                raise ConfigError(
                    "mesh", f"dp_replicate*tp*pp = {others} does not divide the world size {world_size}; "
                    f"accepted: sizes whose product divides {world_size}",
                )
            shard = world_size // others
        if others * shard != world_size:
            raise ConfigError(
                "mesh",
                f"dp_replicate*dp_shard*tp*pp = {self.dp_replicate}*{shard}*{self.tp}*{self.pp} = {others * shard} does "
                f"not match the world size {world_size}; accepted: sizes whose product is {world_size} (or dp_shard=-1)",
            )
        return ParallelConfig(**{**asdict(self), "dp_shard": shard})

    @property
    def world_size(self) -> int:
        if self.dp_shard == -1:
            raise ConfigError("dp_shard", "is -1 (fill); call resolved(world_size) first")
        return self.dp_replicate * self.dp_shard * self.tp * self.pp

    @property
    def dp_size(self) -> int:
        """Ranks that see different data: replicate x shard."""
        return self.dp_replicate * max(self.dp_shard, 1)

    @property
    def uses_ddp(self) -> bool:
        """Plain replication runs through torch's DistributedDataParallel (and its hooks);
        replication combined with anything else runs as HSDP."""
        return self.dp_replicate > 1 and self.dp_shard == 1 and self.tp == 1 and self.pp == 1

    @property
    def num_stages(self) -> int:
        return self.pp * self.pp_virtual_stages

    @property
    def microbatches(self) -> int:
        return self.pp_microbatches or self.num_stages

    def describe(self) -> str:
        return f"dp_replicate={self.dp_replicate}, dp_shard={self.dp_shard}, tp={self.tp}, pp={self.pp}"

    # -- checks against a model
    def check_model(self, model_config: Any) -> None:
        """Fail (ConfigError) when the layout cannot split this model: ``tp`` must divide the
        query and key/value heads, the pipeline needs a layer per stage, and the attention
        backend must support head sharding."""
        heads = getattr(model_config, "num_attention_heads", None)
        kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
        if self.tp > 1 and heads is not None:
            if heads % self.tp:
                raise ConfigError("tp", f"{self.tp} does not divide num_attention_heads={heads}; accepted: a divisor of {heads}")
            if kv_heads % self.tp:
                raise ConfigError(
                    "tp", f"{self.tp} does not divide num_key_value_heads={kv_heads} (grouped-query attention shards whole "
                    f"key/value heads); accepted: a divisor of {kv_heads}",
                )
        backend = getattr(model_config, "attention_backend", None)
        if self.tp > 1 and backend in TP_UNSUPPORTED_BACKENDS:
            raise ConfigError(
                "tp", f"attention_backend {backend!r} cannot be head-sharded (its indexer scores keys for all heads); "
                "accepted with tp > 1: eager, sdpa, gated",
            )
        if self.pp > 1 and backend in TP_UNSUPPORTED_BACKENDS:
            raise ConfigError(
                "pp", f"attention_backend {backend!r} adds an auxiliary indexer loss that pipeline stages do not carry; "
                "accepted with pp > 1: eager, sdpa, gated",
            )
        layers = getattr(model_config, "num_hidden_layers", None)
        if layers is not None and self.num_stages > layers:
            raise ConfigError(
                "pp", f"{self.num_stages} pipeline stages (pp={self.pp} x pp_virtual_stages={self.pp_virtual_stages}) for "
                f"{layers} layers; accepted: at most one stage per layer (pp * pp_virtual_stages <= {layers})",
            )

    # -- text form
    @classmethod
    def from_string(cls, spec: str, **defaults: Any) -> "ParallelConfig":
        """``"dp_shard=2,tp=2,activation_checkpointing"``: comma-separated ``name=value`` (a
        bare name sets a flag to true); ``defaults`` fill what the text leaves out."""
        if not isinstance(spec, str) or not spec.strip():
            raise ConfigError("parallel", f"got {spec!r}; accepted: e.g. 'dp_shard=2' or 'dp_shard=2,tp=2'")
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = dict(defaults)
        for item in spec.split(","):
            item = item.strip()
            if not item:
                continue
            name, sep, raw = item.partition("=")
            name, raw = name.strip(), raw.strip()
            if name not in known:
                raise ConfigError("parallel", f"unknown key {name!r} in {spec!r}; accepted: {', '.join(known)}")
            if not sep:
                values[name] = True
            elif isinstance(known[name].default, bool):
                if raw.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ConfigError(name, f"got {raw!r}; accepted: true or false")
                values[name] = raw.lower() in ("true", "1", "yes", "on")
            elif name in ("pp_schedule", "precision", "compression"):
                values[name] = raw
            else:
                try:
                    values[name] = int(raw)
                except ValueError:
                    raise ConfigError(name, f"got {raw!r}; accepted: an integer") from None
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ParallelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(unknown[0], f"unknown ParallelConfig field; accepted: {', '.join(sorted(known))}")
        return cls(**d)
