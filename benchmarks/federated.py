"""Federated learning: crypto cost of packed Paillier, round time per secure path, and the
quality of federated training against centralized training.

    python benchmarks/federated.py crypto                  # packed vs per-value Paillier (a minute)
    python benchmarks/federated.py rounds [--method lora]  # real Flower federations, 2 rounds each
    python benchmarks/federated.py quality --seeds 3       # federated vs centralized vs local-only

``crypto``: encryption throughput of packed Paillier against phe's own per-value
``encrypt`` (the anchor), ciphertext bytes per parameter against float32, and the server's
homomorphic sum and the key holder's decryption per parameter.

``rounds``: ``seekdeep fl`` through a real SuperLink and SuperNodes, the same model and data,
with ``--secure none | paillier | secaggplus``; the mean round time (anchor: plaintext).

``quality``: the federated rounds are run in one process with the ClientApp's own training
function (``seekdeep.fl.app.client.local_train``) on each client's own stream
(``site_windows``, as the ClientApp reads it), the server's own aggregation
(``ServerAggregator``, the round's integer weights, the update deltas clipped and
stochastically quantised to ``--quant-bits`` exactly as the Paillier path encodes them -- the
encryption itself is exact, see tests/fl) and the clients' server step (``GlobalState``:
FedAvg, or FedAvgM with ``--server-lr`` / ``--server-momentum``). Flower only moves the bytes,
so leaving it out changes no number and makes the >= 3 seeds affordable on a CPU. Every arm is
evaluated at every budget of ``--budgets`` (rounds r): the federated arms after round r, the
others after the same examples and the steps their definition gives r (one run per arm, one
optimizer, evaluated along the way). Two centralized anchors, the same initial model, the
pooled data: A, "equal total client steps" (``clients * r * local_steps`` steps of
``batch_size``: as many steps and examples as all clients together) and B, "equal optimizer
steps on the pooled batch" (``r * local_steps`` steps of ``clients * batch_size``: as many
sequential updates as a client, the same examples); every row is reported against both, with
the per-seed ratio's mean and spread. Local-only: each client ``r * local_steps`` steps on its
own data. ``--lr`` and ``--schedule`` are shared by every arm. All evaluated on one fixed
held-out set: the first ``--eval-batches * --eval-batch-size`` windows of each iid client's
held-out side (the last 20% of every module, dealt round-robin), averaged over the clients.
``--plot``: the curves as a PNG.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, emit  # noqa: E402


def _device() -> str:
    return f"{device_name()}, {torch.backends.cpu.get_cpu_capability()}"


# ----------------------------------------------------------------------------- crypto


def crypto(args) -> None:
    from phe import generate_paillier_keypair

    from seekdeep.fl import paillier
    from seekdeep.fl.aggregation import ServerAggregator
    from seekdeep.fl.keys import fingerprint
    from seekdeep.fl.paillier import PackingSpec

    device = _device()
    public_key, private_key = generate_paillier_keypair(n_length=args.key_bits)
    rng = np.random.default_rng(0)
    n = args.values
    values = [rng.normal(0, 0.01, size=n) for _ in range(3)]
    for name, spec in (("one-shot aggregate (K=3, 1 round)", PackingSpec(bits=16, clip=0.1, total_weight=3,
                                                                        key_bits=args.key_bits)),
                       ("Flower round (K=3, one spare bit: total weight <= 8)",
                        PackingSpec(bits=16, clip=0.1, total_weight=paillier.weight_capacity(3, 16),
                                    key_bits=args.key_bits))):
        t0 = time.perf_counter()
        encrypted = [paillier.encode_update(v, spec, public_key, rng)[0] for v in values]
        packed_s = (time.perf_counter() - t0) / 3
        naive_n = args.naive_values
        t0 = time.perf_counter()
        naive = [public_key.encrypt(float(x)) for x in values[0][:naive_n]]  # phe: one ciphertext per value
        naive_s = (time.perf_counter() - t0) / naive_n * n
        ct_bytes = paillier.ciphertext_bytes(public_key)
        emit("paillier encrypt throughput", n / packed_s, "params/s", n / naive_s, "phe per-value encrypt", device,
             layout=name, slots_per_ciphertext=spec.slots, slot_bits=spec.slot_bits, values=n,
             naive_measured_on=naive_n)
        bytes_per_param = encrypted[0].nbytes / n
        emit("ciphertext bytes per parameter", bytes_per_param, "bytes", 4.0, "float32", device, layout=name,
             per_value_paillier_bytes=ct_bytes)
        server = ServerAggregator(spec, n, public_key)
        weights, _ = paillier.round_weights([1, 1, 1], spec.total_weight)
        t0 = time.perf_counter()
        summed = server.accumulate([server.check(e, fingerprint(public_key)) for e in encrypted], weights)
        sum_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        mean = paillier.decode_sum(summed, spec, private_key, n, sum(weights))
        dec_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        plain = np.average(values, axis=0)
        plain_s = max(time.perf_counter() - t0, 1e-9)
        emit("server homomorphic sum (3 updates)", n / sum_s, "params/s", n / plain_s, "numpy plaintext mean", device,
             layout=name)
        emit("key-holder decrypt + unpack", n / dec_s, "params/s", None, "", device, layout=name)
        emit("max |paillier mean - plaintext mean| / quantisation step", float(np.abs(mean - plain).max()) / spec.step,
             "steps", 1.0, "bound", device, layout=name)
        del naive


# ----------------------------------------------------------------------------- rounds through Flower


def rounds(args) -> None:
    from seekdeep.fl.config import FLConfig
    from seekdeep.recipes.fl import run_fl

    device = _device()
    results = {}
    with tempfile.TemporaryDirectory(prefix="fl-bench-") as tmp:
        for secure in ("none", "paillier", "secaggplus"):
            cfg = FLConfig(base=args.base, method=args.method, rounds=args.rounds, local_steps=args.local_steps,
                           secure=secure, key_bits=args.key_bits, local_only=False, progress=False,
                           output_dir=str(Path(tmp) / secure))
            summary = run_fl(cfg)
            results[secure] = summary
            print(json.dumps({"secure": secure, "mean_round_seconds": summary["mean_round_seconds"],
                              "update_values": summary["init"]["update_values"],
                              "aggregate_bytes": summary["aggregate_bytes"], "global_loss": summary["global_loss"]}),
                  file=sys.stderr)
    anchor = results["none"]["mean_round_seconds"]
    for secure, summary in results.items():
        emit(f"fl round time ({args.method}, secure={secure})", summary["mean_round_seconds"], "s", anchor,
             "secure=none", device, update_values=summary["init"]["update_values"], rounds=args.rounds,
             local_steps=args.local_steps, clients=3, global_loss=summary["global_loss"],
             note="3 SuperNodes + SuperLink on one shared 2-core machine; includes Flower's process start per message")


# ----------------------------------------------------------------------------- quality


def _pooled_windows(paths, seq_len, batch_size, seed, tmp: Path, name: str):
    from seekdeep.data import TokenWindows
    from seekdeep.data.tokens import read_token_info

    chunks = [np.memmap(p, dtype=read_token_info(p)["dtype"], mode="r") for p in paths]
    pooled = np.concatenate(chunks).astype(chunks[0].dtype)
    path = tmp / f"{name}.bin"
    pooled.tofile(path)
    info = dict(read_token_info(paths[0]), num_tokens=int(pooled.size))
    (tmp / f"{name}.bin.json").write_text(json.dumps(info))
    return TokenWindows(path, seq_len, batch_size, seed=seed)


def _lr_at(cfg, total_steps: int, lr: float | None = None):
    """lr_at(t) for a run of ``total_steps`` steps under ``cfg``'s schedule (``--schedule``,
    ``--min-lr-ratio``, ``--warmup-steps``), with ``cfg``'s lr or ``lr``: the product's own
    :func:`seekdeep.fl.app.common.scheduled_lr`, over the run's own steps (its warmup scaled to
    them: ``warmup_steps`` is in client steps). The federated arms use the ClientApp's
    :func:`client_lr_at` through ``site_round``."""
    from dataclasses import replace

    from seekdeep.fl.app.common import scheduled_lr

    cfg = replace(cfg, lr=lr if lr is not None else cfg.lr)
    warmup = cfg.warmup_steps * total_steps // (cfg.rounds * cfg.local_steps)
    return lambda t: scheduled_lr(cfg, t, total_steps, warmup)


def _federate(init_dir: Path, clients, cfg, strategy: str, seed: int, args, evaluate, budgets) -> dict[int, float]:
    """The federated rounds in one process: each client runs the ClientApp's ``local_train``
    from the global model on its own stream (``site_windows``, as the ClientApp reads it), its
    delta is quantised exactly as the Paillier path encodes it, the server's aggregator sums
    them with the round's integer weights, and the key holders' :class:`GlobalState` applies
    the server step (FedAvg or FedAvgM). Returns the global model's held-out loss after each
    round in ``budgets``."""
    from seekdeep.fl import paillier
    from seekdeep.fl.aggregation import ServerAggregator
    from flwr.app import Context, RecordDict

    from seekdeep.fl.app.client import site_round
    from seekdeep.fl.app.common import (GlobalState, flat_trainable, load_flat, load_initial_model, model_layout,
                                        packing_spec, site_windows)

    spec = packing_spec(cfg)
    model = load_initial_model(init_dir, cfg.method)
    layout = model_layout(model, cfg.method)
    init_vector = flat_trainable(model, cfg.method, layout)
    state = GlobalState.zeros(layout.size, cfg)
    server = ServerAggregator(spec, layout.size)
    rng = np.random.default_rng(seed)
    mu = cfg.proximal_mu if strategy == "fedprox" else 0.0
    losses = {}
    # each client's Flower node state (context.state): with client_optimizer="keep" its AdamW state
    # goes through it between rounds exactly as in the ClientApp (saved, then loaded into a fresh AdamW)
    contexts = [Context(run_id=0, node_id=i, node_config={}, state=RecordDict(), run_config={})
                for i in range(len(clients))]
    for round_no in range(1, cfg.rounds + 1):
        deltas = []
        global_vector = init_vector + state.delta
        for i, client in enumerate(clients):
            torch.manual_seed(seed * 100 + i)
            load_flat(model, cfg.method, layout, global_vector)
            windows = site_windows(Path(client["dir"]) / "train.bin", cfg, i, round_no)
            site_round(model, windows, cfg, contexts[i], round_no, cfg.rounds, mu)  # the ClientApp's lr schedule
            delta = flat_trainable(model, cfg.method, layout) - global_vector
            q, _ = paillier.quantize(delta, spec, rng)  # what the encrypted path carries
            deltas.append(paillier.dequantize_sum(q, spec, 1, 1))
        weights, _ = paillier.round_weights([1.0] * len(clients), spec.total_weight)
        summed = server.accumulate([server.check(d, None) for d in deltas], weights)
        state.apply(summed / sum(weights), cfg)
        if round_no in budgets:
            load_flat(model, cfg.method, layout, init_vector + state.delta)
            losses[round_no] = evaluate(model)
    return losses


def _train_curve(model, windows, steps: int, lr_value: float, cfg, args, evaluate, at_steps: dict[int, int],
                 proximal_mu: float = 0.0) -> dict[int, float]:
    """One run of ``steps`` steps (one optimizer), evaluated after ``at_steps[r]`` steps for
    every budget r; returns {r: held-out loss}."""
    from seekdeep.fl.app.client import local_train

    wanted = {n: r for r, n in at_steps.items()}
    losses = {}

    def after(n: int) -> None:
        if n in wanted:
            losses[wanted[n]] = evaluate(model)

    local_train(model, windows, steps, lr_value, cfg.method, proximal_mu, lr_at=_lr_at(cfg, steps, lr_value),
                after_step=after)
    return losses


def _plot_curves(rows, budgets, steps_per_round: int, path: Path) -> None:
    """Held-out perplexity (mean over seeds, band: min..max) against the client steps of each
    budget, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(n for n, r in rows if r):
        ppl = np.exp(np.array([rows[(name, r)] for r in budgets]))  # (budgets, seeds)
        xs = [r * steps_per_round for r in budgets]
        ax.plot(xs, ppl.mean(1), "o-", label=name)
        ax.fill_between(xs, ppl.min(1), ppl.max(1), alpha=0.2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("total client steps (= centralized A's steps; the same examples for every arm)")
    ax.set_ylabel("held-out perplexity")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


OPTIMIZER_TAGS = {"keep": "client AdamW kept across rounds", "reset": "client AdamW reset every round"}


def quality(args) -> None:
    """Held-out perplexity against the budget (rounds): the federated arms after each round in
    ``--budgets``, every other arm after the same data and the steps its definition gives that
    budget, all on one fixed evaluation set, per seed (the same initial model and data for
    every arm of a seed), ratios taken per seed."""
    from dataclasses import replace

    from seekdeep.auto import AutoTokenizer
    from seekdeep.fl.app.common import load_initial_model, site_windows
    from seekdeep.fl.config import FLConfig
    from seekdeep.recipes.fl import _heldout_losses, build_client_data, build_initial_model

    device = _device()
    budgets = sorted(set(args.budgets))
    total_rounds = budgets[-1]
    rows: dict[tuple[str, int], list[float]] = {}
    k = 3
    anchor_a = "centralized A: equal total client steps"
    anchor_b = "centralized B: equal optimizer steps on the pooled batch"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fl-quality-") as tmp:
        tmp = Path(tmp)
        for seed in args.seed_list:
            seed_started = time.perf_counter()
            for split in args.splits:
                cfg = FLConfig(base=args.base, method=args.method, split=split, rounds=total_rounds,
                               local_steps=args.local_steps, batch_size=args.batch_size, seq_len=args.seq_len,
                               eval_batches=args.eval_batches, seed=seed, progress=False, output_dir=str(tmp),
                               lr=args.lr, proximal_mu=args.proximal_mu, num_clients=k, lr_schedule=args.schedule,
                               warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio)
                init_dir = tmp / f"init-{seed}"
                if not init_dir.exists():
                    build_initial_model(cfg, init_dir)
                clients = build_client_data(cfg, AutoTokenizer.from_pretrained(init_dir / "model"), tmp / f"data-{split}")
                if split == "iid":
                    # one fixed evaluation set for every arm and budget: the first eval_batches * eval_batch_size
                    # windows of each iid client's held-out side (each holds a share of every package's modules,
                    # so their mean is the same mix for both splits)
                    eval_clients = clients
                    eval_cfg = replace(cfg, batch_size=args.eval_batch_size)

                def evaluate(model) -> float:
                    return float(np.mean(_heldout_losses(model, eval_clients, eval_cfg)))

                def record(name: str, losses: dict[int, float]) -> None:
                    for r in budgets:
                        rows.setdefault((name, r), []).append(losses[r])
                    print(json.dumps({"seed": seed, "arm": name, "loss": {r: losses[r] for r in budgets},
                                      "load": os.getloadavg()[0], "t": round(time.perf_counter() - started, 1)}),
                          file=sys.stderr, flush=True)

                steps_per_client = total_rounds * cfg.local_steps
                if split == "iid" and args.anchors:  # the pooled data is the same for both splits: train centralized once
                    central_lr = args.central_lr or cfg.learning_rate
                    for name, mult, batch in ((anchor_a, k, cfg.batch_size), (anchor_b, 1, k * cfg.batch_size))[
                            :2 if args.anchor_b else 1]:
                        torch.manual_seed(seed)
                        central = load_initial_model(init_dir, cfg.method)
                        windows = _pooled_windows([Path(c["dir"]) / "train.bin" for c in clients], cfg.seq_len,
                                                  batch, seed, tmp, f"pooled-{seed}-{batch}")
                        record(name, _train_curve(central, windows, mult * steps_per_client, central_lr, cfg, args,
                                                  evaluate, {r: mult * r * cfg.local_steps for r in budgets}))
                if split == "iid":
                    rows.setdefault(("initial", 0), []).append(evaluate(load_initial_model(init_dir, cfg.method)))
                variants = [("fedavg", "", {})]
                if args.server_lr != 1.0 or args.server_momentum != 0.0:
                    tag = f" (server lr {args.server_lr}, momentum {args.server_momentum})"
                    variants += [("fedavg", tag, dict(server_lr=args.server_lr, server_momentum=args.server_momentum))]
                if args.fedprox:
                    variants += [("fedprox", "", {})]
                for strategy, tag, extra in variants:
                    for mode in args.client_optimizer:
                        name = f"{strategy} {split}{tag} ({OPTIMIZER_TAGS[mode]})"
                        record(name, _federate(init_dir, clients, replace(cfg, **extra, client_optimizer=mode),
                                               strategy, seed, args, evaluate, budgets))
                if args.local_only and (split == "iid" or args.local_package):
                    per_client = []
                    for i, client in enumerate(clients):
                        torch.manual_seed(seed * 100 + i)
                        model = load_initial_model(init_dir, cfg.method)
                        windows = site_windows(Path(client["dir"]) / "train.bin", cfg, i, 1)  # the same stream
                        per_client.append(_train_curve(model, windows, steps_per_client, cfg.learning_rate, cfg, args,
                                                       evaluate, {r: r * cfg.local_steps for r in budgets}))
                    record(f"local-only {split} (mean of clients)",
                           {r: float(np.mean([c[r] for c in per_client])) for r in budgets})
            print(json.dumps({"seed": seed, "seconds": round(time.perf_counter() - seed_started, 1),
                              "load": os.getloadavg()[0],
                              **{f"{n} @{r}": round(math.exp(v[-1]), 2) for (n, r), v in rows.items()}}),
                  file=sys.stderr, flush=True)
    seeds = len(args.seed_list)
    if args.plot:
        _plot_curves(rows, budgets, k * args.local_steps, Path(args.plot))
    definitions = {anchor_a: "clients * r * local_steps steps of batch_size on the pooled data (as many steps and "
                             "examples as all clients together)",
                   anchor_b: "r * local_steps steps of clients * batch_size (as many sequential updates as a client, "
                             "the same examples)"}
    for (name, r), losses in rows.items():
        ppl = [math.exp(x) for x in losses]
        for anchor_name in ((anchor_a, anchor_b)[:2 if args.anchor_b else 1] if args.anchors else ("",)):
            anchor_ppl = [math.exp(x) for x in rows[(anchor_name, r)]] if r and args.anchors else [math.nan] * seeds
            # the ratio per seed (same initial model and data), then its mean and spread
            ratios = [p / a for p, a in zip(ppl, anchor_ppl)]
            emit(f"held-out perplexity: {name}", float(np.mean(ppl)), "ppl", float(np.mean(anchor_ppl)), anchor_name,
                 device, budget_rounds=r, client_steps=k * r * args.local_steps,
                 examples=k * r * args.local_steps * args.batch_size, std=float(np.std(ppl)), seeds=seeds,
                 seed_list=args.seed_list, per_seed=[round(p, 3) for p in ppl],
                 ratio_per_seed=[round(x, 4) for x in ratios],
                 ratio_per_seed_mean=float(np.mean(ratios)), ratio_per_seed_std=float(np.std(ratios)),
                 method=args.method, local_steps=args.local_steps, batch_size=args.batch_size,
                 seq_len=args.seq_len, clients=k, lr=args.lr, central_lr=args.central_lr or args.lr,
                 schedule=args.schedule, warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio, server_lr=args.server_lr, server_momentum=args.server_momentum,
                 eval_windows_per_client=args.eval_batches * args.eval_batch_size,
                 anchor_definition=definitions.get(anchor_name, "none: --no-anchors (a lever screen; the "
                                                                "anchors of the same seed come from another run)"),
                 aggregation="in-process, ServerAggregator + 16-bit stochastic quantisation",
                 load_end=os.getloadavg()[0], seconds=round(time.perf_counter() - started, 1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("crypto", "rounds", "quality"))
    parser.add_argument("--key-bits", type=int, default=2048)
    parser.add_argument("--values", type=int, default=20000, help="crypto: parameters per update")
    parser.add_argument("--naive-values", type=int, default=200, help="crypto: values timed with per-value encrypt")
    parser.add_argument("--base", default=None, help="model directory (default: as `seekdeep fl`)")
    parser.add_argument("--method", default="lora", choices=("lora", "full"))
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--local-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-batches", type=int, default=12,
                        help="quality: evaluation batches per client (the same windows for every arm and budget)")
    parser.add_argument("--eval-batch-size", type=int, default=16, help="quality: windows per evaluation batch")
    parser.add_argument("--seeds", type=int, default=3, help="quality: seeds 0..N-1 (or --seed-list)")
    parser.add_argument("--seed-list", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="quality: comma-separated seeds (e.g. to run seeds in parallel processes)")
    parser.add_argument("--budgets", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="quality: comma-separated rounds at which every arm is evaluated (default: 2,4,8,16,32)")
    parser.add_argument("--client-optimizer", type=lambda s: s.split(","), default=["keep"],
                        help="quality: comma-separated client_optimizer modes to run, each a federated arm: keep "
                             "(AdamW state kept across rounds in the node state; the default of `seekdeep fl`), "
                             "reset (a fresh AdamW every round)")
    parser.add_argument("--plot", default=None, help="quality: write the perplexity curves to this PNG")
    parser.add_argument("--fedprox", action="store_true", help="quality: also FedProx (--proximal-mu)")
    parser.add_argument("--splits", type=lambda s: s.split(","), default=["iid", "package"],
                        help="quality: comma-separated splits (iid first: it defines the anchors and the eval set)")
    parser.add_argument("--no-anchors", dest="anchors", action="store_false",
                        help="quality: skip the centralized anchors (a screen of federated settings whose anchors, "
                             "deterministic per seed, another run measured)")
    parser.add_argument("--no-anchor-b", dest="anchor_b", action="store_false",
                        help="quality: only anchor A (equal total client steps), e.g. at long budgets")
    parser.add_argument("--no-local-only", dest="local_only", action="store_false",
                        help="quality: skip the local-only models (the floor)")
    parser.add_argument("--local-package", action="store_true",
                        help="quality: also the local-only models of the by-package split")
    parser.add_argument("--lr", type=float, default=None, help="quality: client (and centralized) learning rate")
    parser.add_argument("--central-lr", type=float, default=None, help="quality: centralized lr (default: --lr)")
    parser.add_argument("--server-lr", type=float, default=1.0, help="quality: FedAvg(M) server learning rate")
    parser.add_argument("--server-momentum", type=float, default=0.0, help="quality: FedAvgM server momentum")
    parser.add_argument("--proximal-mu", type=float, default=0.01, help="quality: FedProx mu")
    parser.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                        help="quality: lr schedule of every arm (FLConfig.lr_schedule), each over its own steps "
                             "of the LARGEST budget: a smaller budget is a point on that curve, so for finished "
                             "cosine schedules run one budget per process")
    parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="quality: cosine floor (x peak lr)")
    parser.add_argument("--warmup-steps", type=int, default=0,
                        help="quality: linear warmup in client steps (scaled to each arm's own steps)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: the machine is shared; spinning OpenMP threads stall when oversubscribed)")
    args = parser.parse_args()
    if not set(args.client_optimizer) <= set(OPTIMIZER_TAGS):
        parser.error(f"--client-optimizer: keep and/or reset, got {args.client_optimizer}")
    if args.splits[0] != "iid" or not set(args.splits) <= {"iid", "package"}:
        parser.error(f"--splits: iid first, then optionally package; got {args.splits}")
    torch.set_num_threads(args.threads)
    if args.part == "crypto":
        crypto(args)
    elif args.part == "rounds":
        args.rounds, args.local_steps = args.rounds or 2, args.local_steps or 10
        rounds(args)
    else:
        args.local_steps = args.local_steps or 8
        args.budgets = args.budgets or ([args.rounds] if args.rounds else [2, 4, 8, 16, 32])
        args.seed_list = args.seed_list if args.seed_list is not None else list(range(args.seeds))
        quality(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
