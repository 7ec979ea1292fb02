"""A site's local AdamW state kept in its Flower node state between rounds (``client_optimizer``):
the round trip through a real ``RecordDict`` continues training exactly as one optimizer would,
and a state that belongs to other tensors is dropped with the reason; and the clients' lr
schedule (``lr_schedule``): every round of a site follows one curve over the run's global steps,
the curve seekdeep.train's scheduler gives a centralized run of as many steps, also for a site
restarted mid-run (no processes here; the path through real SuperNodes is in test_fl_recipe's
full-model round, whose server sends the round and total the schedule runs on)."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Context, RecordDict
from torch.optim.optimizer import register_optimizer_step_pre_hook

from seekdeep.errors import ConfigError
from seekdeep.fl.app.client import local_train, site_optimizer, site_round
from seekdeep.fl.app.common import (client_lr_at, keep_client_optimizer, make_optimizer, restore_client_optimizer,
                                    trainable_params)
from seekdeep.fl.config import FLConfig
from seekdeep.train import make_scheduler


def _model(seed: int = 0, hidden: int = 16):
    from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_name("tiny", vocab_size=64, hidden_size=hidden, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=None, attention_backend="sdpa")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.init_weights()
    return model


class _Batches:
    """A fixed seeded token stream with TokenWindows' next_batch()."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)

    def next_batch(self) -> torch.Tensor:
        return torch.randint(0, 64, (2, 16), generator=self.gen)


def _vector(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in trainable_params(model, "full").values()])


def test_kept_state_continues_training_as_one_optimizer():
    # anchor: one AdamW over two rounds of 3 steps
    anchor = _model()
    named = trainable_params(anchor, "full")
    one = make_optimizer(list(named.values()), 1e-2)
    local_train(anchor, _Batches(1), 3, 1e-2, "full", optimizer=one)
    local_train(anchor, _Batches(2), 3, 1e-2, "full", optimizer=one)
    # the site: round 1's state saved in the node state, loaded into round 2's fresh AdamW
    site = _model()
    cfg = FLConfig(method="full", lr=1e-2)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    first, step, note = site_optimizer(site, cfg, context)
    assert step == 0 and note.startswith("fresh")
    local_train(site, _Batches(1), 3, 1e-2, "full", optimizer=first)
    keep_client_optimizer(context.state, first, trainable_params(site, "full"), "full")
    second, step, note = site_optimizer(site, cfg, context)
    assert step == 3 and note.startswith("kept")
    for p_first, p_second in zip(trainable_params(site, "full").values(), second.param_groups[0]["params"]):
        assert p_first is p_second
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(first.state[p_first][key], second.state[p_second][key])
        assert int(second.state[p_second]["step"]) == 3
    local_train(site, _Batches(2), 3, 1e-2, "full", optimizer=second)
    assert torch.equal(_vector(site), _vector(anchor))
    # a fresh AdamW in round 2 (client_optimizer="reset") lands elsewhere
    reset = _model()
    local_train(reset, _Batches(1), 3, 1e-2, "full")
    local_train(reset, _Batches(2), 3, 1e-2, "full")
    assert (_vector(reset) - _vector(anchor)).abs().max() > 1e-4
    _, step, note = site_optimizer(reset, FLConfig(method="full", client_optimizer="reset"), context)
    assert step == 0 and note.startswith("reset")


def test_state_of_other_tensors_is_dropped_with_the_reason():
    from seekdeep.peft.config import parse_lora_spec

    model = _model()
    named = trainable_params(model, "full")
    optimizer = make_optimizer(list(named.values()), 1e-2)
    local_train(model, _Batches(1), 2, 1e-2, "full", optimizer=optimizer)
    state = RecordDict()
    keep_client_optimizer(state, optimizer, named, "full")
    # another model width: same names, other shapes
    wider = _model(hidden=24)
    fresh = make_optimizer(list(trainable_params(wider, "full").values()), 1e-2)
    step, note = restore_client_optimizer(state, fresh, trainable_params(wider, "full"), "full")
    assert step == 0 and note.startswith("dropped") and "is (64, 24)" in note and "(64, 16)" in note and not fresh.state
    # the adapter of a LoRA run: other tensors
    lora = _model()
    lora.add_adapter("default", parse_lora_spec("r=2,alpha=4,targets=q_proj"))
    adapter = trainable_params(lora, "lora")
    fresh = make_optimizer(list(adapter.values()), 1e-2)
    step, note = restore_client_optimizer(state, fresh, adapter, "lora")
    assert step == 0 and note.startswith("dropped") and "lora" in note and not fresh.state


