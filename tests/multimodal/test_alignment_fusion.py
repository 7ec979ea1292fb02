"""Fusion heads and the unified trunk: any subset of modalities per sample, mixed batches equal
per-sample runs, the GMU's alpha, modality dropout, corruptions."""

import math

import pytest
import torch

from seekdeep.errors import ConfigError
from seekdeep.multimodal.fusion import (FUSIONS, FusionConfig, build_image_audio_model, corrupt_audio, corrupt_image, corrupt_text,
                                        count_parameters, modality_dropout)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def model(fusion):
    torch.manual_seed(0)
    m = build_image_audio_model(FusionConfig(fusion=fusion, hidden_size=16, num_heads=2), 8, (8, 9), torch.zeros(8), torch.ones(8))
    with torch.no_grad():  # non-zero missing embeddings so that using them is visible
        for p in m.missing.values():
            p.normal_()
    return m.eval()


@pytest.mark.parametrize("fusion", FUSIONS)
def test_mixed_modality_batch_equals_per_sample(fusion):
    m = model(fusion)
    g = torch.Generator().manual_seed(0)
    x = {"image": torch.randn(4, 3, 8, 8, generator=g), "audio": torch.randn(4, 8, 9, generator=g)}
    present = {"image": torch.tensor([True, False, True, True]), "audio": torch.tensor([True, True, False, True])}
    with torch.no_grad():
        mixed = m(x, present).logits
        for i in range(4):
            alone = {k: v[i : i + 1] for k, v in x.items() if present[k][i]}
            torch.testing.assert_close(mixed[i : i + 1], m(alone).logits, atol=1e-5, rtol=1e-5)
        # a missing modality is not the same as a present one
        assert (m({"image": x["image"]}).logits - m(x).logits).abs().max() > 1e-4
        # the missing modality's values do not matter
        scrambled = {"image": x["image"], "audio": torch.randn(4, 8, 9, generator=g)}
        absent = {"image": torch.ones(4, dtype=torch.bool), "audio": torch.zeros(4, dtype=torch.bool)}
        torch.testing.assert_close(m(scrambled, absent).logits, m({"image": x["image"]}).logits, atol=1e-5, rtol=1e-5)


def test_gmu_alpha_is_the_seeds_sigmoid_for_two_modalities():
    m = model("gmu")
    x = {"image": torch.randn(3, 3, 8, 8), "audio": torch.randn(3, 8, 9)}
    with torch.no_grad():
        out = m(x)
        torch.testing.assert_close(out.alpha.sum(-1), torch.ones(3))
        hs = [torch.tanh(m.proj[k](m.towers[k](x[k]))) for k in ("image", "audio")]
        w, b = m.gate.weight, m.gate.bias
        alpha_image = torch.sigmoid(torch.cat(hs, -1) @ (w[0] - w[1]) + (b[0] - b[1]))  # sigmoid(W . [h_i, h_a])
        torch.testing.assert_close(out.alpha[:, 0], alpha_image, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out.fused, alpha_image[:, None] * hs[0] + (1 - alpha_image[:, None]) * hs[1], atol=1e-6, rtol=1e-5)


def test_unified_trunk_has_fewer_parameters_and_errors():
    assert count_parameters(model("unified")) < 0.8 * count_parameters(model("gmu"))
    m = model("gmu")
    with pytest.raises(ConfigError, match="inputs"):
        m({})
    with pytest.raises(ConfigError, match="inputs"):
        m({"video": torch.zeros(1)})
    with pytest.raises(ConfigError, match="inputs"):
        m({"image": torch.zeros(2, 3, 8, 8), "audio": torch.zeros(3, 8, 9)})
    with pytest.raises(ConfigError, match="fusion"):
        FusionConfig(fusion="attention")
    with pytest.raises(ConfigError, match="modality_dropout"):
        FusionConfig(modality_dropout=1.0)


def test_modality_dropout_and_corruptions():
    g = torch.Generator().manual_seed(0)
    present = modality_dropout(2000, ("image", "audio"), 0.5, g)
    both_missing = ~present["image"] & ~present["audio"]
    dropped = ~(present["image"] & present["audio"])
    assert not both_missing.any() and 0.45 < dropped.float().mean() < 0.55
    wave = torch.sin(torch.arange(8000) / 7.0)[None].repeat(4, 1)
    for snr in (20.0, 0.0):
        noisy = corrupt_audio(wave, snr, g)
        measured = 10 * math.log10(wave.pow(2).mean() / (noisy - wave).pow(2).mean())
        assert measured == pytest.approx(snr, abs=0.3)
    assert torch.equal(corrupt_audio(wave, float("inf")), wave)
    pixels = torch.ones(3, 3, 16, 16)
    occluded = corrupt_image(pixels, "occlusion", 0.25, g)
    assert ((occluded == 0).float().mean(dim=(1, 2, 3)) == 0.25).all()
    assert corrupt_image(pixels, "blank", 1.0).abs().sum() == 0
    ids = torch.tensor([[1, 7, 8, 9, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    dropped_ids = corrupt_text(ids, mask, 1.0, unk_id=2)
    assert dropped_ids.tolist() == [[1, 2, 2, 2, 3, 0]]
