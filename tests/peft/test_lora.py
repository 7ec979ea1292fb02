"""LoRA / rsLoRA / DoRA on seekdeep models: wrapping, freezing, merging, switching, quantized bases."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from seekdeep.errors import ConfigError
from seekdeep.peft import LoRAConfig, LoRALinear, ModulesToSaveWrapper


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_new_adapter_is_a_no_op_and_only_it_trains(model, ids):
    before = _logits(model, ids)
    model.add_adapter("task_adapter", LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoRALinear)
    assert isinstance(model.model.layers[0].self_attn.k_proj, nn.Linear)
    assert torch.equal(_logits(model, ids), before)  # B starts at zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A.task_adapter." in n or ".lora_B.task_adapter." in n for n in trainable)
    report = model.trainable_parameters_report()
    # per layer: q (64->64) and v (64->32), each r * (in + out)
    assert report["trainable"] == 2 * (4 * (64 + 64) + 4 * (64 + 32))
    assert report["adapters"]["task_adapter"]["parameters"] == report["trainable"]
    assert report["percent"] == pytest.approx(100 * report["trainable"] / report["total"])


def test_training_moves_only_the_adapter(model, ids):
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.add_adapter("a", LoRAConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    unloaded = model.unload()
    for name, param in unloaded.named_parameters():
        assert torch.equal(param, base[name]), name


@pytest.mark.parametrize("options", [{}, {"use_rslora": True}, {"use_dora": True}, {"use_dora": True, "use_rslora": True}],
                         ids=["lora", "rslora", "dora", "dora-rslora"])
def test_merged_and_unmerged_outputs_agree(model, ids, options, randomize_adapter):
    base = _logits(model, ids)
    model.add_adapter("a", LoRAConfig(r=4, lora_alpha=16, target_modules="all-linear", **options))
    randomize_adapter(model, "a")
    unmerged = _logits(model, ids)
    assert (unmerged - base).abs().max() > 1e-2
    model.merge_adapter()
    assert model.model.layers[0].mlp.up_proj.merged == ["a"]
    assert (_logits(model, ids) - unmerged).abs().max() <= 1e-4
    model.unmerge_adapter()
    assert (_logits(model, ids) - unmerged).abs().max() <= 1e-5
    with model.disable_adapters():  # restores the base weights exactly enough
        assert (_logits(model, ids) - base).abs().max() <= 1e-5
    merged = model.merge_and_unload()
    assert merged is model and not any(isinstance(m, LoRALinear) for m in model.modules())
    assert model.peft_config == {} and all(p.requires_grad for p in model.parameters())
    assert (_logits(model, ids) - unmerged).abs().max() <= 1e-4


def test_rslora_and_dora_scaling(model):
    assert LoRAConfig(r=16, lora_alpha=32).scaling == 2.0
    assert LoRAConfig(r=16, lora_alpha=32, use_rslora=True).scaling == pytest.approx(32 / math.sqrt(16))
    model.add_adapter("d", LoRAConfig(r=4, lora_alpha=8, use_dora=True))
    layer = model.model.layers[0].self_attn.q_proj
    # DoRA's magnitude starts at the row norms of the base weight (B = 0)
    assert torch.allclose(layer.lora_magnitude_vector["d"].weight, layer.base_layer.weight.norm(dim=1))


def test_disable_adapters_context_and_bare_call(model, ids, randomize_adapter):
    base = _logits(model, ids)
    model.add_adapter("a", LoRAConfig(r=2, target_modules=["o_proj"]))
    randomize_adapter(model, "a")
    adapted = _logits(model, ids)
    with model.disable_adapters():
        assert torch.equal(_logits(model, ids), base)
    assert torch.equal(_logits(model, ids), adapted)
    model.disable_adapters()
    assert model.adapters_disabled and torch.equal(_logits(model, ids), base)
    model.enable_adapters()
    assert torch.equal(_logits(model, ids), adapted)


def test_set_adapter_switches_outputs_and_trainability(model, ids, randomize_adapter):
    model.add_adapter("a", LoRAConfig(r=2, target_modules=["q_proj"]))
    randomize_adapter(model, "a", seed=1)
    out_a = _logits(model, ids)
    model.add_adapter("b", LoRAConfig(r=2, target_modules=["q_proj"]))
    randomize_adapter(model, "b", seed=2)
    assert model.active_adapters == ["b"]
    out_b = _logits(model, ids)
    assert not torch.allclose(out_a, out_b)
    model.set_adapter("a")
    assert torch.equal(_logits(model, ids), out_a)
    assert all(".a." in n for n, p in model.named_parameters() if p.requires_grad)
    model.set_adapter(["a", "b"])  # both deltas add up
    both = _logits(model, ids)
    with model.disable_adapters():
        base = _logits(model, ids)
    assert (both - base).abs().max() > (out_a - base).abs().max() * 0.5
    with model.use_adapter("b"):
        assert torch.equal(_logits(model, ids), out_b)
    assert model.active_adapters == ["a", "b"]


def test_delete_adapter_unwraps_when_last(model, ids):
    base = _logits(model, ids)
    model.add_adapter("a", LoRAConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("b", LoRAConfig(r=2, target_modules=["q_proj", "k_proj"]))
    model.delete_adapter("b")
    assert isinstance(model.model.layers[0].self_attn.k_proj, nn.Linear)
    assert model.model.layers[0].self_attn.q_proj.adapter_names == ["a"]
    model.delete_adapter("a")
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    assert model.list_adapters() == [] and torch.equal(_logits(model, ids), base)


def test_target_matching_rules(model):
    model.add_adapter("regex", LoRAConfig(r=2, target_modules=r"model\.layers\.1\.mlp\.(up|down)_proj"))
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))
    assert wrapped == ["model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"]
    model.unload()
    model.add_adapter("all", LoRAConfig(r=2, target_modules="all-linear", exclude_modules=["o_proj"]))
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"}  # no lm_head


def test_all_linear_leaves_attention_backend_layers_alone():
    from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_name("tiny", vocab_size=64, num_hidden_layers=1, attention_backend="dsa",
                                   attention_options={"topk": 4})
    model = LlamaForCausalLM(config)
    model.init_weights()
    model.add_adapter("a", LoRAConfig(r=2, target_modules="all-linear"))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 7 and not any(".inner." in n for n in wrapped)
    ids = torch.randint(0, 64, (1, 12))
    model(ids, labels=ids).loss.backward()


def test_modules_to_save_trains_a_copy(model, ids):
    head = model.lm_head.weight.detach().clone()
    model.add_adapter("a", LoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert isinstance(model.lm_head, ModulesToSaveWrapper)
    copy = model.lm_head.modules_to_save["a"].weight
    assert copy.requires_grad and not model.lm_head.original_module.weight.requires_grad
    with torch.no_grad():
        copy.add_(0.5)
    adapted = _logits(model, ids)
    with model.disable_adapters():
        assert not torch.allclose(_logits(model, ids), adapted)
    model.merge_and_unload()
    assert isinstance(model.lm_head, nn.Linear) and torch.allclose(model.lm_head.weight, head + 0.5)
    assert torch.allclose(_logits(model, ids), adapted, atol=1e-5)


# ----------------------------------------------------------------------------- quantized bases


class Int8WeightOnlyLinear(nn.Module):
    """A minimal weight-only int8 linear (per-row scales), the interface LoRA relies on:
    in_features / out_features, a forward, and dequantize_weight() for DoRA."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127
        self.register_buffer("qweight", torch.round(w / scale).to(torch.int8))
        self.register_buffer("scale", scale)

    def dequantize_weight(self) -> torch.Tensor:
        return self.qweight.float() * self.scale

    def forward(self, x):
        return nn.functional.linear(x, self.dequantize_weight().to(x.dtype))


