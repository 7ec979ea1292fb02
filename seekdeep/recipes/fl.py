"""``seekdeep fl``: a federation on Flower with packed Paillier secure aggregation.

With no arguments: the Python standard library split by package across 3 clients (non-IID by
construction; ``--split iid`` deals modules round-robin instead), a real ``flower-superlink``
and 3 ``flower-supernode`` processes on 127.0.0.1 (Flower's deployment engine), federated LoRA
with FedAvg over a few rounds, every update packed and encrypted under the clients' shared
Paillier key (the server holds the public key only). Then the held-out perplexity of the
global model next to each client's local-only model (same steps on its own data), a per-round
progress line, ``rounds.jsonl``, ``summary.json`` (last) and ``loss.png``.

Layout of the run directory: ``init/`` (the public initial model every site starts from),
``data/client-i/`` (each site's token files), ``keys/`` (``public.json`` for the server,
``private.json`` for the clients: this process is the local key holder), ``app/`` (the Flower
app's pyproject), ``logs/``, ``checkpoints/round-NNNN/`` (every round's encrypted aggregate, written by
the server), ``final/`` (the global model: the adapter in peft's layout, or the full model).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from seekdeep.errors import CheckpointError, ConfigError
from seekdeep.fl.config import FLConfig

#: packages federated by default: three clients of about 400 KB each with --split package
DEFAULT_PACKAGES = "email,xml,logging,urllib,html,json"


# ----------------------------------------------------------------------------- data


def client_texts(cfg: FLConfig) -> list[dict[str, Any]]:
    """Per client: its train / held-out texts and the packages they come from. ``package``:
    whole packages per client, balanced by bytes (largest first onto the lightest client);
    ``iid``: every package's modules dealt round-robin, so each client sees every package."""
    from seekdeep.recipes.finetune import package_split

    names = [p.strip() for p in (cfg.packages or DEFAULT_PACKAGES).split(",") if p.strip()]
    if cfg.split == "package" and len(names) < cfg.num_clients:
        raise ConfigError("packages", f"{len(names)} package(s) for {cfg.num_clients} clients; --split package needs "
                          "at least one package per client")
    splits = {name: package_split(name) for name in names}
    clients = [{"train": [], "heldout": [], "packages": []} for _ in range(cfg.num_clients)]
    if cfg.split == "package":
        load = [0] * cfg.num_clients
        for name in sorted(names, key=lambda n: -sum(len(t) for t in splits[n][0])):
            i = min(range(cfg.num_clients), key=load.__getitem__)
            clients[i]["train"] += splits[name][0]
            clients[i]["heldout"] += splits[name][1]
            clients[i]["packages"].append(name)
            load[i] += sum(len(t) for t in splits[name][0])
    else:
        for name in names:
            train, heldout = splits[name]
            for j, text in enumerate(train):
                clients[j % cfg.num_clients]["train"].append(text)
            for j, text in enumerate(heldout):
                clients[j % cfg.num_clients]["heldout"].append(text)
            for c in clients:
                c["packages"].append(name)
    return clients


def build_client_data(cfg: FLConfig, tokenizer, data_dir: Path) -> list[dict[str, Any]]:
    """Token files ``data_dir/client-i/{train,heldout}.bin`` (reused when unchanged)."""
    import hashlib

    from seekdeep.data import build_token_file, tokenizer_fingerprint

    info = []
    for i, client in enumerate(client_texts(cfg)):
        folder = data_dir / f"client-{i}"
        entry: dict[str, Any] = {"packages": client["packages"], "dir": str(folder)}
        for side in ("train", "heldout"):
            digest = hashlib.sha256(json.dumps([tokenizer_fingerprint(tokenizer), client[side]]).encode()).hexdigest()[:16]
            token_info = build_token_file(iter(client[side]), tokenizer, folder / f"{side}.bin", source_fingerprint=digest)
            need = cfg.seq_len * (cfg.batch_size if side == "train" else 1)
            if token_info["num_tokens"] < need:
                raise ConfigError("packages", f"client {i} has {token_info['num_tokens']} {side} tokens, fewer than "
                                  f"{need}; give larger packages or a smaller --seq-len")
            entry[f"{side}_tokens"] = token_info["num_tokens"]
        info.append(entry)
    return info


# ----------------------------------------------------------------------------- the initial model


