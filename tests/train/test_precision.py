"""Precision policy, loss scaling, parameter groups and the mixed-precision optimizer."""

import copy
import io

import pytest
import torch

from seekdeep.errors import ConfigError
from seekdeep.models.deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM
from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM
from seekdeep.optim import MixedPrecisionOptimizer
from seekdeep.train import (
    DynamicLossScaler,
    PrecisionPolicy,
    StaticLossScaler,
    cast_model_for_training,
    param_groups,
)

VOCAB = 128


def tiny_llama(**overrides) -> LlamaForCausalLM:
    model = LlamaForCausalLM(LlamaConfig.from_name("tiny", vocab_size=VOCAB, **overrides))
    model.init_weights()
    return model


def batch(n=4, t=24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t))


# -- PrecisionPolicy


@pytest.mark.parametrize("kwargs, field", [(dict(precision="fp8"), "precision"), (dict(device_type="tpu"), "device_type")])
def test_policy_rejects_unknown_values(kwargs, field):
    with pytest.raises(ConfigError) as err:
        PrecisionPolicy(**kwargs)
    assert err.value.field == field
    assert "accepted" in str(err.value)
    if field == "precision":
        assert "bf16" in str(err.value) and "fp16" in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_policy_rejects_cuda_without_a_gpu():
    with pytest.raises(ConfigError, match="cuda"):
        PrecisionPolicy("bf16", "cuda")


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_policy_autocast_sets_the_compute_dtype(precision, dtype):
    policy = PrecisionPolicy(precision)
    a, b = torch.randn(4, 8), torch.randn(8, 4)
    with policy.autocast():
        out = a @ b
    assert out.dtype == dtype
    assert policy.dtype == dtype
    assert PrecisionPolicy.from_dict(policy.to_dict()) == policy


def test_policy_scaler_is_enabled_only_for_fp16():
    assert PrecisionPolicy("fp16").make_scaler().enabled
    for precision in ("fp32", "bf16"):
        scaler = PrecisionPolicy(precision).make_scaler()
        assert not scaler.enabled and scaler.scale_value == 1.0
        loss = torch.tensor(3.0)
        assert scaler.scale(loss) is loss
        w = torch.nn.Parameter(torch.ones(2))
        w.grad = torch.ones(2)
        opt = torch.optim.SGD([w], lr=1.0)
        assert scaler.step(opt) is True
        scaler.update()
        assert torch.equal(w.detach(), torch.zeros(2))


# -- DynamicLossScaler


def _quadratic_step(scaler, opt, w, poison=False):
    opt.zero_grad()
    loss = (w**2).sum()
    scaler.scale(loss).backward()
    if poison:
        w.grad[0] = float("inf")
    applied = scaler.step(opt)
    scaler.update()
    return applied


def test_scaler_skips_an_inf_step_and_backs_off():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = torch.optim.SGD([w], lr=0.1)
    scaler = DynamicLossScaler(init_scale=1024.0, backoff_factor=0.25)
    before = w.detach().clone()
    assert _quadratic_step(scaler, opt, w, poison=True) is False
    assert torch.equal(w.detach(), before)
    assert scaler.scale_value == 256.0
    assert scaler.skipped_steps == 1 and scaler.last_step_skipped
    assert _quadratic_step(scaler, opt, w) is True
    # the clean step used the true (unscaled) gradient 2w
    torch.testing.assert_close(w.detach(), before - 0.1 * 2 * before)
    assert scaler.skipped_steps == 1 and not scaler.last_step_skipped


def test_scaler_grows_after_growth_interval_clean_steps():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.01)
    scaler = DynamicLossScaler(init_scale=8.0, growth_factor=2.0, growth_interval=3)
    seen = []
    for _ in range(7):
        assert _quadratic_step(scaler, opt, w)
        seen.append(scaler.scale_value)
    assert seen == [8.0, 8.0, 16.0, 16.0, 16.0, 32.0, 32.0]