def _quantize(model, make):
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name != "lm_head":
                setattr(module, child_name, make(child))


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_lora_on_a_quantized_base_trains(model, ids, use_dora):
    # (torch.ao's dynamic int8 Linear is not usable here: it has no autograd kernel, so no
    # gradient would reach the adapters of earlier layers through it.)
    _quantize(model, Int8WeightOnlyLinear)
    quantized = _logits(model, ids)
    model.add_adapter("q", LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                      use_dora=use_dora))
    assert torch.allclose(_logits(model, ids), quantized, atol=1e-5)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    first = None
    for _ in range(6):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        first = first if first is not None else loss.item()
    assert loss.item() < first
    with pytest.raises(ConfigError, match="quantized"):
        model.merge_adapter()
    with model.disable_adapters():
        assert torch.allclose(_logits(model, ids), quantized, atol=1e-6)


def test_adapter_weights_stay_fp32_on_a_bf16_base(base_dir, ids):
    import seekdeep

    model = seekdeep.AutoModel.from_pretrained(base_dir, dtype="bfloat16")
    model.add_adapter("a", LoRAConfig(r=2, target_modules=["q_proj"]))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["a"].weight.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    assert model(ids).logits.dtype == torch.bfloat16
    

class NoGradInt8Linear(Int8WeightOnlyLinear):
    """Like an integer kernel: the output carries no derivative at all."""

    def forward(self, x):
        with torch.no_grad():
            return super().forward(x)


