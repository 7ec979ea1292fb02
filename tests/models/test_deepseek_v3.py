"""DeepSeek-V3 (MLA + MoE) against Hugging Face transformers, the reference implementation:
checkpoints saved by transformers load with the same logits and greedy generations, ours load
back into transformers, the attention backends plug into MLA, and bad configs are named."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import seekdeep  # noqa: E402
from seekdeep.errors import ConfigError, UnknownBackendError  # noqa: E402
from seekdeep.models.deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402
from seekdeep.models.mla import yarn_softmax_scale  # noqa: E402

VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, first_k_dense_replace=1, n_routed_experts=8,
    num_experts_per_tok=2, n_shared_experts=1, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
    v_head_dim=16, max_position_embeddings=256,
)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "mscale": 1.0, "mscale_all_dim": 0.7, "beta_fast": 32, "beta_slow": 1}

CASES = {
    # q LoRA, 4 groups of which 2 are eligible, interleaved RoPE (DeepSeek's layout)
    "q-lora-grouped": dict(q_lora_rank=32, n_group=4, topk_group=2),
    # plain q_proj, 2 groups / 1 eligible, half-split RoPE, biases, no renormalisation, tied head
    "q-proj-no-interleave": dict(q_lora_rank=None, n_group=2, topk_group=1, rope_interleave=False,
                                 attention_bias=True, norm_topk_prob=False, routed_scaling_factor=1.7,
                                 tie_word_embeddings=True),
    # DeepSeek's YaRN: cos/sin scaled by mscale/mscale_all_dim and softmax by mscale_all_dim**2
    "yarn": dict(q_lora_rank=32, n_group=2, topk_group=2, rope_parameters=YARN),
}


def _hf_model(case: str):
    torch.manual_seed(0)
    config = transformers.DeepseekV3Config(**COMMON, **CASES[case])
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if "norm" in name or "bias" in name:  # incl. e_score_correction_bias: a missed one shows
                t.add_(torch.randn_like(t) * 0.1)
            elif name.endswith("mlp.gate.weight"):
                # Spread the router scores so routing depends on the tokens, not only on the bias.
                t.copy_(torch.randn_like(t) * 0.5)
    return model


def _ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """case -> directory holding the transformers checkpoint (saved once per module)."""
    out = {}
    for case in CASES:
        path = tmp_path_factory.mktemp(case)
        _hf_model(case).save_pretrained(path)
        out[case] = path
    return out


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_checkpoint_loads_with_same_logits_and_generation(case, hf_dirs):
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs[case], attn_implementation="eager").eval()
    ours = seekdeep.AutoModel.from_pretrained(hf_dirs[case])
    assert isinstance(ours, DeepseekV3ForCausalLM)
    ids = _ids(2, 19)
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids).logits
    assert got.shape == ref.shape
    assert ref.abs().max().item() > 0.05  # the comparison below is not trivially small
    assert (got - ref).abs().max().item() <= 1e-4
    # the router reports its load: layers 1 and 2 are MoE, k experts per token
    load = ours.expert_load()
    assert sorted(load) == [1, 2]
    assert all(int(n.sum()) == ids.numel() * COMMON["num_experts_per_tok"] for n in load.values())
    prompt = ids[:1, :5]
    ref_gen = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    got_gen = ours.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert got_gen.tolist() == ref_gen.tolist()


def test_left_padded_batch_generation_matches(hf_dirs):
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs["q-lora-grouped"], attn_implementation="eager").eval()
    ours = seekdeep.AutoModel.from_pretrained(hf_dirs["q-lora-grouped"])
    ids = _ids(2, 7, seed=6)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0  # row 0 is left-padded
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert got.tolist() == ref.tolist()


def test_yarn_sets_softmax_scale_and_rope_factor(hf_dirs):
    ours = seekdeep.AutoModel.from_pretrained(hf_dirs["yarn"])
    attn = ours.model.layers[0].self_attn
    hf_attn = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs["yarn"]).model.layers[0].self_attn
    assert attn.scale == pytest.approx(hf_attn.scaling, rel=1e-7)
    assert attn.scale != pytest.approx(24**-0.5)  # mscale_all_dim took effect
    assert ours.model.rotary_emb.attention_factor != pytest.approx(1.0)
    assert yarn_softmax_scale(24, None) == pytest.approx(24**-0.5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_seekdeep_checkpoint_loads_in_transformers(case, hf_dirs, tmp_path):
    ours = seekdeep.AutoModel.from_pretrained(hf_dirs[case])
    ours.save_pretrained(tmp_path, max_shard_size="50KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in index["weight_map"]
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in index["weight_map"]
    assert not any(".inner." in k for k in index["weight_map"])
    back, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = _ids(1, 17, seed=2)
    with torch.no_grad():
        assert (back.eval()(ids).logits - ours(ids).logits).abs().max().item() <= 1e-4


def test_fused_expert_layout_is_split_on_load(tmp_path):
    """A checkpoint written from transformers' in-memory state dict (experts fused as
    gate_up_proj (E, 2I, C) / down_proj (E, C, I)) loads too."""
    from safetensors.torch import save_file

    hf = _hf_model("q-lora-grouped")
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if "rotary_emb" not in k}
    assert "model.layers.1.mlp.experts.gate_up_proj" in state
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    hf.config.save_pretrained(tmp_path)
    ours = seekdeep.AutoModel.from_pretrained(tmp_path)
    ids = _ids(2, 11, seed=3)
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max().item() <= 1e-4


def test_mtp_layer_is_dropped_on_load(hf_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    src = hf_dirs["q-lora-grouped"]
    state = load_file(str(src / "model.safetensors"))
    state["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)  # a multi-token-prediction layer
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    ours = seekdeep.AutoModel.from_pretrained(tmp_path)
    assert len(ours.model.layers) == 3


# ----------------------------------------------------------------------------- backends


# DSA's index scores are ReLU'd dot products: with few index heads many are exactly 0, and the
# top-k among tied keys then depends on the tensor's length (prefill vs one step). 16 heads make
# exact ties unlikely, so the cache-path comparison below tests MLA, not tie-breaking.
DSA_OPTIONS = {"topk": 4, "index_heads": 16, "index_head_dim": 8}


@pytest.mark.parametrize("backend,options", [("eager", {}), ("dsa", DSA_OPTIONS), ("gated", {})])
def test_attention_backends_plug_into_mla(backend, options, hf_dirs):
    path = hf_dirs["q-lora-grouped"]
    ref = seekdeep.AutoModel.from_pretrained(path)
    ours = seekdeep.AutoModel.from_pretrained(path, attention_backend=backend, attention_options=options)
    assert type(ours.model.layers[0].self_attn.inner).__name__ != type(ref.model.layers[0].self_attn.inner).__name__
    ids = _ids(2, 16, seed=4)
    with torch.no_grad():
        logits = ours(ids).logits
        assert logits.shape == (2, 16, VOCAB) and torch.isfinite(logits).all()
        # causal: changing the last 6 tokens leaves the first 10 positions unchanged
        changed = ids.clone()
        changed[:, 10:] = (changed[:, 10:] + 1) % VOCAB
        assert torch.allclose(ours(changed).logits[:, :10], logits[:, :10], atol=1e-5)
        # the KV cache path (prefill + one decode step) gives the full forward's last position
        out = ours(ids[:, :-1], use_cache=True)
        step = ours(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
        assert (step - logits[:, -1]).abs().max().item() <= 1e-4
        if backend in ("eager", "gated"):  # gated starts with every gate at 1: equal to dense
            assert (logits - ref(ids).logits).abs().max().item() <= 1e-4
        else:  # 4 of up to 16 keys: sparse attention really changed something
            assert (logits[:, 8:] - ref(ids).logits[:, 8:]).abs().max().item() > 1e-4


# ----------------------------------------------------------------------------- training from scratch


def test_preset_trains_and_routes_every_token():
    config = DeepseekV3Config.from_name("tiny", vocab_size=VOCAB)
    model = seekdeep.AutoModelForCausalLM.from_config(config)
    assert isinstance(model.model.layers[1].mlp.gate.e_score_correction_bias, torch.Tensor)
    assert float(model.model.layers[1].mlp.gate.e_score_correction_bias.abs().sum()) == 0.0
    ids = _ids(2, 12, seed=5)
    out = model(ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    moe = model.model.layers[1].mlp
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0  # through the mixing weights
    assert moe.shared_experts.down_proj.weight.grad.abs().sum() > 0
    attn = model.model.layers[1].self_attn
    assert attn.kv_b_proj.weight.grad.abs().sum() > 0 and attn.q_proj.weight.grad.abs().sum() > 0
    load = model.expert_load()[1]
    assert load.shape == (config.n_routed_experts,) and int(load.sum()) == ids.numel() * config.num_experts_per_tok
    hit = [i for i, n in enumerate(load.tolist()) if n]
    assert all(model.model.layers[1].mlp.experts[i].gate_proj.weight.grad is not None for i in hit)


def test_config_round_trips_through_hf_dict():
    config = DeepseekV3Config.from_name("small", vocab_size=VOCAB, rope_theta=50000.0,
                                        rope_scaling={"rope_type": "yarn", "factor": 2.0, "mscale_all_dim": 1.0})
    d = config.to_hf_dict()
    assert d["architectures"] == ["DeepseekV3ForCausalLM"] and d["rope_parameters"]["rope_type"] == "yarn"
    assert DeepseekV3Config.from_hf_dict(d) == config
    hf = transformers.DeepseekV3Config(**{k: v for k, v in d.items() if k != "architectures"})
    assert hf.qk_head_dim == config.qk_head_dim and hf.n_group == config.n_group


# ----------------------------------------------------------------------------- bad configs


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(n_group=2, topk_group=3), "topk_group"),
        (dict(num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(n_group=4, topk_group=1, num_experts_per_tok=3), "num_experts_per_tok"),  # 2 eligible experts
        (dict(n_group=3), "n_group"),
        (dict(num_key_value_heads=2), "num_key_value_heads"),
        (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
        (dict(first_k_dense_replace=4), "first_k_dense_replace"),
        (dict(q_lora_rank=0), "q_lora_rank"),
        (dict(hidden_act="gelu"), "hidden_act"),
    ],
)
def test_bad_config_names_the_field(overrides, field):
    base = {k: v for k, v in COMMON.items()}
    base.update(n_group=2, topk_group=1, q_lora_rank=32)
    base.update(overrides)
    with pytest.raises(ConfigError) as exc:
        DeepseekV3Config(**base)
    assert exc.value.field == field
    assert field in str(exc.value)


def test_unknown_backend_and_bad_hf_dicts_are_named(hf_dirs):
    with pytest.raises(UnknownBackendError) as exc:
        DeepseekV3Config(**COMMON, n_group=2, topk_group=1, attention_backend="flashy")
    assert exc.value.field == "attention_backend" and "sdpa" in str(exc.value)
    d = json.loads((hf_dirs["q-lora-grouped"] / "config.json").read_text())
    with pytest.raises(ConfigError, match="quantization_config"):
        DeepseekV3Config.from_hf_dict({**d, "quantization_config": {"quant_method": "fp8"}})
    with pytest.raises(ConfigError, match="scoring_func"):
        DeepseekV3Config.from_hf_dict({**d, "scoring_func": "softmax"})
    with pytest.raises(ConfigError) as exc:
        DeepseekV3Config.from_hf_dict({k: v for k, v in d.items() if k != "hidden_size"}, source="x/config.json")
    assert exc.value.field == "hidden_size" and "x/config.json" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        seekdeep.AutoModel.from_pretrained(hf_dirs["q-lora-grouped"], topk_group=5)
    assert exc.value.field == "topk_group"
    with pytest.raises(ConfigError) as exc:
        DeepseekV3Config.from_name("huge")
    assert exc.value.field == "preset"


def test_router_correction_bias_stays_fp32_in_a_bf16_load(tmp_path):
    config = DeepseekV3Config.from_name("tiny", vocab_size=64)
    model = DeepseekV3ForCausalLM(config)
    model.init_weights()
    model.save_pretrained(tmp_path)
    loaded = seekdeep.AutoModel.from_pretrained(tmp_path, dtype="bfloat16")
    biases = [b for n, b in loaded.named_buffers() if n.endswith("e_score_correction_bias")]
    assert biases and all(b.dtype == torch.float32 for b in biases)
    assert loaded.model.layers[-1].mlp.experts[0].gate_proj.weight.dtype == torch.bfloat16
    loaded(torch.randint(0, 64, (1, 6)))  # runs in mixed dtypes