def test_scaler_state_round_trip():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.01)
    scaler = DynamicLossScaler(init_scale=64.0, growth_interval=3)
    _quadratic_step(scaler, opt, w, poison=True)
    _quadratic_step(scaler, opt, w)
    _quadratic_step(scaler, opt, w)  # growth tracker now at 2

    buf = io.BytesIO()
    torch.save(scaler.state_dict(), buf)
    buf.seek(0)
    restored = DynamicLossScaler()
    restored.load_state_dict(torch.load(buf, weights_only=True))
    assert restored.scale_value == scaler.scale_value == 32.0
    assert restored.skipped_steps == 1
    w2 = torch.nn.Parameter(w.detach().clone())
    opt2 = torch.optim.SGD([w2], lr=0.01)
    _quadratic_step(scaler, opt, w)
    _quadratic_step(restored, opt2, w2)
    assert restored.scale_value == scaler.scale_value == 64.0  # both grew on the same step
    with pytest.raises(ConfigError, match="enabled"):
        DynamicLossScaler(enabled=False).load_state_dict(scaler.state_dict())


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(backoff_factor=1.5), "backoff_factor"),
        (dict(growth_factor=1.0), "growth_factor"),
        (dict(init_scale=0), "init_scale"),
        (dict(growth_interval=0), "growth_interval"),
        (dict(device="mps"), "device"),
    ],
)
def test_scaler_validation(kwargs, field):
    with pytest.raises(ConfigError) as err:
        DynamicLossScaler(**kwargs)
    assert err.value.field == field


def test_static_scaler_skips_but_keeps_its_scale():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    scaler = StaticLossScaler(128.0)
    assert not _quadratic_step(scaler, opt, w, poison=True)
    assert scaler.scale_value == 128.0 and scaler.skipped_steps == 1
    assert _quadratic_step(scaler, opt, w)
    torch.testing.assert_close(w.detach(), torch.full((3,), 0.8))


# -- parameter policy


def _group_of(groups):
    return {id(p): g for g in groups for p in g["params"]}


def test_param_groups_split_decay_and_fp32():
    model = tiny_llama(attention_backend="gated", tie_word_embeddings=True)
    groups = param_groups(model, weight_decay=0.1)
    by_param = _group_of(groups)
    params = dict(model.named_parameters())
    assert sum(len(g["params"]) for g in groups) == len(params)  # tied lm_head counted once
    assert len(by_param) == len(params)

    def group(name):
        return by_param[id(params[name])]

    for name in ("model.norm.weight", "model.layers.0.input_layernorm.weight", "model.layers.1.self_attn.inner.gate_proj.bias"):
        assert group(name)["weight_decay"] == 0.0 and group(name)["keep_fp32"], name
    emb = group("model.embed_tokens.weight")
    assert emb["weight_decay"] == 0.0 and emb["keep_fp32"]
    proj = group("model.layers.0.self_attn.q_proj.weight")
    assert proj["weight_decay"] == 0.1 and not proj["keep_fp32"] and proj["name"] == "decay"


def test_param_groups_keep_the_router_fp32_and_skip_frozen():
    model = DeepseekV3ForCausalLM(DeepseekV3Config.from_name("tiny", vocab_size=VOCAB))
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    groups = param_groups(model, weight_decay=0.05)
    by_param = _group_of(groups)
    params = dict(model.named_parameters())
    router = by_param[id(params["model.layers.1.mlp.gate.weight"])]
    assert router["keep_fp32"]
    expert = by_param[id(params["model.layers.1.mlp.experts.0.gate_proj.weight"])]
    assert not expert["keep_fp32"]  # "mlp.gate." must not match "gate_proj"
    assert id(params["model.layers.0.self_attn.q_proj.weight"]) not in by_param
    with pytest.raises(ConfigError) as err:
        param_groups(model, weight_decay=-1)
    assert err.value.field == "weight_decay"