def test_quantized_layers_without_a_derivative_still_pass_gradients(base_dir, ids):
    import seekdeep

    grads = {}
    for kind in (Int8WeightOnlyLinear, NoGradInt8Linear):
        model = seekdeep.AutoModel.from_pretrained(base_dir)
        _quantize(model, kind)
        torch.manual_seed(0)
        model.add_adapter("q", LoRAConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
        model(ids, labels=ids).loss.backward()
        grads[kind] = model.model.layers[0].self_attn.q_proj.lora_B["q"].weight.grad
    assert grads[NoGradInt8Linear] is not None and grads[NoGradInt8Linear].abs().sum() > 0
    assert torch.allclose(grads[NoGradInt8Linear], grads[Int8WeightOnlyLinear], atol=1e-6)


@pytest.mark.parametrize("bits", [8, 4])
def test_qlora_on_seekdeep_quantized_base(bits):
    quantization = pytest.importorskip("seekdeep.quantization")
    from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4))
    model.init_weights()
    ids = torch.randint(0, 256, (2, 16))
    quantization.QuantConfig(method="weight_only", bits=bits).apply(model)
    frozen = {n: b.clone() for n, b in model.named_buffers()}
    with torch.no_grad():
        before = model(ids).logits
    model.add_adapter("q", LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        loss.backward()
        assert model.model.layers[0].self_attn.q_proj.lora_B["q"].weight.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(b, frozen[n.replace(".base_layer", "")]) for n, b in model.named_buffers())


def test_save_pretrained_with_adapters_attached_is_refused(tmp_path):
    from seekdeep.errors import ConfigError
    from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM
    from seekdeep.peft import LoRAConfig

    model = LlamaForCausalLM(LlamaConfig.from_name("tiny", vocab_size=64, max_position_embeddings=64))
    model.init_weights()
    model.add_adapter("task", LoRAConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="merge_and_unload"):
        model.save_pretrained(tmp_path / "x")
    model.merge_and_unload()
    model.save_pretrained(tmp_path / "x")
    assert (tmp_path / "x" / "config.json").is_file()


