"""``seekdeep launch``: start a seekdeep command on several processes with torchrun, or write a
Kubeflow PyTorchJob manifest that does so on a Kubernetes cluster.

    seekdeep launch --nproc 2 -- train --parallel dp_shard=2 --attention-backend sdpa
    seekdeep launch --nproc 8 --nnodes 2:4 --rdzv-endpoint head:29400 --rdzv-id run1 -- train ...
    seekdeep launch --k8s job.yaml --image registry/seekdeep:1 --gpus-per-worker 8 --nnodes 2:4 -- train ...

Everything that can be checked before a process starts is checked here (the command, the
node range, and for ``train`` its ``--parallel`` layout against the world size and the
model): a bad layout fails in a second, not after every worker has loaded torch.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seekdeep.errors import ConfigError
from seekdeep.validate import check_int

_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")  # a Kubernetes resource name (RFC 1123 label)
_RDZV_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_HOST_RE = re.compile(r"[A-Za-z0-9_.:-]{1,253}")  # a name, IPv4 or (bracketed) IPv6 address
RDZV_BACKENDS = ("c10d", "etcd", "etcd-v2", "static")


@dataclass
class LaunchSpec:
    """A validated launch: ``command`` is the seekdeep sub-command and its arguments."""

    command: list[str]
    nproc: int = 1
    nnodes: str = "1"
    rdzv_backend: str = "c10d"
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    max_restarts: int = 0
    master_port: int | None = None
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.command:
            raise ConfigError("command", "no command to launch; accepted: `seekdeep launch [options] -- train ...`")
        if self.command[0] == "launch":
            raise ConfigError("command", "cannot launch `launch` itself; accepted: another seekdeep sub-command")
        check_int("nproc", self.nproc, 1, 1024)
        check_int("max_restarts", self.max_restarts, 0, 1000)
        check_int("master_port", self.master_port, 1, 65535, optional=True)
        if self.rdzv_backend not in RDZV_BACKENDS:
            raise ConfigError("rdzv_backend", f"unknown {self.rdzv_backend!r}; accepted: {', '.join(RDZV_BACKENDS)}")
        lo, hi = parse_nnodes(self.nnodes)
        if self.rdzv_endpoint is not None:
            parse_endpoint(self.rdzv_endpoint)
        if self.rdzv_id is not None and not _RDZV_ID_RE.fullmatch(str(self.rdzv_id)):
            raise ConfigError("rdzv_id", f"got {self.rdzv_id!r}; accepted: 1-128 letters, digits, '-', '_' or '.'")
        if hi > 1 and self.master_port is not None:
            raise ConfigError("master_port", "is for a single node; with several nodes the rendezvous is "
                              "--rdzv-endpoint HOST:PORT")

    @property
    def node_range(self) -> tuple[int, int]:
        return parse_nnodes(self.nnodes)

    @property
    def elastic(self) -> bool:
        lo, hi = self.node_range
        return lo != hi

    def world_sizes(self) -> list[int]:
        lo, hi = self.node_range
        return [n * self.nproc for n in range(lo, hi + 1)]

    def torchrun_argv(self) -> list[str]:
        """The torchrun command line (``python -m torch.distributed.run ... -m seekdeep.cli CMD``)."""
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(self.nproc)]
        lo, hi = self.node_range
        if hi == 1:
            if self.master_port is not None:
                argv += ["--master-port", str(self.master_port)]
            else:
                argv += ["--standalone"]
        else:  # (a Kubernetes job gets its endpoint from the operator: only torchrun needs it here)
            if not self.rdzv_endpoint:
                raise ConfigError("rdzv_endpoint", f"--nnodes {self.nnodes} spans several nodes: give --rdzv-endpoint "
                                  "HOST:PORT (a host every node can reach)")
            argv += ["--nnodes", self.nnodes, "--rdzv-backend", self.rdzv_backend, "--rdzv-endpoint", self.rdzv_endpoint]
            if self.rdzv_id:
                argv += ["--rdzv-id", self.rdzv_id]
        if self.max_restarts:
            argv += ["--max-restarts", str(self.max_restarts)]
        return argv + ["-m", "seekdeep.cli", *self.command]


def parse_nnodes(text: str) -> tuple[int, int]:
    """``"4"`` -> (4, 4); ``"2:8"`` -> (2, 8) (elastic)."""
    parts = str(text).split(":")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values or [0]) < 1 or (len(values) == 2 and values[0] > values[1]):
        raise ConfigError("nnodes", f"got {text!r}; accepted: N or MIN:MAX with 1 <= MIN <= MAX")
    return (values[0], values[-1])


def parse_endpoint(text: str) -> tuple[str, int]:
    """``"head:29400"`` -> ("head", 29400); a bare host gets torchrun's default port 29400."""
    host, sep, port = str(text).rpartition(":")
    if not sep:
        host, port = str(text), "29400"
    if not host or not _HOST_RE.fullmatch(host.strip("[]")) or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError("rdzv_endpoint", f"got {text!r}; accepted: HOST:PORT with a host name or address and a port "
                          "in [1, 65535]")
    return host, int(port)