def test_cast_model_for_training_keeps_sensitive_params_fp32():
    model = DeepseekV3ForCausalLM(DeepseekV3Config.from_name("tiny", vocab_size=VOCAB))
    model.init_weights()
    buffers = {n: b.dtype for n, b in model.named_buffers()}
    cast_model_for_training(model, "bf16")
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["model.layers.1.mlp.gate.weight"] == torch.float32
    assert dtypes["model.embed_tokens.weight"] == torch.float32
    assert dtypes["model.norm.weight"] == torch.float32
    assert dtypes["model.layers.1.mlp.experts.0.down_proj.weight"] == torch.bfloat16
    assert dtypes["lm_head.weight"] == torch.bfloat16
    assert {n: b.dtype for n, b in model.named_buffers()} == buffers
    ids = batch()
    with PrecisionPolicy("bf16").autocast():
        out = model(ids, labels=ids)
    assert torch.isfinite(out.loss)
    with pytest.raises(ConfigError) as err:
        cast_model_for_training(model, "int8")
    assert err.value.field == "dtype"


def test_cast_keeps_tied_weights_tied():
    model = tiny_llama(tie_word_embeddings=True)
    cast_model_for_training(model, torch.float16)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.dtype == torch.float32


# -- MixedPrecisionOptimizer


def test_bf16_training_with_fp32_masters_decreases_loss():
    model = cast_model_for_training(tiny_llama(), "bf16")
    policy = PrecisionPolicy("bf16")
    opt = MixedPrecisionOptimizer(param_groups(model, 0.01), lr=3e-3, clip_grad_norm=1.0)
    low = [p for p in model.parameters() if p.dtype == torch.bfloat16]
    assert len(opt.master_params) == len(low) > 0
    ids = batch()
    losses = []
    for _ in range(8):
        opt.zero_grad()
        with policy.autocast():
            loss = model(ids, labels=ids).loss
        opt.backward(loss)
        assert opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0
    assert all(m.dtype == torch.float32 for m in opt.master_params)
    assert all(p.dtype == torch.bfloat16 for p in low)
    for param, master in opt._pairs:
        assert torch.equal(param, master.to(torch.bfloat16))
    assert opt.last_grad_norm is not None


def test_masters_keep_updates_too_small_for_bf16():
    # bf16 spacing at 1.0 is 2**-7; an AdamW step of 1e-3 vanishes when applied to a bf16 weight.
    pure = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    mixed = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    pure_opt = torch.optim.AdamW([pure], lr=1e-3, weight_decay=0.0)
    mp_opt = MixedPrecisionOptimizer([mixed], lr=1e-3, weight_decay=0.0, loss_scale=None)
    for _ in range(10):
        pure.grad = torch.ones_like(pure)
        pure_opt.step()
        mixed.grad = torch.ones_like(mixed)
        assert mp_opt.step()
    assert torch.equal(pure.detach(), torch.ones(8, dtype=torch.bfloat16))
    torch.testing.assert_close(mp_opt.master_params[0], torch.full((8,), 0.99), atol=1e-6, rtol=0)
    assert torch.equal(mixed.detach(), torch.full((8,), 0.99).to(torch.bfloat16))


def test_fp16_overflow_skips_the_step():
    model = tiny_llama().half()
    opt = MixedPrecisionOptimizer(model.parameters(), lr=1e-3, loss_scale="dynamic")
    ids = batch()
    before = [p.detach().clone() for p in model.parameters()]
    masters_before = [m.clone() for m in opt.master_params]
    opt.zero_grad()
    opt.backward(model(ids, labels=ids).loss)
    next(model.parameters()).grad[0, 0] = float("inf")
    assert opt.step() is False
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(masters_before, opt.master_params))
    assert opt.loss_scale == 2.0**15 and opt.skipped_steps == 1
    opt.zero_grad()
    opt.backward(model(ids, labels=ids).loss)
    assert opt.step() is True
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _train(model, opt, steps, clip=None, mp=True):
    losses = []
    for _ in range(steps):
        ids = batch()
        opt.zero_grad()
        loss = model(ids, labels=ids).loss
        if mp:
            opt.backward(loss)
            opt.step(clip_grad_norm=clip)
        else:
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(list(model.parameters()), clip)
            opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("loss_scale", ["dynamic", None, 1024.0])