def _random_lora_layer(options, seed=0):
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(12, 7))
    config = LoRAConfig(r=3, lora_alpha=5, **options)
    layer.add("a", config)
    layer.active = ["a"]
    with torch.no_grad():
        layer.lora_B["a"].weight.normal_(0, 0.3)  # B starts at zero; give it a value to see the formula
    return layer, config


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_lora_forward_is_the_paper_formula(use_rslora):
    layer, config = _random_lora_layer({"use_rslora": use_rslora})
    A, B = layer.lora_A["a"].weight, layer.lora_B["a"].weight  # (r, in), (out, r)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    scaling = 5 / (math.sqrt(3) if use_rslora else 3)
    assert layer.scaling["a"] == pytest.approx(scaling)
    x = torch.randn(4, 12)
    expected = x @ W.T + b + scaling * (x @ A.T @ B.T)
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert torch.allclose(layer.delta_weight("a"), scaling * B @ A, atol=1e-7)


def test_lora_init_and_trainable_slots():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(256, 64))
    layer.add("a", LoRAConfig(r=8))
    A, B = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    assert A.shape == (8, 256) and B.shape == (64, 8)
    assert torch.count_nonzero(B) == 0  # the adapter starts as a no-op ...
    bound = 1 / math.sqrt(256)  # ... with A Kaiming-uniform (a=sqrt(5)) over its fan-in, as nn.Linear and peft
    assert A.abs().max() <= bound and A.abs().max() > 0.9 * bound and A.std() > 0.5 * bound / math.sqrt(3)
    layer.add("g", LoRAConfig(r=8, init_lora_weights="gaussian"))
    assert layer.lora_A["g"].weight.std().item() == pytest.approx(1 / 8, rel=0.1)
    assert A.dtype == torch.float32 and A.requires_grad and B.requires_grad


def test_lora_dropout_drops_only_the_adapter_input():
    layer, _ = _random_lora_layer({"lora_dropout": 0.5})
    layer.train()
    x = torch.randn(64, 12)
    base = layer.base_layer(x)
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    expected = base + layer.scaling["a"] * dropped @ layer.lora_A["a"].weight.T @ layer.lora_B["a"].weight.T
    assert torch.allclose(out, expected, atol=1e-5)
    layer.eval()  # no dropout at inference
    expected = base + layer.scaling["a"] * x @ layer.lora_A["a"].weight.T @ layer.lora_B["a"].weight.T
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_dora_forward_is_the_paper_formula():
    layer, _ = _random_lora_layer({"use_dora": True})
    with torch.no_grad():
        layer.lora_magnitude_vector["a"].weight.mul_(torch.linspace(0.5, 1.5, 7))
    layer.eval()
    W, b = layer.base_layer.weight, layer.base_layer.bias
    adapted = W + layer.delta_weight("a")  # (out, in)
    directed = layer.lora_magnitude_vector["a"].weight[:, None] * adapted / adapted.norm(dim=1, keepdim=True)
    x = torch.randn(5, 12)
    assert torch.allclose(layer(x), x @ directed.T + b, atol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_two_active_adapters_add_their_own_deltas_in_any_order(use_dora):
    layer, config = _random_lora_layer({"use_dora": use_dora})
    layer.add("b", config)
    with torch.no_grad():
        layer.lora_B["b"].weight.normal_(0, 0.3)
        if use_dora:
            layer.lora_magnitude_vector["b"].weight.mul_(1.3)
    layer.eval()
    x = torch.randn(5, 12)
    base = layer.base_layer(x)
    alone = {}
    for name in ("a", "b"):
        layer.active = [name]
        alone[name] = layer(x) - base
    for order in (["a", "b"], ["b", "a"]):
        layer.active = order
        assert torch.allclose(layer(x), base + alone["a"] + alone["b"], atol=1e-5), order


def test_lora_bias_is_a_scaled_zero_started_offset_that_merges_into_a_base_bias():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(12, 7))
    layer.add("a", LoRAConfig(r=3, lora_alpha=6, lora_bias=True))
    layer.active = ["a"]
    x = torch.randn(4, 12)
    assert torch.count_nonzero(layer.lora_B["a"].bias) == 0 and torch.equal(layer(x), layer.base_layer(x))
    with torch.no_grad():
        layer.lora_B["a"].weight.normal_(0, 0.3)
        layer.lora_B["a"].bias.normal_(0, 0.3)
    A, B, c = layer.lora_A["a"].weight, layer.lora_B["a"].weight, layer.lora_B["a"].bias
    expected = layer.base_layer(x) + 2.0 * (x @ A.T @ B.T + c)
    assert torch.allclose(layer(x), expected, atol=1e-6)
    bias_before = layer.base_layer.bias.detach().clone()
    layer.merge(["a"])
    assert torch.allclose(layer.base_layer(x), expected, atol=1e-5)
    layer.unmerge()
    assert torch.allclose(layer.base_layer.bias, bias_before, atol=1e-6)


