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


TRIMODAL = ("text", "image", "audio")


def model(fusion, modalities=("image", "audio")):
    torch.manual_seed(0)
    m = build_image_audio_model(FusionConfig(fusion=fusion, modalities=modalities, hidden_size=16, num_heads=2), 8, (8, 9),
                                torch.zeros(8), torch.ones(8), text_vocab_size=12, text_length=8)
    with torch.no_grad():  # non-zero missing embeddings so that using them is visible
        for p in m.missing.values():
            p.normal_()
    return m.eval()


def _captions():
    """Right-padded ids (pad 0, bos 1, eos 3) of four captions of different lengths."""
    rows = [[1, 5, 6, 7, 8, 3], [1, 9, 3], [1, 4, 10, 11, 3], [1, 2, 3]]
    ids = torch.zeros(4, 6, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return ids


@pytest.mark.parametrize("modalities", [("image", "audio"), TRIMODAL], ids=["image+audio", "text+image+audio"])
@pytest.mark.parametrize("fusion", FUSIONS)
def test_mixed_modality_batch_equals_per_sample(fusion, modalities):
    m = model(fusion, modalities)
    g = torch.Generator().manual_seed(0)
    x = {"image": torch.randn(4, 3, 8, 8, generator=g), "audio": torch.randn(4, 8, 9, generator=g), "text": _captions()}
    x = {k: x[k] for k in modalities}
    present = {"image": torch.tensor([True, False, True, True]), "audio": torch.tensor([True, True, False, True]),
               "text": torch.tensor([False, True, True, True])}
    present = {k: present[k] for k in modalities}
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


@pytest.mark.parametrize("fusion", FUSIONS)
def test_text_padding_and_token_drop(fusion):
    m = model(fusion, TRIMODAL)
    ids = _captions()
    x = {"image": torch.randn(4, 3, 8, 8), "audio": torch.randn(4, 8, 9)}
    with torch.no_grad():
        wide = m({**x, "text": torch.cat([ids, torch.zeros(4, 2, dtype=torch.long)], 1)}).logits
        torch.testing.assert_close(wide, m({**x, "text": ids}).logits, atol=1e-5, rtol=1e-5)  # pads are masked out
        dropped = corrupt_text(ids, (ids != 0).long(), 1.0, unk_id=2)
        assert (m({**x, "text": dropped}).logits - m({**x, "text": ids}).logits).abs().max() > 1e-4  # the words matter
    if fusion == "unified":
        with pytest.raises(ConfigError, match="inputs"):
            m({**x, "text": torch.ones(4, 9, dtype=torch.long)})  # longer than text_length
    with pytest.raises(ConfigError, match="text_vocab_size"):
        build_image_audio_model(FusionConfig(fusion=fusion, modalities=TRIMODAL), 8, (8, 9), torch.zeros(8), torch.ones(8))
    with pytest.raises(ConfigError, match="modalities"):
        build_image_audio_model(FusionConfig(fusion=fusion, modalities=("image", "video")), 8, (8, 9), torch.zeros(8), torch.ones(8))


@pytest.mark.parametrize("modalities", [("image", "audio"), ("text", "image")])
def test_gmu_alpha_is_the_seeds_sigmoid_for_two_modalities(modalities):
    m = model("gmu", modalities)  # the seed's alpha = sigmoid(W . [h_text, h_image])
    x = {"image": torch.randn(3, 3, 8, 8), "audio": torch.randn(3, 8, 9), "text": _captions()[:3]}
    x = {k: x[k] for k in modalities}
    with torch.no_grad():
        out = m(x)
        torch.testing.assert_close(out.alpha.sum(-1), torch.ones(3))
        hs = [torch.tanh(m.proj[k](m.towers[k](x[k]))) for k in modalities]
        w, b = m.gate.weight, m.gate.bias
        alpha_first = torch.sigmoid(torch.cat(hs, -1) @ (w[0] - w[1]) + (b[0] - b[1]))  # sigmoid(W . [h_1, h_2])
        torch.testing.assert_close(out.alpha[:, 0], alpha_first, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out.fused, alpha_first[:, None] * hs[0] + (1 - alpha_first[:, None]) * hs[1], atol=1e-6, rtol=1e-5)


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


def test_text_fusion_augmentation_and_token_drop_curve():
    from seekdeep.multimodal.robustness import Featurizer, FusionData, augment_with_text, evaluate, noise_curves

    g = torch.Generator().manual_seed(0)
    n = 300
    ids = _captions().repeat(n // 4, 1)
    mask = (ids != 0).long()
    pixels, audio = torch.randn(n, 3, 8, 8, generator=g), torch.randn(n, 800, generator=g)
    new_pixels, new_audio, new_ids = augment_with_text(pixels, audio, ids, mask, 2, g, p=1.0)
    changed = torch.stack([(new_pixels != pixels).flatten(1).any(1), (new_audio != audio).any(1), (new_ids != ids).any(1)], 1)
    assert changed.sum(1).max() == 1  # one modality per sample, never two
    image_share, audio_share, text_share = changed.float().mean(0).tolist()
    # a third each; a caption shows a change only when a word was drawn (rate U(0, 1), one caption is "<unk>" already)
    assert 0.25 < image_share < 0.42 and 0.25 < audio_share < 0.42 and 0.1 < text_share < image_share
    assert ((new_ids != ids) <= (new_ids == 2)).all() and (new_ids[:, 0] == 1).all()  # words -> <unk>; bos, eos, pads kept
    # a text + image model: the hits are shared by its two modalities, the audio is never touched
    new_pixels, new_audio, new_ids = augment_with_text(pixels, audio, ids, mask, 2, g, p=1.0, modalities=("text", "image"))
    assert torch.equal(new_audio, audio) and 0.4 < (new_pixels != pixels).flatten(1).any(1).float().mean() < 0.6
    featurize = Featurizer()
    mel = featurize(audio[:8])
    torch.manual_seed(0)
    m = build_image_audio_model(FusionConfig(fusion="gmu", modalities=TRIMODAL, hidden_size=16, num_heads=2), 8, tuple(mel.shape[1:]),
                                torch.zeros(mel.shape[1]), torch.ones(mel.shape[1]), text_vocab_size=12, text_length=8).eval()
    data = FusionData(pixels[:40], audio[:40], torch.arange(40) % 10, ids[:40], mask[:40], 2)
    curves = noise_curves(m, data, featurize)
    assert set(curves) == {"image_gaussian", "image_occlusion", "audio_snr", "text_drop"}
    assert all("alpha_text" in point for point in curves["text_drop"])
    every_word = FusionData(data.pixel_values, data.audio, data.labels, corrupt_text(data.input_ids, data.attention_mask, 1.0, 2), mask[:40], 2)
    assert curves["text_drop"][-1]["accuracy"] == evaluate(m, every_word, featurize)["accuracy"]  # p = 1: every word dropped
    assert curves["text_drop"][-1]["alpha_text"] == pytest.approx(evaluate(m, every_word, featurize)["alpha_text"])
    with pytest.raises(ConfigError, match="data"):
        evaluate(m, FusionData(data.pixel_values, data.audio, data.labels), featurize)
    # the dashboard's per-sample rows: every modality noised and removed, all three alphas
    from seekdeep.multimodal.dashboard import contribution_report

    rows = contribution_report(m, data, featurize, index=[0, 5], text_drop=1.0)["samples"]
    assert [r["index"] for r in rows] == [0, 5]
    assert {f"pred ({m} {how})" for m in TRIMODAL for how in ("noised", "removed")} <= set(rows[0])
    assert sum(rows[1][f"alpha_{m} (text removed)"] for m in TRIMODAL) == pytest.approx(1.0, abs=2e-3)
    with torch.no_grad():
        alone = m({"image": data.pixel_values[5:6], "audio": featurize(data.audio[5:6])})
    assert rows[1]["pred (text removed)"] == int(alone.logits.argmax()) and rows[1]["alpha_text (text removed)"] == round(float(alone.alpha[0, 0]), 3)


def test_auxiliary_heads_add_each_present_modalitys_loss():
    import torch.nn.functional as F

    from seekdeep.multimodal.fusion import fusion_loss

    torch.manual_seed(0)
    m = build_image_audio_model(FusionConfig(fusion="gmu", modalities=("text", "image"), hidden_size=16, num_heads=2, aux_weight=0.5),
                                8, (8, 9), torch.zeros(8), torch.ones(8), text_vocab_size=12, text_length=8)
    x = {"text": _captions(), "image": torch.randn(4, 3, 8, 8)}
    present = {"text": torch.tensor([True, False, True, True]), "image": torch.ones(4, dtype=torch.bool)}
    labels = torch.tensor([1, 2, 3, 4])
    out = m(x, present)
    h_text = torch.tanh(m.proj["text"](m.towers["text"](x["text"])))
    h_image = torch.tanh(m.proj["image"](m.towers["image"](x["image"])))
    text_ce = F.cross_entropy(m.aux["text"](h_text)[present["text"]], labels[present["text"]])  # the absent caption is left out
    image_ce = F.cross_entropy(m.aux["image"](h_image), labels)
    expected = F.cross_entropy(out.logits, labels) + 0.5 * (text_ce + image_ce) / 2
    torch.testing.assert_close(fusion_loss(out, labels), expected, atol=1e-5, rtol=1e-5)
    assert model("gmu")({"image": x["image"], "audio": torch.randn(4, 8, 9)}).aux_logits is None  # off by default
    with pytest.raises(ConfigError, match="aux_weight"):
        FusionConfig(fusion="unified", aux_weight=0.5)


def test_protocol_repeats_beyond_range_levels_and_cosine_schedule():
    import numpy as np

    from seekdeep.multimodal.robustness import (AUDIO_SNR, IMAGE_NOISE, IMAGE_NOISE_BEYOND, Featurizer, FusionData, beyond_area, evaluate,
                                                noise_curves, normalised_auc, train_fusion)

    g = torch.Generator().manual_seed(0)
    pixels, audio = torch.randn(40, 3, 8, 8, generator=g), torch.randn(40, 800, generator=g)
    data = FusionData(pixels, audio, torch.arange(40) % 10)
    featurize = Featurizer()
    mel = featurize(audio[:2])
    torch.manual_seed(0)
    m = build_image_audio_model(FusionConfig(fusion="gmu", hidden_size=16, num_heads=2), 8, tuple(mel.shape[1:]), torch.zeros(mel.shape[1]),
                                torch.ones(mel.shape[1]))
    # every step's learning rate, read where the scheduler has set it: warmup, then cosine decay to 0.1x
    lrs = []
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    hook = register_optimizer_step_pre_hook(lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
    try:
        train_fusion(m, data, featurize, steps=6, batch_size=8, lr=1e-3, schedule="cosine", warmup=2)
    finally:
        hook.remove()
    assert lrs[:3] == pytest.approx([5e-4, 1e-3, 1e-3]) and all(a > b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] > 1e-4
    with pytest.raises(ConfigError, match="schedule"):
        train_fusion(m, data, featurize, steps=1, schedule="linear")
    # repeats: the first draw is the single-draw evaluation; per-sample shares average to the accuracy
    one = evaluate(m, data, featurize, "gaussian", 1.0, per_sample=True)
    three = evaluate(m, data, featurize, "gaussian", 1.0, repeats=3, per_sample=True)
    assert one["accuracy"] == evaluate(m, data, featurize, "gaussian", 1.0)["accuracy"] == pytest.approx(float(one["correct"].mean()))
    assert three["correct"].shape == (40,) and three["accuracy"] == pytest.approx(float(three["correct"].mean()))
    assert set(three["correct"].unique().tolist()) <= {0.0, 1 / 3, 2 / 3, 1.0}
    with pytest.raises(ConfigError, match="repeats"):
        evaluate(m, data, featurize, repeats=0)
    # beyond-range points: marked, left out of the in-range area, averaged apart
    curves = noise_curves(m, data, featurize, beyond=True)
    levels = [p["level"] for p in curves["image_gaussian"]]
    assert levels == list(IMAGE_NOISE + IMAGE_NOISE_BEYOND) and len(curves["audio_snr"]) == len(AUDIO_SNR) + 2
    assert normalised_auc(curves["image_gaussian"]) == normalised_auc(noise_curves(m, data, featurize)["image_gaussian"])
    curve = [{"accuracy": 0.8}, {"accuracy": 0.6}, {"accuracy": 0.4}, {"accuracy": 0.2, "beyond": True}, {"accuracy": 0.1, "beyond": True}]
    assert normalised_auc(curve) == pytest.approx((0.4 + 0.6 + 0.2) / 2 / 0.8)  # trapezoid over the in-range three
    assert beyond_area(curve) == pytest.approx(0.15 / 0.8) and beyond_area(curve[:3]) is None
    assert np.isclose(beyond_area(curves["audio_snr"]) * curves["audio_snr"][0]["accuracy"],
                      np.mean([p["accuracy"] for p in curves["audio_snr"][-2:]]))


@pytest.mark.parametrize("fusion", ["concat", "sum", "gmu"])
def test_logit_contributions_sum_to_the_logits(fusion):
    from seekdeep.multimodal.robustness import logit_contributions, logit_shares

    m = model(fusion)
    x = {"image": torch.randn(5, 3, 8, 8), "audio": torch.randn(5, 8, 9)}
    parts = logit_contributions(m, x)
    with torch.no_grad():
        out = m(x)
    torch.testing.assert_close(parts["image"] + parts["audio"] + m.classifier.bias, out.logits, atol=1e-5, rtol=1e-5)
    shares = logit_shares(parts)
    assert sum(shares.values()) == pytest.approx(1.0) and all(0 < v < 1 for v in shares.values())
    assert logit_shares({"image": parts["image"], "audio": parts["audio"] + 7.0})["audio"] == pytest.approx(shares["audio"], abs=1e-5)
    with pytest.raises(ConfigError, match="inputs"):
        logit_contributions(m, {"image": x["image"]})
    with pytest.raises(ConfigError, match="model"):
        logit_contributions(model("unified"), x)


def test_witness_dropout_removes_the_witness_never_everything():
    g = torch.Generator().manual_seed(0)
    plain = modality_dropout(4000, ("text", "image"), 0.2, torch.Generator().manual_seed(1))
    same = modality_dropout(4000, ("text", "image"), 0.2, torch.Generator().manual_seed(1), "text", 0.0)
    assert all(torch.equal(plain[m], same[m]) for m in plain)  # witness_p = 0: the old masks, the same random stream
    present = modality_dropout(4000, ("text", "image"), 0.2, g, "text", 0.5)
    assert not (~present["text"] & ~present["image"]).any()
    # text lost by the uniform drop (0.1) or the witness drop (0.5 of the 0.8 with both left): 0.5; image by the uniform one, 0.1
    assert 0.45 < (~present["text"]).float().mean() < 0.55 and 0.07 < (~present["image"]).float().mean() < 0.13
    with pytest.raises(ConfigError, match="witness"):
        modality_dropout(4, ("text", "image"), 0.2, g, "audio", 0.5)
    with pytest.raises(ConfigError, match="witness"):
        FusionConfig(modalities=("text", "image"), witness="audio", witness_dropout=0.5)
    with pytest.raises(ConfigError, match="witness_dropout"):
        FusionConfig(modalities=("text", "image"), witness="text", witness_dropout=1.0)
    assert FusionConfig(modalities=("text", "image"), witness="text", witness_dropout=0.5).to_dict()["witness_dropout"] == 0.5


def test_augment_range_bounds_the_training_corruptions():
    from seekdeep.multimodal.robustness import FULL_RANGE, AugmentRange, augment, augment_with_text

    g = torch.Generator().manual_seed(0)
    pixels = torch.ones(64, 3, 8, 8)
    wave = torch.sin(torch.arange(4000) / 5.0)[None].repeat(64, 1)
    # the default is the whole test range and the old random stream: an explicit FULL_RANGE changes nothing
    a = augment(pixels, wave, torch.Generator().manual_seed(3), 1.0)
    b = augment(pixels, wave, torch.Generator().manual_seed(3), 1.0, FULL_RANGE)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # no image corruption at all when both image ranges are 0; audio SNR never below the floor
    mild = AugmentRange(image_std=0.0, occlusion=0.0, audio_snr_db=20.0)
    new_pixels, new_audio = augment(pixels, wave, g, 1.0, mild)
    assert torch.equal(new_pixels, pixels)
    hit = (new_audio != wave).any(-1)
    snr = 10 * torch.log10(wave[hit].pow(2).mean(-1) / (new_audio[hit] - wave[hit]).pow(2).mean(-1))
    assert hit.sum() > 10 and snr.min() > 19.0 and snr.max() < 31.0
    full = augment(pixels, wave, g, 1.0)[1]
    full_snr = 10 * torch.log10(wave.pow(2).mean(-1) / (full - wave).pow(2).mean(-1).clamp_min(1e-12))
    assert full_snr[(full != wave).any(-1)].min() < 10.0  # the full range reaches far below the mild floor
    # the gaussian std is bounded: at std U(0, 0.5) no pixel moves by 4 (the full range's std 4 does)
    small = augment(pixels, wave, g, 1.0, AugmentRange(image_std=0.5, occlusion=0.0))[0]
    assert (small - pixels).abs().max() < 4.0
    ids, mask = torch.tensor([[1, 7, 8, 9, 3]]).repeat(64, 1), torch.ones(64, 5, dtype=torch.long)
    kept = augment_with_text(pixels, wave, ids, mask, 2, g, 1.0, ("text",), AugmentRange(text_drop=0.0))[2]
    assert torch.equal(kept, ids)
    # which test levels no training draw reached
    assert [mild.unseen("audio_snr", lv) for lv in (math.inf, 20.0, 10.0, -30.0)] == [False, False, True, True]
    assert AugmentRange(image_std=1.0).unseen("image_gaussian", 2.0) and not AugmentRange(image_std=1.0).unseen("image_gaussian", 1.0)
    assert AugmentRange(occlusion=0.25).unseen("image_occlusion", 0.5) and not FULL_RANGE.unseen("image_occlusion", 1.0)
    with pytest.raises(ConfigError, match="occlusion"):
        AugmentRange(occlusion=1.5)
    with pytest.raises(ConfigError, match="audio_snr_db"):
        AugmentRange(audio_snr_db=float("nan"))
    with pytest.raises(ConfigError, match="curve"):
        mild.unseen("image_blur", 1.0)