def test_fp32_params_match_plain_adamw_bit_exactly(loss_scale):
    reference = tiny_llama()
    model = copy.deepcopy(reference)
    torch.manual_seed(1)
    ref_losses = _train(reference, torch.optim.AdamW(reference.parameters(), lr=1e-3), 3, clip=0.5, mp=False)
    opt = MixedPrecisionOptimizer(model.parameters(), lr=1e-3, loss_scale=loss_scale)
    assert opt.master_params == []
    torch.manual_seed(1)
    losses = _train(model, opt, 3, clip=0.5)
    assert losses == ref_losses
    for a, b in zip(reference.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_state_round_trip_gives_identical_next_steps():
    model = tiny_llama().to(torch.bfloat16)
    opt = MixedPrecisionOptimizer(model.parameters(), lr=2e-3)
    _train(model, opt, 2)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = copy.deepcopy(model)
    # the model alone is not enough: masters hold bits bf16 weights lost
    resumed_opt = MixedPrecisionOptimizer(resumed.parameters(), lr=2e-3)
    resumed_opt.load_state_dict(saved)

    torch.manual_seed(7)
    losses = _train(model, opt, 2)
    torch.manual_seed(7)
    resumed_losses = _train(resumed, resumed_opt, 2)
    assert losses == resumed_losses
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(opt.master_params, resumed_opt.master_params):
        assert torch.equal(a, b)


def test_fp16_groups_select_the_master_groups():
    low = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    direct_bf16 = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    full = torch.nn.Parameter(torch.ones(4))
    opt = MixedPrecisionOptimizer([{"params": [low]}, {"params": [direct_bf16, full]}], fp16_groups=[0], lr=0.1)
    assert len(opt.master_params) == 1 and opt.master_params[0].shape == low.shape
    assert opt.param_groups[1]["params"][0] is direct_bf16  # stepped in its own dtype
    with pytest.raises(ConfigError) as err:
        MixedPrecisionOptimizer([low], fp16_groups=[0, 1, 2], loss_scale=128)
    assert err.value.field == "fp16_groups" and "1 group" in str(err.value)
    with pytest.raises(ConfigError, match="float32"):
        MixedPrecisionOptimizer([{"params": [full]}], fp16_groups=[0])


def test_seed_call_shape_works_with_named_groups():
    model = tiny_llama()
    cast_model_for_training(model, "fp16")
    groups = [g for g in param_groups(model, 0.1) if not g["keep_fp32"]] + [g for g in param_groups(model, 0.1) if g["keep_fp32"]]
    n_low = sum(1 for g in groups if not g["keep_fp32"])
    opt = MixedPrecisionOptimizer(groups, fp16_groups=list(range(n_low)), loss_scale=128)
    assert opt.loss_scale == 128.0
    assert len(opt.master_params) == sum(len(g["params"]) for g in groups[:n_low])


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(loss_scale="auto"), "loss_scale"),
        (dict(loss_scale=-1.0), "loss_scale"),
        (dict(clip_grad_norm=0), "clip_grad_norm"),
        (dict(optimizer_cls=dict), "optimizer_cls"),
    ],
)
def test_mixed_precision_optimizer_validation(kwargs, field):
    w = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ConfigError) as err:
        MixedPrecisionOptimizer([w], **kwargs)
    assert err.value.field == field
    with pytest.raises(ConfigError) as err:
        MixedPrecisionOptimizer([])
    assert err.value.field == "params_or_groups"


def test_torch_lr_scheduler_accepts_the_wrapper():
    w = torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))
    opt = MixedPrecisionOptimizer([w], optimizer_cls=torch.optim.SGD, lr=1.0, loss_scale=None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    for expected_lr in (1.0, 0.5, 0.25):
        before = opt.master_params[0].clone()
        w.grad = torch.ones_like(w)
        opt.step()
        sched.step()
        torch.testing.assert_close(before - opt.master_params[0], torch.full((2,), expected_lr))