def check_command(spec: LaunchSpec) -> None:
    """Validate the wrapped command before any process starts: it parses, its config accepts
    every flag, and what it does with the processes holds — for ``train --parallel X``, the
    layout against every world size the launch can have and against the model preset; every
    other command runs on one process only."""
    from seekdeep.cli import build_parser, describe_error
    from seekdeep.errors import SeekdeepError
    from seekdeep.parallel.config import ParallelConfig

    if spec.command[0].startswith("-"):
        raise ConfigError("command", f"starts with the option {spec.command[0]!r}; accepted: `seekdeep launch [options] "
                          "-- COMMAND [flags]` with COMMAND a seekdeep sub-command such as train")
    parser = build_parser()
    try:
        args = parser.parse_args(spec.command)
    except SystemExit as exc:  # argparse already printed what is wrong
        raise ConfigError("command", f"`seekdeep {' '.join(spec.command)}` does not parse (see above)") from exc
    from dataclasses import fields

    config_cls = getattr(args, "config_cls", None)
    if config_cls is not None:
        try:  # every field's own checks, as the command itself would run them
            config_cls(**{f.name: getattr(args, f.name) for f in fields(config_cls)})
        except SeekdeepError as exc:
            sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
            raise ConfigError("command", f"`seekdeep {args.command}`: {describe_error(exc, sub)}") from None
    if spec.command[0] != "train":
        if max(spec.world_sizes()) > 1:
            raise ConfigError("nproc", f"`seekdeep {spec.command[0]}` runs on one process; accepted with it: --nproc 1 "
                              "--nnodes 1 (only `train --parallel ...` spreads over several)")
        return
    parallel = getattr(args, "parallel", None)
    if not parallel:
        if max(spec.world_sizes()) > 1:
            raise ConfigError("parallel", f"`train` on {max(spec.world_sizes())} processes needs --parallel "
                              "(e.g. --parallel dp_shard=-1); without it every process would train alone")
        return
    layout = ParallelConfig.from_string(parallel, precision=getattr(args, "precision", "fp32"))
    sizes = spec.world_sizes()
    if spec.elastic and layout.dp_shard != -1:
        raise ConfigError("nnodes", f"elastic --nnodes {spec.nnodes} changes the world size ({sizes[0]}..{sizes[-1]}); "
                          "use dp_shard=-1 so the data-parallel size follows it")
    for world in sizes:
        resolved = layout.resolved(world)
    # the recipe trains a llama-family preset; its head and layer counts are what tp / pp split
    from seekdeep.models.llama import LlamaConfig

    resolved.check_model(LlamaConfig.from_name(args.preset, attention_backend=args.attention_backend))


def launch(spec: LaunchSpec, dry_run: bool = False) -> int:
    argv = spec.torchrun_argv()  # the rendezvous settings first: they need no parsing of the command
    check_command(spec)
    if dry_run:
        print(" ".join(argv))
        return 0
    return subprocess.call(argv)


# ----------------------------------------------------------------------------- Kubernetes


def pytorchjob_manifest(spec: LaunchSpec, image: str, name: str = "seekdeep-train", namespace: str | None = None,
                        gpus_per_worker: int = 1, cpu: str | None = None, memory: str | None = None) -> dict[str, Any]:
    """A Kubeflow training-operator ``PyTorchJob`` (kubeflow.org/v1) running ``spec.command``
    on ``nnodes`` workers with ``gpus_per_worker`` GPUs each; an elastic node range becomes
    ``elasticPolicy`` (c10d rendezvous; the operator passes the ``PET_*`` settings torchrun reads)."""
    if not image or not isinstance(image, str):
        raise ConfigError("image", "required: the container image holding seekdeep (e.g. registry/seekdeep:0.1)")
    if not _NAME_RE.fullmatch(name or "") or len(name) > 63:
        raise ConfigError("name", f"{name!r} is not a Kubernetes name; accepted: lowercase letters, digits and '-', <= 63 chars")
    if isinstance(gpus_per_worker, bool) or not isinstance(gpus_per_worker, int) or gpus_per_worker < 0:
        raise ConfigError("gpus_per_worker", f"must be an integer >= 0, got {gpus_per_worker!r}")
    check_command(spec)
    lo, hi = spec.node_range
    limits: dict[str, Any] = {}
    if gpus_per_worker:
        limits["nvidia.com/gpu"] = gpus_per_worker
    if cpu:
        limits["cpu"] = cpu
    if memory:
        limits["memory"] = memory
    container: dict[str, Any] = {
        "name": "pytorch",  # the training operator looks for this container name
        "image": image,
        "command": ["torchrun", "--nproc-per-node", str(spec.nproc), "-m", "seekdeep.cli"],
        "args": list(spec.command),
    }
    if limits:
        container["resources"] = {"limits": limits}
    if spec.env:
        container["env"] = [{"name": k, "value": v} for k, v in sorted(spec.env.items())]
    job_spec: dict[str, Any] = {
        "pytorchReplicaSpecs": {
            "Worker": {
                "replicas": hi,
                "restartPolicy": "OnFailure",
                "template": {"spec": {"containers": [container]}},
            }
        },
        "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": max(spec.max_restarts, 3)},
    }
    if spec.elastic or spec.max_restarts:
        job_spec["elasticPolicy"] = {
            "rdzvBackend": spec.rdzv_backend if spec.rdzv_backend != "static" else "c10d",
            "minReplicas": lo,
            "maxReplicas": hi,
            "maxRestarts": spec.max_restarts,
            "nProcPerNode": spec.nproc,
        }
        if spec.rdzv_id:
            job_spec["elasticPolicy"]["rdzvId"] = spec.rdzv_id
    metadata: dict[str, Any] = {"name": name, "labels": {"app.kubernetes.io/name": "seekdeep"}}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": metadata, "spec": job_spec}


