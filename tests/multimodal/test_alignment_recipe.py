"""`seekdeep align` end to end (a few steps): artefacts, HF-layout CLIP that loads through
AutoModel and transformers, audio encoder round trip, standalone dashboard, run-dir rules."""

import json

import pytest
import torch

from seekdeep.recipes.align import AlignConfig, train_align


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_align_end_to_end(tmp_path):
    out = tmp_path / "run"
    cfg = AlignConfig(output_dir=str(out), steps=4, fusion_steps=3, batch_size=16, checkpoint_every=2, max_samples=100, progress=False)
    summary = train_align(cfg)
    for name in ("summary.json", "retrieval.json", "metrics.jsonl", "dashboard.html", "dashboard.png", "final/config.json",
                 "final/model.safetensors", "final/vocab.json", "final/preprocessor_config.json", "final/audio/model.safetensors",
                 "final/fusion/model.safetensors"):
        assert (out / name).exists(), name
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4] and all(0.01 <= r["temperature"] <= 1 for r in lines)
    assert "text~image" in lines[0] and "audio~image" in lines[0] and not any("audio~text" in k for k in lines[0])
    # InfoNCE at init with label positives: about ln(batch) minus the positives' share, never 0
    assert 0.5 < lines[0]["text~image"] < 2 * torch.log(torch.tensor(16.0)).item()
    trained = summary["retrieval"]["trained"]
    for group in ("text_image", "audio_text_zero_shot"):
        for metrics in trained[group].values():
            assert 0 <= metrics["mAP@10"] <= 1 and metrics["median_rank"] >= 1
    page = (out / "dashboard.html").read_text()
    assert "<script" not in page and "http" not in page and "alpha_image" in page and "data:image/png;base64," in page
    assert sorted(summary["fusion"]["normalised_auc"]) == ["audio_snr", "image_gaussian", "image_occlusion"]

    from seekdeep import AutoModel
    from seekdeep.multimodal.align_data import WordTokenizer
    from seekdeep.multimodal.audio import load_audio_encoder
    from seekdeep.multimodal.clip import ClipModel

    model = AutoModel.from_pretrained(out / "final")
    assert isinstance(model, ClipModel)
    tok = WordTokenizer.from_pretrained(out / "final")
    ids = tok(["the digit seven", "a handwritten two"])
    pixels = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ours = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], pixel_values=pixels)
    transformers = pytest.importorskip("transformers")
    ref = transformers.CLIPModel.from_pretrained(out / "final").eval()
    with torch.no_grad():
        want = ref(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], pixel_values=pixels)
    torch.testing.assert_close(ours.logits_per_text, want.logits_per_text, atol=1e-4, rtol=1e-4)
    audio = load_audio_encoder(out / "final" / "audio")
    assert audio(torch.randn(2, 4000) * 0.1).shape == (2, cfg.projection_dim)

    from seekdeep.train.rundir import RunDirectoryError

    with pytest.raises(RunDirectoryError):
        train_align(cfg)


@pytest.mark.slow
def test_align_resume_equals_an_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    common = dict(fusion_steps=1, batch_size=16, checkpoint_every=2, max_samples=60, progress=False, layers=1,
                  hidden_size=16, projection_dim=16)
    train_align(AlignConfig(output_dir=str(tmp_path / "whole"), steps=4, **common))
    train_align(AlignConfig(output_dir=str(tmp_path / "split"), steps=2, **common))
    with pytest.raises(Exception, match="--steps >= 2"):  # a budget below the checkpoint cannot resume it
        train_align(AlignConfig(output_dir=str(tmp_path / "split"), steps=1, resume="auto", **common))
    summary = train_align(AlignConfig(output_dir=str(tmp_path / "split"), steps=4, resume="auto", **common))
    whole, split = (load_file(str(tmp_path / d / "final" / "model.safetensors")) for d in ("whole", "split"))
    for key in whole:
        torch.testing.assert_close(split[key], whole[key], atol=0, rtol=0, msg=key)
    steps = [json.loads(x)["step"] for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4] and summary["config"]["steps"] == 4


@pytest.mark.slow
def test_progressive_objectives_join_after_the_first_third(tmp_path):
    out = tmp_path / "run"
    summary = train_align(AlignConfig(output_dir=str(out), steps=3, fusion_steps=1, batch_size=16, max_samples=60,
                                      progress=False, hidden_size=16, projection_dim=16,
                                      objectives="contrastive,distill,missing"))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert "distill" not in lines[0] and "missing:audio->image" not in lines[0]  # contrastive alone first
    assert all(k in lines[1] for k in ("distill", "missing:text->image", "missing:audio->image", "text~image"))
    assert lines[1]["distill"] >= 0 and 0 <= lines[1]["missing:audio->image"] <= 2
    assert "text_to_predicted_image" in summary["retrieval"]["trained"]
    assert (out / "final" / "predictors" / "model.safetensors").is_file()
    with pytest.raises(Exception, match="objectives"):
        AlignConfig(objectives="distill")


@pytest.mark.slow
def test_align_fuses_text_with_image_and_audio(tmp_path):
    from seekdeep.errors import ConfigError

    with pytest.raises(ConfigError, match="fusion_modalities"):
        AlignConfig(fusion_modalities="text,video")
    out = tmp_path / "run"
    cfg = AlignConfig(output_dir=str(out), steps=2, fusion_steps=2, batch_size=16, max_samples=40, progress=False,
                      fusion_modalities="text,image,audio")
    summary = train_align(cfg)
    assert sorted(summary["fusion"]["normalised_auc"]) == ["audio_snr", "image_gaussian", "image_occlusion", "text_drop"]
    assert set(summary["fusion"]["removal"]) == {"clean", "without_text", "without_image", "without_audio"}
    page = (out / "dashboard.html").read_text()
    assert "alpha_text (text noised)" in page and "text + image + audio" in page
    assert json.loads((out / "final" / "fusion" / "config.json").read_text())["modalities"] == ["text", "image", "audio"]