def _fresh_tiny_model(seed: int):
    from seekdeep.data import default_cache_dir, get_or_train_tokenizer, iter_documents, stdlib_files
    from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM

    files = stdlib_files(limit_bytes=2_000_000)
    tokenizer = get_or_train_tokenizer(lambda: iter_documents(files), 2048, default_cache_dir(), "fl-stdlib-2mb")
    config = LlamaConfig.from_name("tiny", vocab_size=tokenizer.vocab_size, max_position_embeddings=1024,
                                   bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id, attention_backend="sdpa")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.init_weights()
    return model, tokenizer


def build_initial_model(cfg: FLConfig, init_dir: Path) -> dict[str, Any]:
    """``init_dir/model`` (+ ``adapter`` for LoRA) and ``layout.json``: the public starting point."""
    from seekdeep.auto import AutoModel, AutoTokenizer
    from seekdeep.fl.app.common import ADAPTER, model_layout
    from seekdeep.peft.config import parse_lora_spec
    from seekdeep.recipes.finetune import default_base
    from seekdeep.train import publish_dir

    if cfg.base is not None:
        base = Path(cfg.base)
        model, tokenizer = AutoModel.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    elif cfg.method == "lora":
        base = default_base(cfg.progress)
        model, tokenizer = AutoModel.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    else:
        base, (model, tokenizer) = None, _fresh_tiny_model(cfg.seed)
    if cfg.method == "lora":
        torch.manual_seed(cfg.seed)
        model.add_adapter(ADAPTER, parse_lora_spec(cfg.lora))

    def write(tmp: Path) -> None:
        if cfg.method == "lora":
            _save_base(model, tmp / "model")
            model.save_adapter(tmp / "adapter", adapter_name=ADAPTER)
        else:
            model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        (tmp / "layout.json").write_text(json.dumps(model_layout(model, cfg.method).to_dict()), encoding="utf-8")

    publish_dir(init_dir, write)
    layout = model_layout(model, cfg.method)
    return {"base": str(base) if base else None, "update_values": layout.size,
            "model_parameters": sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)}


def _save_base(model, directory: Path) -> None:
    """The base weights without the adapter (peft-style: the adapter is saved beside it)."""
    import copy

    bare = copy.deepcopy(model).unload()
    bare.save_pretrained(directory)


# ----------------------------------------------------------------------------- evaluation


def _heldout_losses(model, clients: list[dict[str, Any]], cfg: FLConfig) -> list[float]:
    from seekdeep.data import TokenWindows
    from seekdeep.train import mean_loss

    losses = []
    for client in clients:
        windows = TokenWindows(Path(client["dir"]) / "heldout.bin", cfg.seq_len, cfg.batch_size, shuffle=False)
        losses.append(mean_loss(model, windows.eval_batches(cfg.eval_batches)))
    return losses


def global_model_from_checkpoint(out: Path, cfg: FLConfig, private_key):
    """The key holder's view: the initial model plus the global delta rebuilt from every round's
    aggregate (SecAgg+: the plaintext global weights the server checkpointed)."""
    from seekdeep.fl.app.common import GlobalState, flat_trainable, load_flat, load_initial_model, model_layout
    from seekdeep.fl.app.server import latest_round_checkpoint, read_aggregates, read_round_checkpoint

    model = load_initial_model(out / "init", cfg.method)
    layout = model_layout(model, cfg.method)
    if cfg.secure == "secaggplus":  # SecAgg+ reveals the aggregate: the server keeps the weights themselves
        latest = latest_round_checkpoint(out)
        if latest is None:
            raise CheckpointError(f"{out / 'checkpoints'}: no round checkpoint; the server finished no round")
        state, payload = read_round_checkpoint(latest)
        vector = np.asarray(payload, dtype=np.float64)
    else:
        aggregates = read_aggregates(out)
        if not aggregates:
            raise CheckpointError(f"{out / 'checkpoints'}: no round checkpoint; the server finished no round")
        state = aggregates[-1][0]
        replayed = GlobalState.zeros(layout.size, cfg).replay([(p, int(s["total_weight"])) for s, p in aggregates],
                                                              cfg, layout.size, private_key)
        vector = flat_trainable(model, cfg.method, layout) + replayed.delta
    load_flat(model, cfg.method, layout, vector)
    return model, state


