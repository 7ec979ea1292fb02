"""The Flower ClientApp: one site's training on its own data (Message API).

Node config (``flower-supernode --node-config``):

- ``data-dir``: the site's ``train.bin`` / ``heldout.bin`` token files (built with the
  initial model's tokenizer; ``seekdeep fl`` writes them for the local federation);
- ``key-file``: the clients' shared ``private.json`` (packed Paillier only);
- ``partition-id``: an integer naming the site in logs and seeding its batches;
- ``torch-threads`` (optional): intra-op threads, for several sites sharing one host;
- ``fault`` / ``fault-round`` (tests and drills): a malformed update in that round (``nan``:
  a NaN in the delta, refused by the client's encoder before encryption, or by a plaintext
  server; ``shape``: one ciphertext short; ``key``: another key's fingerprint), to see the
  round go on without it.

Train message (the only one: evaluation of the received global model on the site's held-out
text rides on it): the round aggregates this site does not hold yet (``agg-NNNN`` arrays:
ciphertexts, or plaintext weighted sums with ``--secure none``; ``first-aggregate`` and
``aggregate-totals`` in the config). The client decrypts them, applies the server step to the
global delta it keeps in its Flower node state (:class:`GlobalState`; ``first-aggregate`` 0:
start from the initial model), trains ``local_steps`` steps (FedProx: plus
``mu / 2 * ||w - w_global||^2``), and replies with its delta ``w_local - w_global`` clipped,
quantised, packed and encrypted, and ``holds-aggregates``: how many aggregates its state holds.
With ``client_optimizer="keep"`` (default) the site's AdamW state is kept in the node state too
and the next round's local training continues from it (``optimizer-step-start`` in the reply's
metrics; the reason in ``client-optimizer`` when the kept state does not fit and is dropped).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from seekdeep.errors import ConfigError
from seekdeep.fl.app.common import (GlobalState, RunSettings, client_lr_at, flat_trainable, keep_client_optimizer, load_flat,
                                    load_initial_model, make_optimizer, model_layout, packing_spec,
                                    restore_client_optimizer, site_windows, trainable_params)

app = ClientApp()
STATE_KEY = "seekdeep-fl-global"


class _Site:
    """What one message needs: settings, node identity, model at the global weights, data."""

    def __init__(self, msg: Message, context: Context):
        from seekdeep.data import TokenWindows
        from seekdeep.fl.keys import load_private_key

        self.settings = RunSettings.from_run_config(dict(context.run_config))
        self.cfg = cfg = self.settings.cfg
        node = dict(context.node_config)
        if "torch-threads" in node:  # several sites on one host: keep them from oversubscribing the cores
            torch.set_num_threads(max(1, int(node["torch-threads"])))
        if "data-dir" not in node:
            raise ConfigError("node_config", "data-dir is missing; start the SuperNode with --node-config "
                              "\"data-dir=/path/to/site/tokens\"")
        self.partition = int(node.get("partition-id", 0))
        self.private_key = None
        if cfg.secure == "paillier":
            self.private_key = load_private_key(node.get("key-file"), field="key-file")
        data_dir = Path(str(node["data-dir"]))
        self.train_path, self.heldout_path = data_dir / "train.bin", data_dir / "heldout.bin"
        self.model = load_initial_model(self.settings.init_dir, cfg.method)
        self.layout = model_layout(self.model, cfg.method)
        self.init_vector = flat_trainable(self.model, cfg.method, self.layout)
        self.context = context
        self.state = self._global_state(msg)
        self.global_vector = self.init_vector + self.state.delta
        load_flat(self.model, cfg.method, self.layout, self.global_vector)
        self.round = int(msg.content["config"]["round"])
        if "total-rounds" not in msg.content["config"]:
            raise ConfigError("total-rounds", "missing from the server's train message (the lr schedule runs over "
                              "the rounds the server sends); server and clients must run the same seekdeep")
        self.total_rounds = int(msg.content["config"]["total-rounds"])
        self.fault = str(node.get("fault", "")) if int(node.get("fault-round", 0)) == self.round else ""
        self.windows = site_windows(self.train_path, cfg, self.partition, self.round)
        self.heldout = TokenWindows(self.heldout_path, cfg.seq_len, cfg.batch_size, shuffle=False)

    def _global_state(self, msg: Message) -> GlobalState:
        """This site's global state brought up to date with the aggregates in ``msg``."""
        config = msg.content["config"]
        first = int(config["first-aggregate"])
        totals = [int(t) for t in config["aggregate-totals"]] if "aggregate-totals" in config else []
        size = self.layout.size
        kept = self.context.state
        if first == 0 or STATE_KEY not in kept:
            state = GlobalState.zeros(size, self.cfg)
        else:
            arrays = kept[STATE_KEY]
            velocity = arrays["velocity"].numpy() if "velocity" in arrays else None
            state = GlobalState(arrays["delta"].numpy().astype(np.float64), velocity,
                                int(kept[STATE_KEY + "-info"]["aggregates"]))
        if state.aggregates != first:
            raise ConfigError("first-aggregate", f"the server sent aggregates from #{first}, this site holds "
                              f"{state.aggregates}; it sends all of them after this error")
        aggregates = [(msg.content["arrays"][f"agg-{first + i:04d}"].numpy(), total) for i, total in enumerate(totals)]
        return state.replay(aggregates, self.cfg, size, self.private_key)

    def keep_state(self) -> None:
        """Store the global state in the node's Flower context (kept by the SuperNode between messages)."""
        arrays = {"delta": Array(self.state.delta)}
        if self.state.velocity is not None:
            arrays["velocity"] = Array(self.state.velocity)
        self.context.state[STATE_KEY] = ArrayRecord(arrays)
        self.context.state[STATE_KEY + "-info"] = ConfigRecord({"aggregates": self.state.aggregates})


