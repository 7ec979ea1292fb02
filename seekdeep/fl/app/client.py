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
text rides on it): the server's running sum of round means (ciphertexts, or plaintext floats with
``--secure none``) and ``rounds-accumulated``; the client decrypts it, adds it to the initial
model, trains ``local_steps`` steps (FedProx: plus ``mu / 2 * ||w - w_global||^2``), and replies
with its delta ``w_local - w_global`` clipped, quantised, packed and encrypted.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from seekdeep.errors import ConfigError
from seekdeep.fl.app.common import (RunSettings, decode_global_delta, flat_trainable, load_flat, load_initial_model,
                                    model_layout, packing_spec, trainable_tensors)

app = ClientApp()


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
        payload = msg.content["arrays"]["global"].numpy()
        accumulated = int(msg.content["config"]["rounds-accumulated"])
        self.global_vector = self.init_vector + decode_global_delta(payload, accumulated, cfg, self.layout,
                                                                   self.private_key)
        load_flat(self.model, cfg.method, self.layout, self.global_vector)
        self.round = int(msg.content["config"]["round"])
        self.fault = str(node.get("fault", "")) if int(node.get("fault-round", 0)) == self.round else ""
        self.windows = TokenWindows(self.train_path, cfg.seq_len, cfg.batch_size,
                                    seed=cfg.seed + 1000 * self.partition + self.round)
        self.heldout = TokenWindows(self.heldout_path, cfg.seq_len, cfg.batch_size, shuffle=False)


def local_train(model, windows, steps: int, lr: float, method: str, proximal_mu: float = 0.0) -> float:
    """``steps`` AdamW steps on ``windows``; FedProx adds ``mu / 2 * ||w - w_start||^2`` over the
    trainable tensors. Returns the mean training loss."""
    params = [p for p in trainable_tensors(model, method).values() if p.requires_grad]
    anchors = [p.detach().clone() for p in params] if proximal_mu > 0 else None
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    total = 0.0
    for _ in range(steps):
        batch = windows.next_batch()
        loss = model(batch, labels=batch).loss
        total += float(loss.detach())
        if anchors is not None:
            loss = loss + 0.5 * proximal_mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    model.eval()
    return total / steps


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
    train_loss = local_train(site.model, site.windows, cfg.local_steps, cfg.learning_rate, cfg.method, mu)
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
    metrics = MetricRecord({"num-examples": cfg.local_steps * cfg.batch_size, "train-loss": train_loss,
                            "eval-loss": eval_loss,
                            "train-seconds": train_seconds, "encode-seconds": time.perf_counter() - started,
                            "clipped": clipped, "partition-id": site.partition})
    content = RecordDict({"arrays": ArrayRecord({"update": Array(np.ascontiguousarray(payload))}),
                          "metrics": metrics, "config": ConfigRecord({"key-fingerprint": key_fp})})
    return Message(content=content, reply_to=msg)


