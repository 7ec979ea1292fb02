"""Alignment objectives and retrieval metrics against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from seekdeep.errors import ConfigError
from seekdeep.multimodal.alignment import (LearnableTemperature, ModalityPredictor, attention_distillation, hub_binding_loss, info_nce,
                                           siglip_loss, similarity_distillation)
from seekdeep.multimodal.retrieval import bidirectional_metrics, chance_metrics, labels_to_positives, ranked_positives, retrieval_metrics, zero_shot_accuracy


@pytest.fixture(autouse=True)
def _one_thread():
    # the 2-core box is shared: more threads than cores made tiny ops ~40x slower (see the rl tests)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_info_nce_hand_case_and_init_is_ln_batch():
    eye = torch.eye(2)
    # logits = I: each row's CE = log(1 + e^-1)
    assert info_nce(eye, eye, 1.0).item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    g = torch.Generator().manual_seed(0)
    for batch in (8, 32):
        a, b = torch.randn(batch, 512, generator=g), torch.randn(batch, 512, generator=g)
        assert info_nce(a, b, 1.0).item() == pytest.approx(math.log(batch), abs=0.02)
    # a perfectly aligned batch at a high scale costs ~0
    a = torch.nn.functional.one_hot(torch.arange(8), 16).float()
    assert info_nce(a, a, 100.0).item() < 1e-6


def test_info_nce_multi_positive_does_not_punish_same_class_pairs():
    # pairs 0 and 1 are the same class with different captions and images; caption 0 happens to
    # match image 1 best. (Exact duplicate captions give the same loss either way: their rows tie.)
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, -1.0]])
    image = torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.0, -1.0]])
    pos = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]]).bool()
    plain, multi = info_nce(text, image, 20.0), info_nce(text, image, 20.0, positives=pos)
    assert plain.item() > multi.item() + 2.0
    # by hand, multi-positive: rows 0 and 1 see logits (12, 20, 0) / (20, 12, -16) with target 1/2, 1/2
    row = math.log(math.exp(12) + math.exp(20) + 1) - 16
    row01 = math.log(math.exp(20) + math.exp(12) + math.exp(-16)) - 16
    last = math.log(1 + math.exp(-16) + math.exp(20)) - 20
    assert multi.item() == pytest.approx(0.5 * ((row + row01 + last) / 3 * 2), abs=1e-3)


def test_siglip_hand_case():
    eye = torch.eye(2)
    want = (2 * math.log(1 + math.exp(-1)) + 2 * math.log(2)) / 2
    assert siglip_loss(eye, eye, 1.0, 0.0).item() == pytest.approx(want, abs=1e-6)
    # bias shifts every pair: with bias -10 the negatives are nearly free
    assert siglip_loss(eye, eye, 10.0, -5.0).item() < siglip_loss(eye, eye, 1.0, 0.0).item()


def test_temperature_is_clamped_and_learnable():
    temp = LearnableTemperature()
    assert temp.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        temp.logit_scale.fill_(9.0)
    assert temp.scale().item() == pytest.approx(100.0, rel=1e-5)
    temp.clamp_()
    assert temp.logit_scale.item() == pytest.approx(math.log(100), rel=1e-6)
    temp = LearnableTemperature(0.5)
    a = torch.nn.functional.one_hot(torch.arange(4), 4).float()
    info_nce(a, a, temp.scale()).backward()
    assert temp.logit_scale.grad.item() < 0  # aligned pairs: a sharper softmax lowers the loss
    with pytest.raises(ConfigError, match="init_temperature"):
        LearnableTemperature(0.0)


def test_distillation_zero_at_teacher_and_attention_kl():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    assert similarity_distillation(a, b, a, b).item() == pytest.approx(0.0, abs=1e-6)
    assert similarity_distillation(a, b.flip(0), a, b).item() > 0.1
    attn = torch.softmax(torch.randn(2, 3, 5, generator=g), -1)
    assert attention_distillation(attn, attn).item() == pytest.approx(0.0, abs=1e-6)
    uniform = torch.full_like(attn, 0.2)
    want = (attn * (attn.log() - math.log(0.2))).sum(-1).mean()
    assert attention_distillation(uniform, attn).item() == pytest.approx(want.item(), rel=1e-5)


def test_missing_modality_predictor_learns_a_mapping_and_hub_keys():
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    target = x @ torch.randn(8, 8)
    pred = ModalityPredictor(8)
    opt = torch.optim.Adam(pred.parameters(), lr=2e-2)
    first = pred.loss(x, target).item()
    for _ in range(60):
        opt.zero_grad()
        loss = pred.loss(x, target)
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first
    losses = hub_binding_loss({"image": x, "audio": x, "text": target}, 1.0)
    assert sorted(losses) == ["audio~image", "text~image"]
    with pytest.raises(ConfigError, match="hub"):
        hub_binding_loss({"text": x}, 1.0)


def test_retrieval_hand_case_with_ties_and_multi_positives():
    scores = np.array([[0.9, 0.5, 0.5, 0.1], [0.2, 0.8, 0.3, 0.1]])
    pos = np.array([[0, 1, 0, 1], [0, 1, 0, 0]], dtype=bool)
    ranks = ranked_positives(scores, pos)
    assert ranks[0].tolist() == [3, 4]  # the tied negative (index 2) ranks before the positive
    assert ranks[1].tolist() == [1]
    m = retrieval_metrics(scores, pos, ks=(1, 3, 5))
    assert m["R@1"] == 0.5 and m["R@3"] == 1.0 and m["R@5"] == 1.0
    assert m["median_rank"] == 2.0
    assert m["mAP@10"] == pytest.approx(((1 / 3 + 2 / 4) / 2 + 1.0) / 2)
    assert retrieval_metrics(scores, pos, map_k=2)["mAP@2"] == pytest.approx(0.5)
    # a constant scorer gets the worst rank, not a lucky one
    flat = retrieval_metrics(np.zeros((2, 4)), pos)
    assert flat["R@1"] == 0.0 and flat["median_rank"] == 3.5  # ranks 3 (two positives) and 4
    both = bidirectional_metrics(np.array([[0.9, 0.95], [0.2, 0.1]]), np.eye(2, dtype=bool), ks=(1,))
    assert both["text_to_image"]["R@1"] == 0.0 and both["image_to_text"]["R@1"] == 0.5
    with pytest.raises(ConfigError, match="positives"):
        retrieval_metrics(scores, np.zeros((2, 4), dtype=bool))


def test_chance_and_zero_shot():
    pos = labels_to_positives(np.arange(20) % 10, np.arange(10))
    chance = chance_metrics(pos, draws=50)
    assert chance["R@1"] == pytest.approx(0.1, abs=0.05) and chance["R@10"] == 1.0
    emb = torch.tensor([[1.0, 0.1], [0.1, 1.0], [0.9, 0.0]])
    assert zero_shot_accuracy(emb, torch.eye(2), torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