def local_train(model, windows, steps: int, lr: float, method: str, proximal_mu: float = 0.0, lr_at=None,
                after_step=None, optimizer=None) -> float:
    """``steps`` AdamW steps on ``windows``; FedProx adds ``mu / 2 * ||w - w_start||^2`` over the
    trainable tensors. ``lr_at(i)`` (optional): the learning rate of step i (a schedule shared
    by the federated and the centralized runs). ``after_step(n)`` (optional): called after the
    n-th step (the benchmark evaluates a run at several budgets with one optimizer; it may put
    the model in eval mode, training resumes in train mode). ``optimizer``: one built over these
    tensors by :func:`make_optimizer` whose state carries on (None: a fresh AdamW, the ClientApp's
    per-round reset). Returns the mean training loss."""
    params = list(trainable_params(model, method).values())
    anchors = [p.detach().clone() for p in params] if proximal_mu > 0 else None
    if optimizer is None:
        optimizer = make_optimizer(params, lr)
    model.train()
    total = 0.0
    for i in range(steps):
        if lr_at is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(i)
        batch = windows.next_batch()
        loss = model(batch, labels=batch).loss
        total += float(loss.detach())
        if anchors is not None:
            loss = loss + 0.5 * proximal_mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if after_step is not None:
            after_step(i + 1)
            model.train()
    model.eval()
    return total / steps


def site_optimizer(model, cfg, context: Context) -> tuple[torch.optim.Optimizer, int, str]:
    """This round's AdamW over the trainable tensors: with ``client_optimizer="keep"`` it
    continues from the state the node kept after its last round (when that state belongs to
    these tensors; else a fresh one, the reason logged). Returns (optimizer, the step count it
    starts from, a note for the round's log)."""
    from logging import WARNING

    from flwr.common import log

    named = trainable_params(model, cfg.method)
    optimizer = make_optimizer(list(named.values()), cfg.learning_rate)
    if cfg.client_optimizer == "reset":
        return optimizer, 0, "reset: a fresh AdamW every round (--client-optimizer reset)"
    step, note = restore_client_optimizer(context.state, optimizer, named, cfg.method)
    if note.startswith("dropped"):
        log(WARNING, "client optimizer state %s", note)
    return optimizer, step, note