def test_client_optimizer_is_validated():
    with pytest.raises(ConfigError, match="client_optimizer"):
        FLConfig(client_optimizer="sometimes")


ROUNDS, LOCAL = 3, 4


def _centralized_lrs(cfg: FLConfig, steps: int) -> list[float]:
    """The lr of each step of a centralized run of ``steps`` steps with seekdeep.train's scheduler."""
    optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg.learning_rate)
    scheduler = make_scheduler(optimizer, cfg.warmup_steps, steps, cfg.min_lr_ratio)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


class _RecordLr:
    """Every optimizer step's lr, as the step sees it (a global step pre-hook)."""

    def __enter__(self):
        self.lrs: list[float] = []
        self.handle = register_optimizer_step_pre_hook(
            lambda opt, args, kwargs: self.lrs.append(opt.param_groups[0]["lr"]))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def test_client_rounds_follow_the_centralized_schedule_over_global_steps():
    cfg = FLConfig(method="full", lr=1e-2, rounds=ROUNDS, local_steps=LOCAL, lr_schedule="cosine", warmup_steps=2,
                   min_lr_ratio=0.2)
    central = _centralized_lrs(cfg, ROUNDS * LOCAL)
    assert len(set(central)) > ROUNDS * LOCAL - 2  # a real curve: warmup, then decay
    site, context, batches = _model(), _context(), _Batches(1)
    per_round = []
    for round_no in range(1, ROUNDS + 1):
        with _RecordLr() as rec:
            site_round(site, batches, cfg, context, round_no, ROUNDS)
        per_round.append(rec.lrs)
    # round t (1-based), local step k uses the centralized lr of global step (t - 1) * local_steps + k
    for round_no, lrs in enumerate(per_round, start=1):
        assert lrs == pytest.approx(central[(round_no - 1) * LOCAL:round_no * LOCAL], rel=1e-12, abs=0)
    # with the kept AdamW the three rounds are one centralized run of 12 steps at those lrs
    anchor = _model()
    one = make_optimizer(list(trainable_params(anchor, "full").values()), cfg.learning_rate)
    local_train(anchor, _Batches(1), ROUNDS * LOCAL, cfg.learning_rate, "full", lr_at=lambda i: central[i],
                optimizer=one)
    assert torch.allclose(_vector(site), _vector(anchor), rtol=0, atol=1e-6)
    # a site restarted before round 3 (fresh node state) still takes round 3's part of the curve
    with _RecordLr() as rec:
        site_round(_model(), _Batches(2), cfg, _context(), ROUNDS, ROUNDS)
    assert rec.lrs == pytest.approx(central[(ROUNDS - 1) * LOCAL:], rel=1e-12, abs=0)


def test_constant_schedule_is_the_plain_lr_after_warmup():
    cfg = FLConfig(method="full", lr=3e-3, rounds=ROUNDS, local_steps=LOCAL)
    assert [client_lr_at(cfg, t, ROUNDS)(k) for t in (1, ROUNDS) for k in range(LOCAL)] == [3e-3] * (2 * LOCAL)
    warm = FLConfig(method="full", lr=3e-3, rounds=ROUNDS, local_steps=LOCAL, warmup_steps=LOCAL + 2)
    lrs = [client_lr_at(warm, t, ROUNDS)(k) for t in range(1, ROUNDS + 1) for k in range(LOCAL)]
    assert lrs[:LOCAL + 2] == pytest.approx([3e-3 * (i + 1) / (LOCAL + 2) for i in range(LOCAL + 2)])
    assert lrs[LOCAL + 2:] == [3e-3] * (ROUNDS * LOCAL - LOCAL - 2)


def test_schedule_settings_are_validated():
    with pytest.raises(ConfigError, match="lr_schedule"):
        FLConfig(lr_schedule="linear")
    with pytest.raises(ConfigError, match="warmup_steps"):
        FLConfig(rounds=2, local_steps=5, warmup_steps=11)
    with pytest.raises(ConfigError, match="min_lr_ratio"):
        FLConfig(min_lr_ratio=1.5)
    cfg = FLConfig(rounds=2)
    with pytest.raises(ConfigError, match="round"):
        client_lr_at(cfg, 3, 2)
    with pytest.raises(ConfigError, match="total-rounds"):
        client_lr_at(cfg, 1, 0)
