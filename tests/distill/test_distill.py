"""The distillation components: the student copied from its teacher's layers and the KD loss."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

import seekdeep
from seekdeep.distill import DistillConfig, distillation_loss, make_student, select_layers
from seekdeep.errors import ConfigError
from seekdeep.models.deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM
from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM

VOCAB = 97


def _llama(layers=4, **kw):
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, **kw)
    model = LlamaForCausalLM(config)
    model.init_weights()
    return model.eval()


def _deepseek(layers=4, first_k=1):
    config = DeepseekV3Config.from_name("tiny", vocab_size=VOCAB, num_hidden_layers=layers, first_k_dense_replace=first_k,
                                        hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
    model = DeepseekV3ForCausalLM(config)
    model.init_weights()
    return model.eval()


def _hand_built(teacher, layers, **config_updates):
    """An independent reference: a fresh model of the student's depth loaded with the teacher's
    state dict, layer keys renumbered by hand."""
    config = dataclasses.replace(teacher.config, num_hidden_layers=len(layers), **config_updates)
    model = type(teacher)(config)
    renumber = {old: new for new, old in enumerate(layers)}
    state = {}
    for key, value in teacher.state_dict().items():
        m = re.match(r"model\.layers\.(\d+)\.(.*)", key)
        if m is None:
            state[key] = value
        elif int(m.group(1)) in renumber:
            state[f"model.layers.{renumber[int(m.group(1))]}.{m.group(2)}"] = value
    model.load_state_dict(state, strict=True)
    return model.eval()


def _ids(batch=2, seq=24):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- the student


@pytest.mark.parametrize("tied", [False, True])
def test_student_with_every_layer_is_the_teacher(tied):
    teacher = _llama(tie_word_embeddings=tied)
    student = make_student(teacher, [0, 1, 2, 3])
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(student(ids).logits, teacher(ids).logits)
    assert (student.lm_head.weight is student.model.embed_tokens.weight) == tied
    # a copy, not a view: training the student leaves the teacher alone
    with torch.no_grad():
        student.model.layers[0].mlp.up_proj.weight.add_(1.0)
        student.model.embed_tokens.weight.add_(1.0)
    assert not torch.equal(student.model.layers[0].mlp.up_proj.weight, teacher.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)


def test_every_other_student_equals_a_hand_built_model():
    teacher = _llama(layers=5)
    student = make_student(teacher)  # every_other: 0, 2, 4
    assert student.config.num_hidden_layers == 3 and teacher.config.num_hidden_layers == 5
    assert all(p.requires_grad for p in student.parameters()) and not student.training
    reference = _hand_built(teacher, [0, 2, 4])
    ids = _ids()
    with torch.no_grad():
        assert torch.allclose(student(ids).logits, reference(ids).logits, atol=1e-6)
        assert not torch.allclose(student(ids).logits, teacher(ids).logits, atol=1e-3)


def test_per_layer_sliding_windows_follow_their_layers():
    kinds = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    teacher = _llama(sliding_window=4, layer_types=kinds, model_type="qwen2", qkv_bias=True)
    student = make_student(teacher, [1, 3])
    assert student.config.layer_types == ["sliding_attention", "full_attention"]
    assert student.sliding_windows() == [4, None]
    reference = _hand_built(teacher, [1, 3], layer_types=["sliding_attention", "full_attention"])
    ids = _ids(seq=20)  # longer than the window, so the window matters
    with torch.no_grad():
        assert torch.allclose(student(ids).logits, reference(ids).logits, atol=1e-6)
        wrong = _hand_built(teacher, [1, 3], layer_types=["full_attention", "sliding_attention"])
        assert not torch.allclose(student(ids).logits, wrong(ids).logits, atol=1e-4)


def test_dsa_indexer_travels_with_its_layer():
    teacher = _llama(attention_backend="dsa", attention_options={"topk": 4, "index_heads": 2, "index_head_dim": 8})
    student = make_student(teacher, [0, 2])
    for new, old in enumerate([0, 2]):
        got = student.model.layers[new].self_attn.inner.index_q.weight
        assert torch.equal(got, teacher.model.layers[old].self_attn.inner.index_q.weight)
        assert got.data_ptr() != teacher.model.layers[old].self_attn.inner.index_q.weight.data_ptr()
    ids = _ids(seq=16)  # topk 4 < 16 keys: the indexer picks which keys are attended
    with torch.no_grad():
        assert torch.allclose(student(ids).logits, _hand_built(teacher, [0, 2])(ids).logits, atol=1e-6)


@pytest.mark.parametrize("layers, first_k, kinds", [
    ([0, 2], 1, ["SwiGLU", "DeepseekV3MoE"]),
    ([1, 3], 1, ["DeepseekV3MoE", "DeepseekV3MoE"]),
    ([0, 1, 3], 2, ["SwiGLU", "SwiGLU", "DeepseekV3MoE"]),
])
def test_deepseek_student_keeps_its_dense_and_moe_layers(layers, first_k, kinds, tmp_path):
    teacher = _deepseek(first_k=first_k)
    student = make_student(teacher, layers)
    assert student.config.first_k_dense_replace == sum(1 for k in kinds if k == "SwiGLU")
    assert [type(layer.mlp).__name__ for layer in student.model.layers] == kinds
    reference = _hand_built(teacher, layers, first_k_dense_replace=student.config.first_k_dense_replace)
    ids = _ids()
    with torch.no_grad():
        logits = student(ids).logits
        assert torch.allclose(logits, reference(ids).logits, atol=1e-5)
    student.save_pretrained(tmp_path)  # the config written describes the student
    reloaded = seekdeep.AutoModel.from_pretrained(tmp_path)
    assert reloaded.config.first_k_dense_replace == student.config.first_k_dense_replace
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, logits, atol=1e-5)


def test_make_student_refuses_bad_input():
    teacher = _llama()
    for layers, message in (([0, 4], "out of range"), ([2, 0], "increasing"), ([1, 1], "repeats"), ([], "non-empty"),
                            ([-1], ">= 0"), ("every_third", "cannot parse"), ([0.5], "integer")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            make_student(teacher, layers)
    from seekdeep.peft.config import LoRAConfig

    teacher.add_adapter("task", LoRAConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="adapters"):
        make_student(teacher, [0])


def test_select_layers():
    assert select_layers("every_other", 7) == [0, 2, 4, 6]
    assert select_layers("0,2,5", 6) == [0, 2, 5]
    assert select_layers(" 3 ", 6) == [3]


# ----------------------------------------------------------------------------- DistillConfig


def test_distill_config_validation():
    cfg = DistillConfig(layers="0, 2,5")
    assert cfg.layers == [0, 2, 5] and cfg.student_layers(6) == [0, 2, 5]
    assert DistillConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match=r"^layers: .*fewer layers than its teacher"):
        DistillConfig(layers=[0, 1, 2, 3]).student_layers(4)  # equal depth
    with pytest.raises(ConfigError, match=r"^layers: .*out of range"):
        DistillConfig(layers=[0, 1, 2, 3, 4]).student_layers(4)  # deeper than the teacher
    with pytest.raises(ConfigError, match=r"^layers: .*fewer layers"):
        DistillConfig().student_layers(1)  # every_other of one layer keeps it
    for bad in (0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ConfigError, match="^temperature"):
            DistillConfig(temperature=bad)
    for bad in (-0.1, 1.5, float("nan"), "0.5"):
        with pytest.raises(ConfigError, match="^alpha"):
            DistillConfig(alpha=bad)
    with pytest.raises(ConfigError, match="^layers: .*increasing"):
        DistillConfig(layers="2,0")
    with pytest.raises(ConfigError, match="^layers: .*repeats"):
        DistillConfig(layers=[0, 0, 1])


# ----------------------------------------------------------------------------- the loss


def _logits(seed, batch=2, seq=8, vocab=11):
    return torch.randn(batch, seq, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_alpha_zero_is_the_models_own_cross_entropy():
    model = _llama()
    ids = _ids()
    output = model(ids, labels=ids)
    losses = distillation_loss(output.logits, torch.randn_like(output.logits), ids, temperature=3.0, alpha=0.0)
    assert torch.allclose(losses.total, output.loss, atol=1e-6)
    assert torch.allclose(losses.ce, output.loss, atol=1e-6)
    assert losses.tokens == ids.shape[0] * (ids.shape[1] - 1)


def test_alpha_one_is_the_scaled_kl_and_matches_a_manual_computation():
    student, teacher = _logits(0), _logits(1)
    labels = torch.randint(0, 11, (2, 8))
    T = 2.5
    losses = distillation_loss(student, teacher, labels, temperature=T, alpha=1.0)
    # by hand: sum_v p_t (log p_t - log p_s) at temperature T, over positions 0..T-2, averaged
    expected, n = 0.0, 0
    for b in range(2):
        for t in range(7):
            p_t = torch.exp(teacher[b, t] / T) / torch.exp(teacher[b, t] / T).sum()
            p_s = torch.exp(student[b, t] / T) / torch.exp(student[b, t] / T).sum()
            expected += float((p_t * (p_t.log() - p_s.log())).sum())
            n += 1
    assert losses.kl.item() == pytest.approx(expected / n, rel=1e-5)
    assert losses.total.item() == pytest.approx(T**2 * expected / n, rel=1e-5)
    # the temperature softens the distributions: a different T gives a different KL
    assert distillation_loss(student, teacher, labels, temperature=1.0, alpha=1.0).kl.item() != pytest.approx(expected / n)


def test_mix_and_zero_kl_for_identical_logits():
    student, teacher = _logits(0), _logits(1)
    labels = torch.randint(0, 11, (2, 8))
    a = distillation_loss(student, teacher, labels, temperature=2.0, alpha=0.3)
    assert a.total.item() == pytest.approx(0.3 * 4 * a.kl.item() + 0.7 * a.ce.item(), rel=1e-6)
    same = distillation_loss(student, student.clone(), labels, temperature=2.0, alpha=0.5)
    assert same.kl.abs().item() < 1e-6
    assert same.total.item() == pytest.approx(0.5 * same.ce.item(), rel=1e-6)


def test_gradient_reaches_the_student_only():
    teacher, student = _llama(), _llama()
    teacher.requires_grad_(True)  # even a teacher that could learn gets no gradient
    ids = _ids()
    losses = distillation_loss(student(ids).logits, teacher(ids).logits, ids, temperature=2.0, alpha=0.5)
    losses.total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_masking_ignored_and_padded_positions():
    student, teacher = _logits(0, seq=6), _logits(1, seq=6)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, 4:] = -100
    masked = distillation_loss(student, teacher, labels, alpha=0.5)
    assert masked.tokens == 2 * 5 - 2
    # the same as scoring only the kept rows: row 0 up to position 3 (predicting 4 is ignored)
    part0 = distillation_loss(student[:1, :4], teacher[:1, :4], labels[:1, :4], alpha=0.5)
    part1 = distillation_loss(student[1:], teacher[1:], labels[1:], alpha=0.5)
    expected_ce = (part0.ce * part0.tokens + part1.ce * part1.tokens) / (part0.tokens + part1.tokens)
    expected_kl = (part0.kl * part0.tokens + part1.kl * part1.tokens) / (part0.tokens + part1.tokens)
    assert torch.allclose(masked.ce, expected_ce) and torch.allclose(masked.kl, expected_kl)
    # an attention_mask drops the same positions as -100 labels on the padding
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 4:] = 0
    by_mask = distillation_loss(student, teacher, labels.masked_fill(labels < 0, 3), alpha=0.5, attention_mask=mask)
    assert by_mask.tokens == masked.tokens and torch.allclose(by_mask.total, masked.total)
    with pytest.raises(ValueError, match="teacher_logits"):
        distillation_loss(student, teacher[..., :5], labels)
    with pytest.raises(ConfigError, match="temperature"):
        distillation_loss(student, teacher, labels, temperature=0)
    with pytest.raises(ConfigError, match="alpha"):
        distillation_loss(student, teacher, labels, alpha=2)