def local_only_losses(out: Path, cfg: FLConfig, clients: list[dict[str, Any]], progress: bool) -> list[dict[str, Any]]:
    """Each client alone: the same initial model, ``rounds * local_steps`` steps on its own data."""
    from seekdeep.data import TokenWindows
    from seekdeep.fl.app.client import local_train
    from seekdeep.fl.app.common import load_initial_model, scheduled_lr

    results = []
    for i, client in enumerate(tqdm(clients, desc="local-only models", disable=not progress)):
        torch.manual_seed(cfg.seed + i)
        model = load_initial_model(out / "init", cfg.method)
        windows = TokenWindows(Path(client["dir"]) / "train.bin", cfg.seq_len, cfg.batch_size, seed=cfg.seed + 1000 * i)
        steps = cfg.rounds * cfg.local_steps  # the clients' schedule over the same steps
        local_train(model, windows, steps, cfg.learning_rate, cfg.method, lr_at=lambda k: scheduled_lr(cfg, k, steps))
        losses = _heldout_losses(model, clients, cfg)
        results.append({"client": i, "own_loss": losses[i], "mean_loss": float(np.mean(losses)), "losses": losses})
    return results


def global_loss_curve(rounds: list[dict[str, Any]], final_loss: float) -> list[tuple[int, float]]:
    """(round r, held-out loss of the global model after round r) for r = 0..R: the clients
    report the model they received at the start of round r + 1; the last is the recipe's."""
    curve = [(r["round"] - 1, r["loss_before"]) for r in rounds if "loss_before" in r]
    return curve + [(rounds[-1]["round"] if rounds else 0, final_loss)]