def write_manifest(manifest: dict[str, Any], path: str | Path) -> Path:
    """YAML when PyYAML is installed, else JSON (which is valid YAML; kubectl reads both)."""
    import json

    from seekdeep.files import atomic_write

    path = Path(path)
    try:
        import yaml

        text = yaml.safe_dump(manifest, sort_keys=False)
    except ImportError:
        text = json.dumps(manifest, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


# ----------------------------------------------------------------------------- CLI


def cmd_launch(args: argparse.Namespace) -> int:
    command = list(args.remainder or [])
    if command and command[0] == "--":
        command = command[1:]
    nnodes = args.nnodes
    check_int("gpus_per_worker", args.gpus_per_worker, 0, 1024)  # checked with or without --k8s
    if args.k8s:
        nproc = args.nproc if args.nproc is not None else max(args.gpus_per_worker, 1)
        if args.gpus_per_worker and nproc != args.gpus_per_worker:
            raise ConfigError("nproc", f"{nproc} processes per worker with --gpus-per-worker {args.gpus_per_worker}; "
                              "accepted: one process per GPU (leave --nproc out)")
        # the operator gives every pod the rendezvous endpoint (PET_RDZV_ENDPOINT)
        spec = LaunchSpec(command=command, nproc=nproc, nnodes=nnodes, rdzv_backend=args.rdzv_backend,
                          rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id,
                          max_restarts=args.max_restarts)
        manifest = pytorchjob_manifest(spec, args.image, name=args.name, namespace=args.namespace,
                                       gpus_per_worker=args.gpus_per_worker, cpu=args.cpu, memory=args.memory)
        path = write_manifest(manifest, args.k8s)
        print(f"wrote {path} (kubectl apply -f {path})")
        return 0
    spec = LaunchSpec(command=command, nproc=args.nproc if args.nproc is not None else 1, nnodes=nnodes, rdzv_backend=args.rdzv_backend,
                      rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id, max_restarts=args.max_restarts,
                      master_port=args.master_port)
    return launch(spec, dry_run=args.dry_run)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "launch", help="run a seekdeep command on several processes (torchrun) or write a Kubeflow PyTorchJob",
        description="seekdeep launch [options] -- COMMAND ...  (e.g. -- train --parallel dp_shard=2)",
    )
    p.add_argument("--nproc", type=int, default=None, help="processes per node (one per GPU; default 1)")
    p.add_argument("--nnodes", default="1", help="N or MIN:MAX (elastic); default 1")
    p.add_argument("--rdzv-backend", default="c10d", help=f"rendezvous backend: {', '.join(RDZV_BACKENDS)}")
    p.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of the rendezvous (several nodes)")
    p.add_argument("--rdzv-id", default=None, help="job id shared by all nodes")
    p.add_argument("--max-restarts", type=int, default=0, help="restarts of the worker group on failure")
    p.add_argument("--master-port", type=int, default=None, help="single node: port instead of --standalone")
    p.add_argument("--dry-run", action="store_true", help="print the torchrun command instead of running it")
    p.add_argument("--k8s", default=None, metavar="MANIFEST", help="write a Kubeflow PyTorchJob manifest instead")
    p.add_argument("--image", default=None, help="--k8s: container image with seekdeep installed")
    p.add_argument("--gpus-per-worker", type=int, default=1, help="--k8s: GPUs per worker pod (default 1)")
    p.add_argument("--name", default="seekdeep-train", help="--k8s: job name")
    p.add_argument("--namespace", default=None, help="--k8s: namespace")
    p.add_argument("--cpu", default=None, help="--k8s: CPU limit per worker (e.g. 16)")
    p.add_argument("--memory", default=None, help="--k8s: memory limit per worker (e.g. 200Gi)")
    p.add_argument("remainder", nargs=argparse.REMAINDER, help="-- then the seekdeep command")
    p.set_defaults(func=cmd_launch)