def test_lora_bias_on_a_bias_less_head_cannot_merge(model, ids, randomize_adapter):
    model.add_adapter("a", LoRAConfig(r=2, target_modules=["q_proj", "lm_head"], lora_bias=True))
    randomize_adapter(model, "a")
    before = _logits(model, ids)
    with pytest.raises(ConfigError) as info:
        model.merge_adapter()
    assert info.value.field == "lora_bias"
    assert torch.equal(_logits(model, ids), before)  # nothing was half-merged


def test_rank_and_alpha_patterns_pick_per_module_shapes_and_scaling(model):
    config = LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"],
                        rank_pattern={"lm_head": 1, r"layers\.0\.self_attn\.v_proj": 2}, alpha_pattern={"q_proj": 2})
    model.add_adapter("p", config)
    layers = dict(model._tuner_layers())
    assert layers["lm_head"].lora_A["p"].weight.shape[0] == 1 and layers["lm_head"].scaling["p"] == 8.0
    assert layers["model.layers.0.self_attn.v_proj"].lora_A["p"].weight.shape[0] == 2
    assert layers["model.layers.1.self_attn.v_proj"].lora_A["p"].weight.shape[0] == 4
    assert layers["model.layers.1.self_attn.q_proj"].scaling["p"] == 0.5  # alpha 2 / r 4
    assert layers["model.layers.1.self_attn.v_proj"].scaling["p"] == 2.0


def test_lora_spec_reads_patterns_and_the_bias_flag():
    from seekdeep.peft import parse_lora_spec

    config = parse_lora_spec("r=2,alpha=4,targets=q_proj,lm_head,r.lm_head=1,alpha.lm_head=2.5,lora_bias")
    assert config.target_modules == ["q_proj", "lm_head"] and config.lora_bias
    assert config.rank_pattern == {"lm_head": 1} and config.alpha_pattern == {"lm_head": 2.5}
    assert config.rank_for("lm_head") == 1 and config.scaling_for("lm_head") == 2.5
    assert config.rank_for("model.layers.0.self_attn.q_proj") == 2 and config.scaling == 2.0
    with pytest.raises(ConfigError) as info:
        parse_lora_spec("r=2,r.lm_head=0")
    assert info.value.field == "rank_pattern"


def test_merge_refuses_before_touching_any_layer_when_one_layer_cannot_take_a_lora_bias():
    from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # q/k/v carry biases (qwen2-style), the head does not
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True))
    model.add_adapter("a", LoRAConfig(r=2, target_modules=["q_proj", "lm_head"], lora_bias=True))
    with torch.no_grad():
        for param in model._adapter_parameters("a"):
            param.normal_(0, 0.1)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError) as info:
        model.merge_and_unload()
    assert info.value.field == "lora_bias" and "lm_head" in str(info.value)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # q_proj was not merged either
    model.delete_adapter("a")
    model.add_adapter("b", LoRAConfig(r=2, target_modules=["q_proj"], lora_bias=True))
    with torch.no_grad():
        for param in model._adapter_parameters("b"):
            param.normal_(0, 0.1)
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        expected = model(ids).logits
        model.merge_and_unload()  # q_proj has a bias: the LoRA bias folds into it
        assert torch.allclose(model(ids).logits, expected, atol=1e-5)