def plot_rounds(rounds: list[dict[str, Any]], curve: list[tuple[int, float]], local: list[dict[str, Any]],
                out_png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [r["round"] for r in rounds]
    if any("train_loss" in r for r in rounds):
        ax.plot(xs, [r.get("train_loss", math.nan) for r in rounds], "s--", label="clients' train loss (mean)")
    ax.plot(*zip(*curve), "o-", label="global model after the round, clients' held-out (mean)")
    for entry in local:
        ax.axhline(entry["mean_loss"], linestyle=":", linewidth=1, color="gray")
    if local:
        ax.plot([], [], ":", color="gray", label="local-only models (end), all held-out")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- the run


def _read_rounds(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _raise_on_sigterm():
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm(previous) -> None:
    import signal

    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def run_fl(cfg: FLConfig, *, node_faults: dict[int, dict[str, Any]] | None = None, on_federation=None) -> dict[str, Any]:
    """Run (or resume) a local federation; returns the summary (also ``summary.json``).

    node_faults: extra node config per client index (drills: ``{"fault": "shape", "fault-round": 2}``).
    on_federation: called with the running :class:`LocalFederation` on every poll (drills)."""
    from seekdeep.auto import AutoTokenizer
    from seekdeep.files import read_json, write_json_atomic
    from seekdeep.fl.app.common import ADAPTER
    from seekdeep.fl.federation import FederationError, LocalFederation, write_app
    from seekdeep.fl.keys import generate_keypair, load_private_key
    from seekdeep.train import prepare_run_dir, publish_dir

    out = prepare_run_dir(cfg.output_dir, command="fl", overwrite=cfg.overwrite, resume=cfg.resume)
    saved = out / "fl-config.json"
    resuming = cfg.resume == "auto" and saved.is_file() and (out / "init" / "layout.json").is_file()
    if resuming:
        # the run's identity from its saved config; --rounds (and the round timeout) from this command,
        # as `seekdeep train --resume auto` takes --steps: a larger --rounds extends a finished run
        cfg = replace(FLConfig.from_dict(read_json(saved)), progress=cfg.progress, resume="auto", overwrite=False,
                      output_dir=cfg.output_dir, rounds=cfg.rounds, round_timeout=cfg.round_timeout)
        done = len(_read_rounds(out / "rounds.jsonl"))
        if cfg.rounds < done:
            raise ConfigError("rounds", f"{cfg.rounds}, but the run in {out} completed {done} rounds; accepted: "
                              f"--rounds >= {done} (larger continues it)")
        if cfg.rounds > done:  # extending: the old summary no longer describes the run until it finishes again
            (out / "summary.json").unlink(missing_ok=True)
        write_json_atomic(saved, cfg.to_dict())
        init_info = read_json(out / "init-info.json")
    else:
        for stale in ("rounds.jsonl", "server-error.json"):
            (out / stale).unlink(missing_ok=True)
        write_json_atomic(saved, cfg.to_dict())
        init_info = build_initial_model(cfg, out / "init")
        write_json_atomic(out / "init-info.json", init_info)
    tokenizer = AutoTokenizer.from_pretrained(out / "init" / "model")
    clients = build_client_data(cfg, tokenizer, out / "data")
    keys = out / "keys"
    if cfg.secure == "paillier" and not (keys / "private.json").is_file():
        generate_keypair(keys, cfg.key_bits)
    run_config = {"fl_config": json.dumps(cfg.to_dict()), "run_dir": str(out.resolve()),
                  "init_dir": str((out / "init").resolve()),
                  "public_key_file": str((keys / "public.json").resolve()) if cfg.secure == "paillier" else "",
                  "resume": bool(resuming)}
    app_dir = write_app(out / "app", run_config, cfg.secure)
    node_configs = []
    for i, client in enumerate(clients):
        node = {"partition-id": i, "num-partitions": cfg.num_clients, "data-dir": str(Path(client["dir"]).resolve()),
                # all sites share this host's cores
                "torch-threads": max(1, (os.cpu_count() or 1) // cfg.num_clients)}
        if cfg.secure == "paillier":
            node["key-file"] = str((keys / "private.json").resolve())
        node.update((node_faults or {}).get(i, {}))
        node_configs.append(node)
    (out / "server-error.json").unlink(missing_ok=True)

    done_before = len(_read_rounds(out / "rounds.jsonl"))
    print(f"seekdeep fl: {cfg.num_clients} clients ({cfg.split} split: "
          f"{'; '.join('+'.join(c['packages']) for c in clients) if cfg.split == 'package' else 'modules dealt round-robin'}), "
          f"{cfg.method} ({init_info['update_values']:,d} values per update), {cfg.strategy}, secure={cfg.secure}, "
          f"rounds {done_before + 1}..{cfg.rounds}", file=sys.stderr)
    bar = tqdm(total=cfg.rounds, initial=done_before, desc="fl rounds", disable=not cfg.progress, dynamic_ncols=True)
    seen = [done_before]
    federation = LocalFederation(out, node_configs)

    def poll() -> None:
        rounds = _read_rounds(out / "rounds.jsonl")
        for r in rounds[seen[0]:]:
            loss = r.get("loss_before", math.nan)
            line = (f"round {r['round']}/{cfg.rounds}: {r['accepted']} of {r['replies']} updates accepted"
                    + (f", rejected {[(x['node'], x['reason']) for x in r['rejected']]}" if r["rejected"] else "")
                    + f", clients' train loss {r.get('train_loss', math.nan):.4f}; global model of round {r['round'] - 1}: "
                      f"held-out loss {loss:.4f} (ppl {math.exp(loss):.2f}); {r['round_seconds']:.1f}s")
            tqdm.write(line, file=sys.stderr)
            bar.update(1)
        seen[0] = len(rounds)
        if on_federation is not None:
            on_federation(federation)

    started = time.perf_counter()
    previous = _raise_on_sigterm()
    try:
        code = 0
        if done_before < cfg.rounds:  # every round done (a run stopped after its last round): only the evaluation
            federation.start()
            code = federation.run(app_dir, on_poll=poll)
    finally:  # also on Ctrl-C, SIGTERM or a failure: every process group we started is stopped
        federation.stop()
        bar.close()
        _restore_sigterm(previous)
    fl_seconds = time.perf_counter() - started
    rounds = _read_rounds(out / "rounds.jsonl")
    error = read_json(out / "server-error.json") if (out / "server-error.json").is_file() else None
    if error is not None:
        raise FederationError(f"the federation stopped: {error['error']}")
    if code != 0 or len(rounds) < cfg.rounds:
        way_on = (f"The last completed round is checkpointed: `seekdeep fl --output-dir {cfg.output_dir} --resume auto` "
                  "continues from it" if rounds else
                  f"No round completed: `seekdeep fl --output-dir {cfg.output_dir} --overwrite` starts over")
        raise FederationError(f"the federation stopped after {len(rounds)} of {cfg.rounds} rounds (flwr run exit code "
                              f"{code}; logs in {out / 'logs'}). {way_on}")

    private_key = load_private_key(keys / "private.json") if cfg.secure == "paillier" else None
    model, state = global_model_from_checkpoint(out, cfg, private_key)
    global_losses = _heldout_losses(model, clients, cfg)
    local = local_only_losses(out, cfg, clients, cfg.progress) if cfg.local_only else []

    def write_final(tmp: Path) -> None:
        if cfg.method == "lora":
            model.save_adapter(tmp, adapter_name=ADAPTER)
        else:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)

    publish_dir(out / "final", write_final)
    curve = global_loss_curve(rounds, float(np.mean(global_losses)))
    plot_rounds(rounds, curve, local, out / "loss.png", f"seekdeep fl: {cfg.method}, {cfg.strategy}, {cfg.split} split, "
                f"secure={cfg.secure}")
    summary = {
        "config": cfg.to_dict(), "clients": clients, "init": init_info, "rounds": len(rounds),
        "resumed_after_round": done_before if resuming else None,
        "global_loss_per_round": curve, "global_loss_per_client": global_losses, "global_loss": float(np.mean(global_losses)),
        "global_ppl": math.exp(float(np.mean(global_losses))),
        "local_only": local,
        "local_only_mean_loss": float(np.mean([e["mean_loss"] for e in local])) if local else None,
        "local_only_own_loss": float(np.mean([e["own_loss"] for e in local])) if local else None,
        "rejected": [dict(x, round=r["round"]) for r in rounds for x in r["rejected"]],
        "fl_seconds": fl_seconds, "mean_round_seconds": float(np.mean([r["round_seconds"] for r in rounds])),
        "aggregate_bytes": rounds[-1]["aggregate_bytes"], "final": str(out / "final"), "loss_png": str(out / "loss.png"),
        "base": init_info["base"],
    }
    write_json_atomic(out / "summary.json", summary)
    return summary


def cmd_fl(args: argparse.Namespace) -> int:
    from dataclasses import fields

    cfg = FLConfig(**{f.name: getattr(args, f.name) for f in fields(FLConfig)})
    summary = run_fl(cfg)
    print(f"\nglobal model: held-out perplexity {summary['global_ppl']:.2f} (loss {summary['global_loss']:.4f}, mean "
          f"over the {cfg.num_clients} clients' held-out text) after {summary['rounds']} rounds")
    for entry in summary["local_only"]:
        print(f"  client {entry['client']} local-only: perplexity {math.exp(entry['mean_loss']):.2f} on all clients' "
              f"held-out text, {math.exp(entry['own_loss']):.2f} on its own")
    if summary["rejected"]:
        print(f"rejected updates: {summary['rejected']}")
    print(f"global model: {summary['final']}  loss per round: {summary['loss_png']}")
    return 0


HELP = {
    "base": "model directory (default: lora -> the finetune recipe's default base; full -> a fresh tiny model)",
    "method": "lora (clients send adapter weights only) or full",
    "strategy": "fedavg or fedprox (proximal term in the local loss, --proximal-mu)",
    "secure": "paillier (packed, clients' shared key; default), secaggplus (Flower's SecAgg+) or none",
    "split": "package (whole stdlib packages per client: non-IID) or iid (modules dealt round-robin)",
    "packages": f"comma-separated stdlib packages to federate (default: {DEFAULT_PACKAGES})",
    "min_clients": "fewest accepted updates that make a round (default: num_clients - 1)",
    "server_lr": "server learning rate: the global step is server_lr times the mean client delta (1: FedAvg)",
    "server_momentum": "FedAvgM server momentum (0: FedAvg); applied by the key-holding clients",
    "client_optimizer": "keep (each site's AdamW state carries over between rounds, in its Flower node state; "
                        "default: measured better, see the README) or reset (a fresh AdamW every round)",
    "lr_schedule": "constant (default) or cosine: the clients' lr over the run's global steps, (round - 1) * "
                   "local_steps + k of rounds * local_steps (a restarted site continues the curve)",
    "warmup_steps": "linear warmup over the first N global client steps (default: 0)",
    "min_lr_ratio": "cosine: the last step's lr as a fraction of --lr (default: 0.1)",
    "clip": "per-round update deltas are clipped to [-clip, clip] before quantisation (default: 0.1)",
    "resume": "'auto': continue the run in --output-dir after its last completed round (its settings, --rounds "
              "aside: a larger --rounds extends a finished run)",
}


def register(subparsers) -> argparse.ArgumentParser:
    from seekdeep.cli import add_dataclass_flags

    parser = subparsers.add_parser("fl", help="federated training on Flower with packed Paillier secure aggregation "
                                   "(a local federation on 127.0.0.1 by default)")
    add_dataclass_flags(parser, FLConfig, HELP)
    parser.set_defaults(func=cmd_fl, config_cls=FLConfig)
    return parser