def site_round(model, windows, cfg, context: Context, round_no: int, total_rounds: int,
               proximal_mu: float = 0.0) -> tuple[float, int, str]:
    """Round ``round_no`` of ``total_rounds`` (both from the server's message) of a site's local
    training, as every client path runs it (the Paillier ClientApp, the SecAgg+ client, the
    benchmark's in-process federation): this round's AdamW (:func:`site_optimizer`),
    ``cfg.local_steps`` steps of :func:`local_train` at the global schedule's learning rates
    (:func:`client_lr_at`), then, with ``client_optimizer="keep"``, its state saved to the node
    state for the next round. Returns (mean training loss, the AdamW step it started from, the
    optimizer note)."""
    optimizer, step_start, note = site_optimizer(model, cfg, context)
    loss = local_train(model, windows, cfg.local_steps, cfg.learning_rate, cfg.method, proximal_mu,
                       lr_at=client_lr_at(cfg, round_no, total_rounds), optimizer=optimizer)
    if cfg.client_optimizer == "keep":
        keep_client_optimizer(context.state, optimizer, trainable_params(model, cfg.method), cfg.method)
    return loss, step_start, note


@app.train()
def train(msg: Message, context: Context) -> Message:
    from seekdeep.fl import paillier
    from seekdeep.fl.keys import fingerprint

    from seekdeep.train import mean_loss

    site = _Site(msg, context)
    cfg = site.cfg
    # the global model as received, on this site's held-out text: evaluation rides on the train
    # message (a separate evaluate message would start one more ClientApp process per round)
    eval_loss = mean_loss(site.model, site.heldout.eval_batches(cfg.eval_batches))
    started = time.perf_counter()
    config = msg.content["config"]
    mu = float(config["proximal-mu"]) if "proximal-mu" in config else 0.0  # sent by Flower's FedProx
    train_loss, step_start, optimizer_note = site_round(site.model, site.windows, cfg, context, site.round,
                                                        site.total_rounds, mu)
    train_seconds = time.perf_counter() - started
    delta = flat_trainable(site.model, cfg.method, site.layout) - site.global_vector
    if site.fault == "nan":
        delta[0] = float("nan")
    spec = packing_spec(cfg)
    started = time.perf_counter()
    key_fp = ""
    clipped = int((np.abs(delta) > spec.clip).sum())
    if cfg.secure == "paillier":
        rng = np.random.default_rng([cfg.seed, site.partition, site.round])
        # a NaN/inf delta raises here, before anything is encrypted (the server could not see it)
        payload, clipped = paillier.encode_update(delta, spec, site.private_key.public_key, rng)
        key_fp = fingerprint(site.private_key.public_key)
    else:
        payload = np.clip(delta, -spec.clip, spec.clip) if site.fault != "nan" else delta
    if site.fault == "shape":
        payload = payload[:-1]
    if site.fault == "key":
        key_fp = "0" * 16
    site.keep_state()
    metrics = MetricRecord({"num-examples": cfg.local_steps * cfg.batch_size, "train-loss": train_loss,
                            "holds-aggregates": site.state.aggregates,
                            "eval-loss": eval_loss,
                            "train-seconds": train_seconds, "encode-seconds": time.perf_counter() - started,
                            "clipped": clipped, "partition-id": site.partition,
                            "optimizer-step-start": step_start})
    content = RecordDict({"arrays": ArrayRecord({"update": Array(np.ascontiguousarray(payload))}),
                          "metrics": metrics, "config": ConfigRecord({"key-fingerprint": key_fp,
                                                                      "client-optimizer": optimizer_note})})
    return Message(content=content, reply_to=msg)


