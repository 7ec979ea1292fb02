"""The ViT against transformers' CLIPVisionModel / SiglipVisionModel, and the image processor
against CLIPImageProcessor / SiglipImageProcessor (PIL backends) on the same images."""

import numpy as np
import pytest
import torch
from PIL import Image

from seekdeep.errors import CheckpointError, ConfigError
from seekdeep.multimodal import ImageError, ImageProcessor, ImageProcessorConfig, VisionConfig, VisionTransformer, decode_image

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)


def _hf_vision(kind):
    torch.manual_seed(0)
    if kind == "clip":
        return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY)).eval()
    return transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TINY)).eval()


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_vision_parity_both_ways(kind, tmp_path):
    hf = _hf_vision(kind)
    with torch.no_grad():  # give every parameter a non-trivial value (HF inits norms to 1/0)
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path / "hf")
    ours = VisionTransformer.from_pretrained(tmp_path / "hf")
    assert ours.config.model_type == f"{kind}_vision_model"
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = hf(pixel_values=pixels, output_hidden_states=True)
        out = ours(pixels, output_hidden_states=True)
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    for a, b in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, atol=1e-4, rtol=0)
    # and back: seekdeep's save loads in transformers with no missing / unexpected tensor
    ours.save_pretrained(tmp_path / "ours")
    cls = transformers.CLIPVisionModel if kind == "clip" else transformers.SiglipVisionModel
    back, info = cls.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        torch.testing.assert_close(back(pixel_values=pixels).last_hidden_state, ref.last_hidden_state, atol=1e-4, rtol=0)


def test_vision_bad_input(tmp_path):
    model = VisionTransformer(VisionConfig(**TINY))
    with pytest.raises(ConfigError, match="pixel_values"):
        model(torch.randn(1, 3, 16, 16))
    with pytest.raises(ConfigError, match="patch_size"):
        VisionConfig(**{**TINY, "patch_size": 7})
    with pytest.raises(ConfigError, match="model_type"):
        VisionConfig(model_type="resnet")
    hf = _hf_vision("clip")
    hf.save_pretrained(tmp_path / "a")
    cfg = (tmp_path / "a" / "config.json").read_text().replace('"hidden_size": 32', '"hidden_size": 48')
    (tmp_path / "a" / "config.json").write_text(cfg.replace('"intermediate_size": 64', '"intermediate_size": 64'))
    with pytest.raises((CheckpointError, ConfigError)):
        VisionTransformer.from_pretrained(tmp_path / "a")


def _images():
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    tall = Image.fromarray(rng.integers(0, 256, (81, 40, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (30, 30, 4), dtype=np.uint8), mode="RGBA")
    gray = Image.fromarray(rng.integers(0, 256, (50, 45), dtype=np.uint8), mode="L")
    return [rgb, tall, rgba, gray]


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_image_processor_matches_transformers(kind, tmp_path):
    if kind == "clip":
        ref = transformers.CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})
    else:
        ref = transformers.SiglipImageProcessorPil(size={"height": 24, "width": 24})
    ref.save_pretrained(tmp_path)
    ours = ImageProcessor.from_pretrained(tmp_path)  # read from transformers' preprocessor_config.json
    images = _images()
    expected = ref(images, return_tensors="pt")["pixel_values"]
    got = ours(images)["pixel_values"]
    assert got.shape == expected.shape == (4, 3, 24, 24)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    ours.save_pretrained(tmp_path / "ours")
    again = ImageProcessor.from_pretrained(tmp_path / "ours")
    torch.testing.assert_close(again(images)["pixel_values"], expected, atol=1e-6, rtol=0)


def test_decode_image_errors():
    import io

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buf, format="PNG")
    assert decode_image(buf.getvalue()).size == (8, 8)
    with pytest.raises(ImageError, match="not a readable image"):
        decode_image(b"definitely not a png")
    with pytest.raises(ImageError, match="not a readable image"):
        decode_image(buf.getvalue()[:30])  # truncated
    with pytest.raises(ImageError, match="limit"):
        decode_image(buf.getvalue(), max_pixels=10)
    with pytest.raises(ConfigError, match="size"):
        ImageProcessorConfig(size={"longest": 3})
